"""``train.py stress``: does the model *use* the corners, or the camera? Intervene on every image, see what moves.

For each image of a split and each intervention (``core.audit.interventions``), P(malignant) is predicted with the run's
own preprocessing, TTA and calibration on the clean and the intervened image, and the decision is read at the val
Youden threshold. An image's decision is **corner-dependent** when covering its corners with skin or adding a
dermoscope ring flips it, or moves p by at least ``min_delta``: evidence from behaviour, where a CAM's corner share
is only a hint (and, on the shipped model, a poor one: the summary says how poor).

Writes into the run directory ``stress_<split>.csv`` (image_id, intervention, p_clean, p, delta_p, flipped,
change, …) and ``stress_summary.json`` (one section per split).

``--suite acquisition`` (:func:`acquisition_split`) re-takes a sample of the split's images with the edits of
``core.audit.acquisition`` (another JPEG quality, resolution, focus, white balance, tone curve, another source's
colours) and reads each edit's flip rate against the neutral-edit floor: ``acquisition_<split>.csv`` and
``acquisition_summary.json``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from core import metrics, runs
from core.audit import acquisition
from core.audit.corners import dark_corner_score
from core.audit.interventions import (
    CORNER_CHECK,
    CORNER_INTERVENTIONS,
    DEFAULT_MIN_DELTA,
    INTERVENTIONS,
    corner_delta_p,
    corner_dependent,
    create_intervention,
    image_key,
)
from core.config import RunConfig
from core.images import open_rgb
from core.inference import model_view_masks
from core.run import Run, load
from core.run_files import AcquisitionSection, StressSection, parse
from core.runs import RunError, read_attention, read_metrics
from core.transforms import resize_transform

# Images per forward for the stress test's scorer. On 2 CPU cores a forward of 32 images (16 × 2 flip views) runs
# ~1.8× faster per image than evaluation's 128: the activations of a big batch fall out of cache.
STRESS_BATCH = 32
Scorer = Callable[[torch.Tensor], np.ndarray]  # uint8 images (N, 3, H, W) → P(malignant) (N,)


def run_scorer(run: Run) -> Scorer:
    """P(malignant) of a run exactly as evaluation computes it (preprocessing, TTA views, calibration), in the
    stress test's batches."""
    return lambda images: run.predict(images, batch_size=STRESS_BATCH).probability


def intervened_probabilities(score: Scorer, images: torch.Tensor, masks: Sequence[np.ndarray | None] | None,
                             keys: Sequence[int], names: Sequence[str], seed: int = 0,
                             chunk: int = 64) -> dict[str, np.ndarray]:
    """``{"clean": p, name: p, …}`` for uint8 ``images`` (``masks``: one lesion mask or None per image, or None
    for none at all): each chunk's clean and intervened copies go through the network as one batch."""
    masks = [None] * len(images) if masks is None else list(masks)
    keys = list(keys)
    interventions = [create_intervention(name, seed) for name in names]
    out: dict[str, list[np.ndarray]] = {name: [] for name in ["clean", *names]}
    for start in tqdm(range(0, len(images), chunk), desc="stress test", disable=None):
        part = slice(start, start + chunk)
        batch, part_masks, part_keys = images[part], masks[part], keys[part]
        versions = [batch] + [intervention(batch, part_masks, part_keys) for intervention in interventions]
        p = score(torch.cat(versions)).reshape(len(versions), len(batch))
        for name, row in zip(out, p):
            out[name].append(row)
    return {name: np.concatenate(parts) for name, parts in out.items()}


