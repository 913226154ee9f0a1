"""Leakage-free splits: lesion-wise, near-duplicate-aware, stratified, reproducible.

HAM10000 holds several images per lesion (``lesion_id``), and some near-identical images of one lesion filed under
different lesion ids (Abhishek et al., Sci. Data 2025). Either kind of twin on both sides of a split leaks. So images
are grouped by lesion id, groups joined by a perceptual hash into near-duplicate clusters, and whole clusters are
assigned to splits with scikit-learn's ``StratifiedGroupKFold`` (stratified on the 7-way ``dx``, which also keeps
the binary label balanced).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from core.data import DataError, project_path, read_csv
from core.images import open_rgb
from core.io import atomic_write

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ["image_id", "lesion_id", "dx", "label", "split"]
FOLD_COLUMNS = [*SPLIT_COLUMNS[:-1], "fold"]
HASH_SIZE = 16  # 256-bit pHash: an 8×8 (64-bit) hash calls every "dark dot on pink skin" a duplicate.
# Hamming distance (of 256 bits) at or below which two images count as near-duplicates. Chosen on HAM10000 by eye:
# true twins sit at 16–38; at 48 19 clusters merge (max 11 images); at 56 chaining glues 54 lesions into one
# cluster. A false merge only keeps two unrelated lesions in one split, which costs nothing, so err generous.
NEAR_DUPLICATE_DISTANCE = 48


def perceptual_hashes(paths: list[str], workers: int = 4) -> np.ndarray:
    """pHash (256 bit) of every image, as an ``(n, 4)`` uint64 array. Unreadable files are reported all at once."""
    import imagehash  # only making a split needs it: reading one (training, the dashboard) does not

    def one(path: str) -> np.ndarray | str:
        try:
            return np.packbits(imagehash.phash(open_rgb(path), hash_size=HASH_SIZE).hash.ravel())
        except DataError as err:
            return str(err)

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, paths))
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        shown = "\n  ".join(errors[:10]) + (f"\n  … and {len(errors) - 10} more" if len(errors) > 10 else "")
        raise DataError(f"{len(errors)} unreadable image(s):\n  {shown}")
    return np.stack(results).view(">u8").astype(np.uint64)


def hamming_distances(hashes: np.ndarray, block: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` with their Hamming distance at most ``NEAR_DUPLICATE_DISTANCE`` (blocked: O(n·block)
    memory)."""
    rows, cols, dists = [], [], []
    for start in range(0, len(hashes), block):
        chunk = hashes[start:start + block]
        d = np.bitwise_count(chunk[:, None, :] ^ hashes[None, :, :]).sum(axis=2, dtype=np.int32)
        i, j = np.nonzero(d <= NEAR_DUPLICATE_DISTANCE)
        keep = start + i < j
        rows.append(start + i[keep])
        cols.append(j[keep])
        dists.append(d[i[keep], j[keep]])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(dists)


@dataclass(frozen=True)
class DuplicateClusters:
    """``cluster`` per image (lesions joined by near-duplicate images) and how many clusters join >1 lesion."""
    cluster: np.ndarray
    merged_clusters: int
    merged_lesions: int
    near_duplicate_pairs: int


def near_duplicate_clusters(lesion_ids: pd.Series, hashes: np.ndarray) -> DuplicateClusters:
    """Connected components of the graph image—lesion plus image—image (near-duplicate) edges."""
    n = len(lesion_ids)
    lesion_index = pd.factorize(lesion_ids)[0]
    i, j, _ = hamming_distances(hashes)
    cross = lesion_index[i] != lesion_index[j]
    # Nodes 0..n-1 are images, n.. are lesions; edges tie each image to its lesion and near-duplicates together.
    src = np.concatenate([np.arange(n), i])
    dst = np.concatenate([n + lesion_index, j])
    graph = coo_matrix((np.ones(len(src)), (src, dst)), shape=(n + lesion_index.max() + 1,) * 2)
    _, labels = connected_components(graph, directed=False)
    cluster = pd.factorize(labels[:n])[0]
    lesions_per_cluster = pd.Series(lesion_index).groupby(cluster).nunique()
    merged = lesions_per_cluster[lesions_per_cluster > 1]
    return DuplicateClusters(cluster, len(merged), int(merged.sum()), int(cross.sum()))


def lesion_wise_split(frame: pd.DataFrame, groups: np.ndarray,
                      fractions: tuple[float, float, float] = (0.70, 0.15, 0.15), seed: int = 0) -> pd.Series:
    """Assign every image to train/val/test so that no group (near-duplicate cluster) straddles two splits.

    ``StratifiedGroupKFold`` cuts the data into 20 stratified, group-disjoint folds of ~5 % each; the fractions
    (multiples of 0.05) say how many folds each split takes.
    """
    n_folds = 20
    counts = [round(f * n_folds) for f in fractions]
    if sum(counts) != n_folds or any(abs(c / n_folds - f) > 1e-9 for c, f in zip(counts, fractions)):
        raise ValueError(f"split fractions {fractions} must be multiples of 0.05 that sum to 1")
    fold = _stratified_group_folds(frame["dx"], groups, n_folds, seed)
    edges = np.cumsum(counts)
    return pd.Series(np.array(SPLITS)[np.searchsorted(edges, fold, side="right")], index=frame.index, name="split")


def lesion_wise_folds(frame: pd.DataFrame, groups: np.ndarray, n_folds: int = 5, seed: int = 0) -> pd.Series:
    """Cross-validation folds 0..n-1 over the rows given (callers pass train+val; the test split stays held out)."""
    return pd.Series(_stratified_group_folds(frame["dx"], groups, n_folds, seed), index=frame.index, name="fold")


