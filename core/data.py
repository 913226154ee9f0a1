"""Labelled dermoscopy data: HAM10000, ISIC 2018/2019 ground truth, plain ``image,label`` CSVs.

Every reader returns the same frame, one row per image, so training, evaluation and the dashboard never care where
the data came from: ``image_id, lesion_id, dx, label, path, mask_path`` plus whatever metadata the source has
(HAM10000: ``dx_type, age, sex, localization``). ``label`` is the binary target (1 = malignant).
Bad input raises :class:`DataError` naming the file, the rows and the problem, never a bare ``KeyError``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPLIT_FILE = "splits/ham10000.csv"      # relative to the project (``project_path``); `train.py split` writes it
DEFAULT_FOLDS_FILE = "splits/ham10000_folds5.csv"
HAM10000_METADATA = "HAM10000_metadata.csv"
HAM10000_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
# Where an image was taken (clinic, camera, acquisition set): read from the first of these columns a label file has
# (HAM10000's current metadata calls it ``dataset``), never required; carried as ``source``.
SOURCE_COLUMNS = ("source", "site", "dataset")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Diagnoses and the binary target. ``scc`` only occurs in ISIC 2019; HAM10000 files it under ``akiec``.
MALIGNANT_DX = ("mel", "bcc", "akiec", "scc")
HAM10000_DX = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
DX_NAMES = {
    "akiec": "actinic keratosis / Bowen's disease",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
    "scc": "squamous cell carcinoma",
}
DATA_CITATION = ("HAM10000: Tschandl P., Rosendahl C., Kittler H. The HAM10000 dataset, a large collection of "
                 "multi-source dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018), "
                 "doi:10.1038/sdata.2018.161. CC BY-NC-SA 4.0.")
ISIC2018_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC2019_COLUMNS = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
ISIC_TO_DX = {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AKIEC": "akiec", "AK": "akiec", "BKL": "bkl", "DF": "df",
              "VASC": "vasc", "SCC": "scc"}


class DataError(ValueError):
    """The data on disk is not what a reader expects; the message says what, where and how to fix it."""


def project_path(path: str | os.PathLike) -> Path:
    """A path from a config or the command line: relative ones are relative to the project, not the working dir."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path


def dx_to_label(dx: pd.Series) -> pd.Series:
    """Binary target: 1 for malignant diagnoses (mel, bcc, akiec, scc), 0 for benign ones."""
    return dx.isin(MALIGNANT_DX).astype("int64")


def _list_rows(frame: pd.DataFrame, column: str, limit: int = 5) -> str:
    """'row 3 (ISIC_1), row 9 (ISIC_2), … and 4 more' — CSV row numbers count the header as row 1."""
    shown = [f"row {i + 2} ({v})" for i, v in zip(frame.index[:limit], frame[column].iloc[:limit])]
    more = len(frame) - limit
    return ", ".join(shown) + (f" … and {more} more" if more > 0 else "")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Find the HAM10000 folder: ``data_dir``, then ``$HAM10000_DIR``, then ``data/ham10000``, then
    ``../shared/data/ham10000`` (both relative to the project root). The first that holds the metadata file wins."""
    candidates: list[tuple[str, Path]] = []
    if data_dir is not None:
        candidates.append(("--data-dir", Path(data_dir)))
    if os.environ.get("HAM10000_DIR"):
        candidates.append(("$HAM10000_DIR", Path(os.environ["HAM10000_DIR"])))
    candidates += [("project data folder", PROJECT_ROOT / "data" / "ham10000"),
                   ("shared data folder", PROJECT_ROOT.parent / "shared" / "data" / "ham10000")]
    for source, path in candidates:
        if (path / HAM10000_METADATA).is_file():
            return path.resolve()
        if source in ("--data-dir", "$HAM10000_DIR"):
            # An explicit choice that is wrong is an error, not something to silently skip past.
            raise DataError(f"{source} points to {path}, which has no {HAM10000_METADATA}. "
                            f"Point it at the folder holding {HAM10000_METADATA}, images/ and masks/.")
    tried = "\n  ".join(f"{source}: {path}" for source, path in candidates)
    raise DataError(f"No HAM10000 data found. Looked in:\n  {tried}\n"
                    "Download it (see README, 'Data') into data/ham10000/ or set $HAM10000_DIR / --data-dir.")


def read_csv(csv_path: Path) -> pd.DataFrame:
    """A CSV with its id columns as text; a missing or unparsable file is a :class:`DataError` naming it."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: file not found")
    try:
        return pd.read_csv(csv_path, dtype={"image_id": str, "lesion_id": str, "image": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{csv_path}: not a readable CSV file ({err})") from err


def _require_columns(frame: pd.DataFrame, required: tuple[str, ...], csv_path: Path) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; "
                        f"expected {', '.join(required)}, found {', '.join(map(str, frame.columns))}")


def _check_unique(frame: pd.DataFrame, column: str, csv_path: Path) -> None:
    dup = frame[frame[column].duplicated(keep=False)]
    if len(dup):
        raise DataError(f"{csv_path}: {dup[column].nunique()} duplicate {column}(s): {_list_rows(dup, column)}")


def _find_image(image_id: str, files: dict[str, Path]) -> Path | None:
    """The file for ``image_id`` among ``files`` (lower-cased name → path), whatever its extension and case
    (ISIC 2019 also has ``<id>_downsampled.jpg``)."""
    image_id = image_id.lower()
    for stem in (image_id, f"{image_id}_downsampled"):
        for ext in IMAGE_EXTENSIONS:
            if (hit := files.get(stem + ext)) is not None:
                return hit
    return None


def attach_image_paths(frame: pd.DataFrame, image_dir: Path, csv_path: Path) -> pd.DataFrame:
    """Add ``path``; every id must have a file (one directory listing, not 10,000 stat calls)."""
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} (for {csv_path}) does not exist")
    files = {p.name.lower(): p for p in image_dir.iterdir()}
    frame = frame.copy()
    frame["path"] = [_find_image(i, files) for i in frame["image_id"]]
    missing = frame[frame["path"].isna()]
    if len(missing):
        raise DataError(f"{csv_path}: {len(missing)} image id(s) have no image file in {image_dir}: "
                        f"{_list_rows(missing, 'image_id')}")
    frame["path"] = frame["path"].map(str)
    return frame