def stress_table(frame: pd.DataFrame, probabilities: dict[str, np.ndarray], threshold: float) -> pd.DataFrame:
    """One row per image × intervention: p before and after, Δp and whether the decision at ``threshold`` flipped
    (``change``: ``to_malignant``, ``to_benign`` or ``none``)."""
    clean = probabilities["clean"]
    base = frame[[c for c in ("image_id", "lesion_id", "dx", "label", "source") if c in frame]].reset_index(drop=True)
    parts = []
    for name, p in probabilities.items():
        if name == "clean":
            continue
        before, after = clean >= threshold, p >= threshold
        parts.append(base.assign(intervention=name, p_clean=clean, p=p, delta_p=p - clean, flipped=before != after,
                                 change=np.where(after & ~before, "to_malignant",
                                                 np.where(before & ~after, "to_benign", "none"))))
    return pd.concat(parts, ignore_index=True)


def wide(table: pd.DataFrame) -> pd.DataFrame:
    """The long stress table as one row per image: ``p_clean`` and ``p_<intervention>`` columns."""
    pivot = table.pivot(index="image_id", columns="intervention", values="p")
    pivot.columns = [f"p_{name}" for name in pivot.columns]
    clean = table.drop_duplicates("image_id").set_index("image_id")["p_clean"]
    return pivot.assign(p_clean=clean).reset_index()


def image_flags(table: pd.DataFrame, threshold: float, min_delta: float = DEFAULT_MIN_DELTA) -> pd.DataFrame:
    """Per image: ``corner_dependent`` (:func:`corner_dependent`) and ``corner_delta_p``, the largest |Δp| over the
    corner check."""
    per_image = wide(table)
    checked = {name: per_image[f"p_{name}"].to_numpy() for name in CORNER_CHECK}
    per_image["corner_dependent"] = corner_dependent(per_image["p_clean"].to_numpy(), checked, threshold, min_delta)
    per_image["corner_delta_p"] = corner_delta_p(per_image["p_clean"].to_numpy(), checked)
    return per_image