def _stratified_group_folds(strata: pd.Series, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    fold = np.empty(len(strata), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(strata)), strata.to_numpy(), groups)):
        fold[held_out] = k
    return fold


def split_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per split: images, lesions, malignant share — what the reference report shows as its Figure 1."""
    rows = []
    for name in SPLITS + ("all",):
        part = frame if name == "all" else frame[frame["split"] == name]
        rows.append({"split": name, "images": len(part), "lesions": part["lesion_id"].nunique(),
                     "share_%": 100 * len(part) / len(frame), "malignant": int(part["label"].sum()),
                     "malignant_%": 100 * part["label"].mean()})
    return pd.DataFrame(rows).set_index("split")


def write_csv(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Sorted by image id, fixed float format: regenerating a split gives a byte-identical file."""
    frame = frame.sort_values("image_id", kind="stable")
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n"))


def read_split(path: str | os.PathLike) -> pd.DataFrame:
    """A split file, validated: readable CSV, right columns, known split names, each image once, no lesion in two
    splits. (Ids the dataset lacks are :func:`apply_split`'s check.)"""
    path = Path(path)
    frame = _read_assignment(path, SPLIT_COLUMNS, "split file", "python train.py split")
    unknown = frame[~frame["split"].isin(SPLITS)]
    if len(unknown):
        names = sorted(unknown["split"].fillna("(empty)").astype(str).unique())
        raise DataError(f"{path}: unknown split name(s) {names} for {len(unknown)} image(s), e.g. "
                        f"{', '.join(unknown['image_id'].astype(str)[:5])}; expected {', '.join(SPLITS)}")
    repeated = frame[frame["image_id"].duplicated(keep=False)]
    if len(repeated):
        raise DataError(f"{path}: {repeated['image_id'].nunique()} image id(s) listed more than once, e.g. "
                        f"{', '.join(repeated['image_id'].drop_duplicates()[:5])}")
    _check_lesions_in_one(frame, "split", path)
    return frame


def read_folds(path: str | os.PathLike) -> pd.DataFrame:
    """A fold file (``train.py split --folds N``), validated: its columns, integer folds, at least two of them, no
    lesion in two folds."""
    path = project_path(path)
    frame = _read_assignment(path, FOLD_COLUMNS, "fold file", "python train.py split --folds 5")
    folds = pd.to_numeric(frame["fold"], errors="coerce")
    if folds.isna().any() or (folds % 1 != 0).any():
        bad = frame.loc[folds.isna() | (folds % 1 != 0), "image_id"]
        raise DataError(f"{path}: non-integer fold for {', '.join(bad[:5])}")
    frame["fold"] = folds.astype(int)
    if frame["fold"].nunique() < 2:
        raise DataError(f"{path}: cross-validation needs at least 2 folds, found {frame['fold'].nunique()}")
    _check_lesions_in_one(frame, "fold", path)
    return frame


def _read_assignment(path: Path, columns: list[str], what: str, command: str) -> pd.DataFrame:
    """A split or fold file read, with its columns checked; a missing file names the command that makes it."""
    if not path.is_file():
        raise DataError(f"{what} {path} not found; create it with `{command}`")
    frame = read_csv(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")
    return frame


def _check_lesions_in_one(frame: pd.DataFrame, column: str, path: Path) -> None:
    """Leakage guard: every image of a lesion sits in the same split (or fold)."""
    straddling = frame.groupby("lesion_id")[column].nunique()
    straddling = straddling[straddling > 1]
    if len(straddling):
        raise DataError(f"{path}: {len(straddling)} lesion(s) appear in more than one {column}, e.g. "
                        f"{', '.join(straddling.index[:5])}")


def apply_split(data: pd.DataFrame, split: pd.DataFrame, source: str = "split file") -> pd.DataFrame:
    """``data`` with the ``split`` column of a split file; ids the data lacks are an error, not silently dropped."""
    unknown = split[~split["image_id"].isin(data["image_id"])]
    if len(unknown):
        raise DataError(f"{source}: {len(unknown)} image id(s) not in the dataset, e.g. "
                        f"{', '.join(unknown['image_id'].head(5))} — was it made from other data?")
    return data.merge(split[["image_id", "split"]], on="image_id", how="inner", validate="one_to_one")


def plot_class_distribution(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Bar chart of diagnoses per split (share of the split's images), malignant classes hatched."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.data import MALIGNANT_DX

    order = frame["dx"].value_counts().index.tolist()
    share = pd.crosstab(frame["dx"], frame["split"], normalize="columns").reindex(index=order, columns=list(SPLITS))
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    width = 0.8 / len(SPLITS)
    x = np.arange(len(order))
    summary = split_summary(frame)
    for k, name in enumerate(SPLITS):
        bars = ax.bar(x + (k - 1) * width, 100 * share[name], width,
                      label=f"{name} (n={summary.loc[name, 'images']}, "
                            f"malignant {summary.loc[name, 'malignant_%']:.1f} %)")
        for bar, dx in zip(bars, order):
            if dx in MALIGNANT_DX:
                bar.set_hatch("//")
    ax.set_xticks(x, [f"{dx}{' *' if dx in MALIGNANT_DX else ''}" for dx in order])
    ax.set_ylabel("% of the split's images")
    ax.set_title("Diagnoses per split (* hatched = malignant)")
    ax.legend(frameon=False)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out