def source_of(raw: pd.DataFrame) -> pd.Series | None:
    """The image's source from the first of :data:`SOURCE_COLUMNS` the raw label file has (None: it has none);
    missing values become "unknown", so every image belongs to one source group."""
    column = next((c for c in SOURCE_COLUMNS if c in raw.columns), None)
    return None if column is None else raw[column].fillna("unknown").astype(str).str.strip()


def read_ham10000(root: str | os.PathLike | None = None) -> pd.DataFrame:
    """HAM10000 layout: ``HAM10000_metadata.csv``, ``images/<id>.jpg`` and optional ``masks/<id>_segmentation.png``.

    Works the same for the 600×450 originals and the 200×150 working copy.
    """
    root = resolve_data_dir(root)
    csv_path = root / HAM10000_METADATA
    frame = read_csv(csv_path)
    _require_columns(frame, HAM10000_COLUMNS, csv_path)
    for column in ("lesion_id", "image_id", "dx"):
        empty = frame[frame[column].isna() | (frame[column].astype(str).str.strip() == "")]
        if len(empty):
            raise DataError(f"{csv_path}: empty {column} in {_list_rows(empty, 'image_id')}")
    frame["dx"] = frame["dx"].str.strip().str.lower()
    unknown = frame[~frame["dx"].isin(HAM10000_DX)]
    if len(unknown):
        raise DataError(f"{csv_path}: unknown dx code(s) {sorted(unknown['dx'].unique())} "
                        f"(expected one of {', '.join(HAM10000_DX)}) in {_list_rows(unknown, 'image_id')}")
    _check_unique(frame, "image_id", csv_path)
    frame = attach_image_paths(frame, root / "images", csv_path)
    frame["label"] = dx_to_label(frame["dx"])
    mask_dir = root / "masks"
    masks = {p.name for p in mask_dir.iterdir()} if mask_dir.is_dir() else set()
    frame["mask_path"] = [str(mask_dir / f"{i}_segmentation.png") if f"{i}_segmentation.png" in masks else None
                          for i in frame["image_id"]]
    columns = ["image_id", "lesion_id", "dx", "label", "dx_type", "age", "sex", "localization", "path", "mask_path"]
    source = source_of(frame)
    if source is not None:
        frame["source"] = source
        columns.append("source")
    return frame[columns].reset_index(drop=True)