def _at_threshold(labels: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    at = metrics.binary_metrics(labels, p, threshold)
    return {"sensitivity": at["sensitivity"], "specificity": at["specificity"]}


def summarize(table: pd.DataFrame, threshold: float, min_delta: float = DEFAULT_MIN_DELTA,
              attention: pd.DataFrame | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per intervention: AUROC (bootstrap CI) and its paired difference from the clean images (lesions resampled
    whole), mean Δp and |Δp|, the share of decisions flipped each way, sensitivity and specificity; then the
    corner-dependence flag and, given the Grad-CAM ``attention`` table, how well its corner share predicts it."""
    first = table.drop_duplicates("image_id")
    labels, clean = first["label"].to_numpy(), first["p_clean"].to_numpy()
    groups = first["lesion_id"].to_numpy() if "lesion_id" in first else None
    both = 0 < labels.sum() < len(labels)
    report: dict = {"n": int(len(first)), "threshold_youden_val": threshold,
                    "clean": {"auroc": metrics.auroc(labels, clean),
                              "auroc_ci": list(metrics.bootstrap_auroc_ci(labels, clean, seed=seed)),
                              **_at_threshold(labels, clean, threshold)},
                    "interventions": {}}
    for name, part in table.groupby("intervention", sort=False):
        part = part.set_index("image_id").loc[first["image_id"]]
        p = part["p"].to_numpy()
        gain = metrics.paired_auroc_gain(labels, p, clean, groups, n_boot=n_boot, alpha=0.05, seed=seed) \
            if both else (float("nan"),) * 3
        report["interventions"][name] = {
            "corner": name in CORNER_INTERVENTIONS,
            "auroc": metrics.auroc(labels, p), "auroc_ci": list(metrics.bootstrap_auroc_ci(labels, p, seed=seed)),
            "auroc_change": gain[0], "auroc_change_ci": [gain[1], gain[2]],
            "mean_delta_p": float(part["delta_p"].mean()), "mean_abs_delta_p": float(part["delta_p"].abs().mean()),
            "flipped": float(part["flipped"].mean()),
            "to_malignant": float((part["change"] == "to_malignant").mean()),
            "to_benign": float((part["change"] == "to_benign").mean()),
            **_at_threshold(labels, p, threshold)}
    flags = image_flags(table, threshold, min_delta)
    report["corner_dependent"] = {
        "rule": f"the decision at the val Youden threshold flips, or |Δp| >= {min_delta}, under "
                + " or ".join(CORNER_CHECK),
        "min_delta": min_delta, "checked": list(CORNER_CHECK),
        "n": int(flags["corner_dependent"].sum()), "rate": float(flags["corner_dependent"].mean())}
    if attention is not None:
        report["cam_validation"] = cam_validation(table, flags, attention)
    return report


def cam_validation(table: pd.DataFrame, flags: pd.DataFrame, attention: pd.DataFrame) -> dict:
    """Does the Grad-CAM's corner share predict what the interventions show? Spearman ρ of ``corner_fraction``
    with |Δp| and its AUROC for "the decision flips", per corner intervention and for the corner-dependence flag
    (0.5 = chance; below 0.5 the CAM ranks the dependent images *less* corner-focused than the rest)."""
    cam = attention.set_index("image_id")["corner_fraction"]
    out: dict = {"score": "corner_fraction (Grad-CAM share in the four corner squares)"}
    for name, part in table.groupby("intervention", sort=False):
        if name not in CORNER_INTERVENTIONS:
            continue
        fraction = cam.reindex(part["image_id"]).to_numpy()
        keep = np.isfinite(fraction)
        flipped = part["flipped"].to_numpy()[keep].astype(int)
        out[name] = {"spearman_abs_delta_p": float(pd.Series(fraction[keep]).corr(
                         pd.Series(np.abs(part["delta_p"].to_numpy()[keep])), method="spearman")),
                     "auroc_flipped": metrics.auroc(flipped, fraction[keep]) if 0 < flipped.sum() < len(flipped)
                     else float("nan"),
                     "cam_flag_among_flipped": int(attention.set_index("image_id")["flag"].reindex(
                         part["image_id"][part["flipped"]]).astype(bool).sum()),
                     "flipped": int(flipped.sum())}
    fraction = cam.reindex(flags["image_id"]).to_numpy()
    keep = np.isfinite(fraction)
    dependent = flags["corner_dependent"].to_numpy()[keep].astype(int)
    out["corner_dependent"] = {
        "auroc": metrics.auroc(dependent, fraction[keep]) if 0 < dependent.sum() < len(dependent) else float("nan"),
        "spearman_corner_delta_p": float(pd.Series(fraction[keep]).corr(
            pd.Series(flags["corner_delta_p"].to_numpy()[keep]), method="spearman"))}
    return out


def dark_corners_by_class(frame: pd.DataFrame, quantiles: int = 5) -> dict:
    """Why a model may learn the ring: how dark the corners are (``dark_corner_score``) by diagnosis, and the
    malignant share in each quantile of darkness, on the training split."""
    by_dx = frame.groupby("dx")["dark_corner_score"].agg(["size", "mean", "median"])
    bins = pd.qcut(frame["dark_corner_score"], quantiles, duplicates="drop")
    by_bin = frame.groupby(bins, observed=True).agg(n=("label", "size"), malignant=("label", "mean"),
                                                    low=("dark_corner_score", "min"),
                                                    high=("dark_corner_score", "max"))
    by_label = frame.groupby("label")["dark_corner_score"].agg(["mean", "median"])
    return {"n": int(len(frame)),
            "by_dx": {dx: {"n": int(r["size"]), "mean": float(r["mean"]), "median": float(r["median"])}
                      for dx, r in by_dx.iterrows()},
            "by_label": {("malignant" if label else "benign"): {"mean": float(r["mean"]), "median": float(r["median"])}
                         for label, r in by_label.iterrows()},
            "malignant_share_by_quantile": [{"low": float(r["low"]), "high": float(r["high"]), "n": int(r["n"]),
                                             "malignant": float(r["malignant"])} for _, r in by_bin.iterrows()],
            "auroc_dark_corners_for_label": metrics.auroc(frame["label"], (frame["dark_corner_score"].clip(-1, 1) + 1)
                                                          / 2)}


def _subset(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """``limit`` images drawn at random (in split order), so a quick look still holds both classes; all without."""
    if not limit or limit >= len(frame):
        return frame
    return frame.sample(n=limit, random_state=seed).sort_index().reset_index(drop=True)


def stress_split(run_dir: str | Path, split: str = "test", names: Sequence[str] | None = None,
                 limit: int | None = None, seed: int = 0, min_delta: float = DEFAULT_MIN_DELTA,
                 device_name: str = "auto", train_corners: bool = True) -> StressSection:
    """The stress test of one split of a run: writes ``stress_<split>.csv`` and this split's section of
    ``stress_summary.json`` (the other splits' sections are kept). Returns that section."""
    run_dir = Path(run_dir)
    names = list(INTERVENTIONS) if names is None else list(names)
    missing = [name for name in CORNER_CHECK if name not in names]
    if missing:
        raise ValueError(f"the corner-dependence flag needs {', '.join(missing)}; add them to --interventions")
    for name in names:
        create_intervention(name)  # unknown names refused before any work
    threshold = read_metrics(run_dir).thresholds["youden"]
    run = load(run_dir, device_name)
    score, cfg, frames = run_scorer(run), run.config, run.splits()
    frame = _subset(frames[split], limit, seed)
    images = run.load_images(frame["path"].tolist())
    masks = model_view_masks(frame["mask_path"].tolist(), cfg.input_size, cfg.crop)
    probabilities = intervened_probabilities(score, images, masks, [image_key(i) for i in frame["image_id"]], names,
                                             seed)
    table = stress_table(frame, probabilities, threshold)
    try:
        attention = read_attention(run_dir, split)
    except RunError:  # no Grad-CAM audit of this split: no CAM validation
        attention = None
    section = summarize(table, threshold, min_delta, attention, seed=seed)
    section |= {"seed": seed, "interventions_run": {name: repr(create_intervention(name, seed)) for name in names}}
    if train_corners:
        train = _subset(frames["train"], limit, seed)
        views = run.load_images(train["path"].tolist()).permute(0, 2, 3, 1).numpy()
        section["dark_corners_train"] = dark_corners_by_class(
            train.assign(dark_corner_score=[dark_corner_score(view) for view in views]))
    typed = parse(StressSection, section)
    runs.write_csv(run_dir / runs.stress_file(split), table)
    runs.write_stress_summary(run_dir, split, typed)
    return typed


# Images per split of the acquisition stress test. Each image goes through the network 1 + 14 times (the clean
# image, 11 edits, a colour match to each of the 3 other sources), 2 flip views each: 500 images take ~6 min on 2 CPU
# cores, the stress test's budget. The flip rates carry exact 95 % intervals; --limit 0 takes the whole split.
ACQUISITION_LIMIT = 500
COLOUR_SAMPLE = 200  # training images per source for its typical colours


def training_colours(train: pd.DataFrame, seed: int = 0) -> dict[str, acquisition.ColourStats]:
    """Each source's typical colours, from up to :data:`COLOUR_SAMPLE` of its training images ({} without sources)."""
    if "source" not in train or train["source"].isna().all():
        return {}
    sample = train.dropna(subset=["source"]).sample(frac=1, random_state=seed).groupby("source").head(COLOUR_SAMPLE)
    return acquisition.source_colours(load_originals(sample["path"].tolist()), sample["source"].astype(str).tolist())


def load_originals(paths: list[str], workers: int = 4) -> list[np.ndarray]:
    """The files' own pixels (uint8 RGB, their own size): acquisition edits act before the crop and resize."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda path: np.asarray(open_rgb(path)), paths))


def edited_probabilities(score: Scorer, originals: Sequence[np.ndarray], sources: Sequence[str | None],
                         edits: Sequence[acquisition.AcquisitionEdit], cfg: RunConfig,
                         chunk: int = 32) -> dict[str, np.ndarray]:
    """``{"clean": p, edit name: p, …}``: each image and its edited copies cropped and resized as the run's own
    preprocessing does, and scored together per chunk. NaN where an edit does not apply (a source's own colours)."""
    resize = resize_transform(cfg.input_size, cfg.crop)
    out = {name: np.full(len(originals), np.nan) for name in ["clean", *(edit.name for edit in edits)]}
    for start in tqdm(range(0, len(originals), chunk), desc="acquisition stress test", disable=None):
        views, slots = [], []
        for k in range(start, min(start + chunk, len(originals))):
            for edit in [None, *(e for e in edits if e.applies_to(sources[k]))]:
                views.append(acquisition.retaken_view(originals[k], edit, sources[k], resize))
                slots.append(("clean" if edit is None else edit.name, k))
        for (name, k), p in zip(slots, score(torch.stack(views))):
            out[name][k] = p
    return out


def summarize_acquisition(table: pd.DataFrame, threshold: float, edits: Sequence[acquisition.AcquisitionEdit],
                          n_boot: int = 1000, seed: int = 0) -> dict:
    """Per edit: flip rate (exact 95 % CI) and its multiple of the **floor** (the largest flip rate of the neutral
    edits), flips each way, Δp, AUROC with its paired lesion-grouped change, and flips per source of the image;
    then whether every camera edit stays within :data:`~core.audit.acquisition.FLOOR_FACTOR` × the floor."""
    first = table.drop_duplicates("image_id")
    labels, clean = first["label"].to_numpy(), first["p_clean"].to_numpy()
    report: dict = {"n": int(len(first)), "threshold_youden_val": threshold,
                    "clean": {"auroc": metrics.auroc(labels, clean), **_at_threshold(labels, clean, threshold)},
                    "edits": {}}
    about = {edit.name: edit for edit in edits}
    for name, part in table.groupby("intervention", sort=False):
        y, p, before = part["label"].to_numpy(), part["p"].to_numpy(), part["p_clean"].to_numpy()
        flips = int(part["flipped"].sum())
        gain = metrics.paired_auroc_gain(y, p, before, part["lesion_id"].to_numpy() if "lesion_id" in part else None,
                                         n_boot=n_boot, alpha=0.05, seed=seed) \
            if 0 < y.sum() < len(y) else (float("nan"),) * 3
        report["edits"][name] = {
            "kind": about[name].kind, "what": about[name].what, "n": int(len(part)),
            "flipped": flips / len(part), "flipped_ci": list(metrics.exact_interval(flips, len(part))),
            "to_malignant": float((part["change"] == "to_malignant").mean()),
            "to_benign": float((part["change"] == "to_benign").mean()),
            "mean_delta_p": float(part["delta_p"].mean()), "mean_abs_delta_p": float(part["delta_p"].abs().mean()),
            "auroc": metrics.auroc(y, p) if 0 < y.sum() < len(y) else float("nan"),
            "auroc_change": gain[0], "auroc_change_ci": [gain[1], gain[2]],
            **_at_threshold(y, p, threshold),
            "flipped_by_source": ({str(s): float(g["flipped"].mean()) for s, g in part.groupby("source")}
                                  if "source" in part else {})}
    rows = report["edits"]
    neutral = [name for name, row in rows.items() if row["kind"] == "neutral"]
    camera = [name for name, row in rows.items() if row["kind"] == "camera"]
    # Per image and edit: flipped or not, NaN where the edit was not scored (a source's own colours).
    flipped = table.pivot(index="image_id", columns="intervention", values="flipped").astype(float)
    for name in camera:  # each camera edit against the neutral edits' flips on the *same* images
        scored = flipped[name].notna()
        floor = max((float(flipped.loc[scored, n].mean()) for n in neutral), default=float("nan"))
        rows[name] |= {"floor": floor, "times_floor": rows[name]["flipped"] / floor if floor > 0 else None,
                       "holds": bool(rows[name]["flipped"] <= acquisition.FLOOR_FACTOR * floor)}
    floor = max((rows[name]["flipped"] for name in neutral), default=float("nan"))
    report["floor"] = {"rule": "the largest flip rate of the neutral edits, on the images each edit was scored on",
                       "edits": neutral, "rate": floor}
    failing = [name for name in camera if not rows[name]["holds"]]

    def severity(name: str) -> float:
        times = rows[name]["times_floor"]
        return times if times is not None else (float("inf") if rows[name]["flipped"] > 0 else 0.0)

    report["holds"] = {"rule": f"every camera edit flips at most {acquisition.FLOOR_FACTOR:g} × the floor of its "
                               "images (a point estimate: one flip in 500 is 0.2 %)",
                       "factor": acquisition.FLOOR_FACTOR, "limit": acquisition.FLOOR_FACTOR * floor,
                       "failing": failing, "passed": bool(neutral) and not failing,
                       "worst": max(camera, key=severity) if camera else None}
    # A union over 12 camera edits grows by itself against one over 3 neutral ones: the mean per edit beside it.
    report["decisions"] = {
        "changed_by_a_camera_edit": float((flipped[camera] == 1).any(axis=1).mean()) if camera else float("nan"),
        "changed_by_a_neutral_edit": float((flipped[neutral] == 1).any(axis=1).mean()) if neutral else float("nan"),
        "mean_camera_edit": float(np.mean([rows[n]["flipped"] for n in camera])) if camera else float("nan"),
        "mean_neutral_edit": float(np.mean([rows[n]["flipped"] for n in neutral])) if neutral else float("nan")}
    return report


def acquisition_split(run_dir: str | Path, split: str = "test", names: Sequence[str] | None = None,
                      limit: int | None = ACQUISITION_LIMIT, seed: int = 0,
                      device_name: str = "auto") -> AcquisitionSection:
    """The acquisition stress test of a sample of one split (``limit`` images, 0 or None: all): writes
    ``acquisition_<split>.csv`` and this split's section of ``acquisition_summary.json``. Returns that section."""
    run_dir = Path(run_dir)
    threshold = read_metrics(run_dir).thresholds["youden"]
    run = load(run_dir, device_name)
    score, cfg, frames = run_scorer(run), run.config, run.splits()
    wants_colours = names is None or any(name.startswith(acquisition.COLOUR_PREFIX) for name in names)
    colours = training_colours(frames["train"], seed) if wants_colours else {}
    names = acquisition.default_edits(list(colours)) if names is None else list(names)
    edits = acquisition.create_edits(names, colours)
    if not any(edit.kind == "neutral" for edit in edits):
        raise ValueError(f"the floor needs at least one neutral edit ({', '.join(acquisition.NEUTRAL_EDITS)})")
    frame = _subset(frames[split], limit, seed)
    sources = ([None if pd.isna(s) else str(s) for s in frame["source"]] if "source" in frame
               else [None] * len(frame))
    probabilities = edited_probabilities(score, load_originals(frame["path"].tolist()), sources, edits, cfg)
    table = stress_table(frame, probabilities, threshold).dropna(subset=["p"]).reset_index(drop=True)
    section = summarize_acquisition(table, threshold, edits, seed=seed)
    section |= {"seed": seed, "limit": limit or None, "split_size": int(len(frames[split])),
                "edits_run": {edit.name: repr(edit) for edit in edits},
                "source_colours": {source: vars(stats) for source, stats in colours.items()}}
    typed = parse(AcquisitionSection, section)
    runs.write_csv(run_dir / runs.acquisition_file(split), table)
    runs.write_acquisition_summary(run_dir, split, typed)
    return typed
