"""``train.py explain``: Grad-CAM and attention scores for every image of a split, and what they add up to.

Each CAM explains the decision the model made for that image (malignant or benign at the Youden threshold chosen
on val); the deletion checks perturb what that CAM points at.

Writes into the run directory ``attention_<split>.csv`` (image_id, label, dx, probability, correct, every score,
flag, deletion changes), ``cams_<split>.npz`` (CAMs at 56×56, or 42×56 for the 4:3 frame crop,
uint8, with their image ids) and ``attention_summary.json``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from core import metrics, runs
from core.audit import corners, explain
from core.inference import model_view_masks
from core.run import load
from core.run_files import AttentionSummary, parse

CAM_STORE_SIZE = 56
# Tschandl et al., Nat. Med. 2020: mean background/lesion attention ratio on HAM10000 (0.48 for akiec, 0.32 else).
TSCHANDL_RATIO = {"akiec": 0.48, "bcc": 0.32, "bkl": 0.32, "df": 0.32, "mel": 0.32, "nv": 0.32, "vasc": 0.32}


def explain_split(run_dir: str | Path, split: str = "test", method: str = "gradcam", limit: int | None = None,
                  batch_size: int = 16, corner_threshold: float = 0.5,
                  device_name: str = "auto") -> AttentionSummary:
    run_dir = Path(run_dir)
    run = load(run_dir, device_name)
    cfg, model, preprocess = run.config, run.model, run.preprocess
    frame = run.splits()[split]
    if limit:
        frame = frame.head(limit).reset_index(drop=True)
    predictions = runs.read_predictions(run_dir, split)
    frame = frame.merge(predictions[["image_id", "probability"]], on="image_id", how="left", validate="one_to_one")
    threshold = runs.read_metrics(run_dir).thresholds["youden"]
    images = run.load_images(frame["path"].tolist())
    masks = model_view_masks(frame["mask_path"].tolist(), cfg.input_size, cfg.crop)
    rows, store = [], []
    height, width = images.shape[-2:]  # stored with the view's aspect, the longer side CAM_STORE_SIZE
    store_shape = tuple(round(CAM_STORE_SIZE * side / max(height, width)) for side in (height, width))
    for start in tqdm(range(0, len(frame), batch_size), desc=f"Grad-CAM {split}", disable=None):
        batch = images[start:start + batch_size]
        inputs = preprocess(batch)
        # Explain the decision the model made (at the val-chosen threshold), as Tschandl et al. did.
        predicted = (frame["probability"][start:start + len(batch)] >= threshold).astype(int).tolist()
        cams = explain.compute_cam(model, inputs, method, predicted)
        blur = explain.deletion_change(model, inputs, cams, 0.2, "blur")
        remove = explain.deletion_change(model, inputs, cams, 0.2, "remove")
        # Baseline: blur a region of the same size and a realistic shape that is *not* this image's attention
        # (the next image's CAM). If attended pixels matter, blurring them must move p more than this does.
        baseline = explain.deletion_change(model, inputs, np.roll(cams, 1, axis=0), 0.2, "blur")
        for k, cam in enumerate(cams):
            i = start + k
            scores = explain.attention_scores(cam, masks[i], corner_threshold)
            rows.append({"image_id": frame["image_id"][i], **scores,
                         "dark_corner_score": corners.dark_corner_score(batch[k].permute(1, 2, 0).numpy()),
                         "deletion_blur_change": float(blur[k]), "deletion_remove_change": float(remove[k]),
                         "deletion_blur_change_other_cam": float(baseline[k])})
            small = torch.nn.functional.interpolate(torch.from_numpy(cam)[None, None], size=store_shape,
                                                    mode="area")[0, 0].numpy()
            store.append(np.round(small * 255).astype(np.uint8))
    table = frame[["image_id", "lesion_id", "dx", "label", "probability"]].merge(pd.DataFrame(rows), on="image_id")
    table["correct"] = (table["probability"] >= threshold).astype(int) == table["label"]
    runs.write_csv(run_dir / runs.attention_file(split), table, float_format="%.5f")
    runs.write_cam_store(run_dir / runs.cams_file(split), table["image_id"].to_numpy(dtype=str), np.stack(store))
    summary = parse(AttentionSummary, summarize(table, threshold, method, corner_threshold))
    runs.write_attention_summary(run_dir, summary)
    return summary


def summarize(table: pd.DataFrame, threshold: float, method: str, corner_threshold: float) -> dict:
    """The audit in numbers: how often attention is corner-focused, whether that goes with errors, dark corners or
    worse AUROC, whether removing the attended region moves the score, and lesion vs background attention."""
    flagged = table["flag"].astype(bool)

    def rate(part: pd.DataFrame) -> dict:
        return {"n": int(len(part)), "flagged": int(part["flag"].sum()),
                "rate": float(part["flag"].mean()) if len(part) else float("nan")}

    def group_auroc(part: pd.DataFrame) -> float:
        return metrics.auroc(part["label"], part["probability"]) if part["label"].nunique() == 2 else float("nan")

    # inf where a CAM puts nothing on the lesion: the median is robust to it, the mean is over finite values.
    ratio = table.replace([np.inf], np.nan).groupby("dx")["background_lesion_ratio"]
    ratio_median = table.groupby("dx")["background_lesion_ratio"].median()
    return {
        "method": method, "threshold_youden_val": threshold,
        "corner_flag_rule": f"corner_fraction >= {corner_threshold}",
        "n": int(len(table)), "flagged": rate(table),
        "by_correctness": {"correct": rate(table[table["correct"]]), "incorrect": rate(table[~table["correct"]])},
        "by_dx": {dx: rate(part) for dx, part in table.groupby("dx")},
        "auroc": {"flagged": group_auroc(table[flagged]), "unflagged": group_auroc(table[~flagged])},
        "mean_corner_fraction": float(table["corner_fraction"].mean()),
        "corner_vs_dark_corners_spearman": float(table["corner_fraction"].corr(table["dark_corner_score"],
                                                                              method="spearman")),
        "deletion_top20_change": {
            group: {"blur_mean": float(part["deletion_blur_change"].mean()),
                    "blur_mean_abs": float(part["deletion_blur_change"].abs().mean()),
                    "remove_mean": float(part["deletion_remove_change"].mean()),
                    "remove_mean_abs": float(part["deletion_remove_change"].abs().mean()),
                    "blur_other_cam_mean_abs": float(part["deletion_blur_change_other_cam"].abs().mean())}
            for group, part in (("flagged", table[flagged]), ("unflagged", table[~flagged]))},
        "background_lesion_ratio_by_dx": {dx: {"median": float(ratio_median[dx]), "mean_finite": float(value),
                                               "tschandl_2020": TSCHANDL_RATIO.get(dx)}
                                          for dx, value in ratio.mean().items()},
        "mean_outside_lesion_fraction": float(table["outside_lesion_fraction"].mean()),
    }