def read_isic_groundtruth(csv_path: str | os.PathLike, image_dir: str | os.PathLike,
                          metadata_csv: str | os.PathLike | None = None) -> pd.DataFrame:
    """ISIC 2018 Task 3 (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``) or ISIC 2019 (``…,AK,…,SCC,UNK``) one-hot truth.

    ``UNK`` rows (ISIC 2019) have no usable label: they are reported and skipped. ``lesion_id`` comes from the
    optional metadata CSV (ISIC 2019 ships one); without it each image counts as its own lesion, so a split of
    such data cannot be lesion-wise and says so in the log.
    """
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    frame = read_csv(csv_path)
    columns = ISIC2019_COLUMNS if "SCC" in frame.columns or "AK" in frame.columns else ISIC2018_COLUMNS
    _require_columns(frame, ("image", *columns), csv_path)
    onehot = frame[list(columns)].apply(pd.to_numeric, errors="coerce")
    bad = frame[~(onehot.isin([0, 1]).all(axis=1) & (onehot.sum(axis=1) == 1))]
    if len(bad):
        raise DataError(f"{csv_path}: {len(bad)} row(s) are not one-hot over {', '.join(columns)}: "
                        f"{_list_rows(bad, 'image')}")
    dx_column = onehot.idxmax(axis=1)
    unknown = dx_column == "UNK"
    if unknown.any():
        log.warning("%s: skipping %d UNK row(s) (no diagnosis): %s", csv_path, int(unknown.sum()),
                    _list_rows(frame[unknown], "image"))
    source = source_of(frame)
    frame = pd.DataFrame({"image_id": frame["image"].astype(str), "dx": dx_column.map(ISIC_TO_DX)})[~unknown]
    if source is not None:
        frame["source"] = source[~unknown]
    _check_unique(frame, "image_id", csv_path)
    if metadata_csv is not None:
        meta = read_csv(Path(metadata_csv)).rename(columns={"image": "image_id"})
        _require_columns(meta, ("image_id", "lesion_id"), Path(metadata_csv))
        frame = frame.merge(meta, on="image_id", how="left")
    if "lesion_id" not in frame.columns:
        frame["lesion_id"] = pd.NA
    no_lesion = frame["lesion_id"].isna()
    if no_lesion.any():
        log.warning("%s: %d image(s) have no lesion_id; each counts as its own lesion", csv_path, int(no_lesion.sum()))
        frame.loc[no_lesion, "lesion_id"] = frame.loc[no_lesion, "image_id"]
    frame = attach_image_paths(frame.reset_index(drop=True), image_dir, csv_path)
    frame["label"] = dx_to_label(frame["dx"])
    frame["mask_path"] = None
    front = ["image_id", "lesion_id", "dx", "label"]
    return frame[front + [c for c in frame.columns if c not in front]]


def read_labelled_csv(csv_path: str | os.PathLike, image_dir: str | os.PathLike) -> pd.DataFrame:
    """A user's own labelled images: ``image,label`` with label 1 = malignant, 0 = benign (``lesion_id`` optional)."""
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    frame = read_csv(csv_path)
    _require_columns(frame, ("image", "label"), csv_path)
    labels = pd.to_numeric(frame["label"], errors="coerce")
    bad = frame[~labels.isin([0, 1])]
    if len(bad):
        raise DataError(f"{csv_path}: label must be 0 (benign) or 1 (malignant); bad value(s) in "
                        f"{_list_rows(bad, 'image')}")
    # An image name may carry its extension ("a.jpg") or not ("a"); the id is the name without it.
    ids = frame["image"].astype(str).map(lambda n: Path(n).stem if Path(n).suffix.lower() in IMAGE_EXTENSIONS else n)
    out = pd.DataFrame({"image_id": ids, "lesion_id": frame.get("lesion_id", ids), "dx": pd.NA,
                        "label": labels.astype("int64")})
    source = source_of(frame)
    if source is not None:
        out["source"] = source
    out["lesion_id"] = out["lesion_id"].fillna(out["image_id"]).astype(str)
    _check_unique(out, "image_id", csv_path)
    out = attach_image_paths(out, image_dir, csv_path)
    out["mask_path"] = None
    return out


def read_dataset(source: str | os.PathLike | None = None, image_dir: str | os.PathLike | None = None,
                 metadata_csv: str | os.PathLike | None = None) -> pd.DataFrame:
    """One entry point for every format: a HAM10000 folder (or None: the resolved default), or a CSV whose header
    says which kind it is (ISIC 2018/2019 one-hot ground truth, or ``image,label``) with its image folder."""
    if source is None or Path(source).is_dir():
        return read_ham10000(source)
    csv_path = Path(source)
    if image_dir is None:
        raise DataError(f"{csv_path}: a label CSV needs its image folder (--images FOLDER)")
    header = read_csv(csv_path).columns
    if "MEL" in header:
        return read_isic_groundtruth(csv_path, image_dir, metadata_csv)
    if {"image", "label"} <= set(header):
        return read_labelled_csv(csv_path, image_dir)
    raise DataError(f"{csv_path}: unrecognised label file; expected HAM10000 metadata, ISIC 2018/2019 ground truth "
                    f"(image,MEL,NV,…) or image,label — found columns {', '.join(map(str, header))}")
