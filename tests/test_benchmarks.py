"""The benchmark scripts run and report what RESULTS.md quotes (tiny settings: their numbers are measured elsewhere,
on an idle machine, never in a test)."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import (
    bench_predict,
    bench_stress,
    bench_train,
    cam_vs_stress,
    corner_rule,
    corner_screen,
    ensemble_search,
    ood_scores,
    source_rule,
)
from core.config import RunConfig
from core.data import PROJECT_ROOT
from tests.helpers import run_main


@pytest.fixture(autouse=True)
def in_the_project_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scripts' defaults (``models/default``) are relative to the project root, as their documented commands."""
    monkeypatch.chdir(PROJECT_ROOT)


def test_bench_predict_reports_a_median(ham_dir: Path) -> None:
    code, out, err = run_main(bench_predict.main, "--run", "models/default", "--repeats", "3")
    assert code == 0, err
    median = re.search(r"median ([\d.]+) ms, p90 ([\d.]+) ms over 3 calls", out)
    assert median and 0 < float(median[1]) <= float(median[2])


def test_bench_predict_refuses_compile_with_explain() -> None:
    code, _, err = run_main(bench_predict.main, "--compile", "--explain")
    assert code == 2 and "Grad-CAM hooks need the eager modules" in err


def test_bench_train_reports_throughput_and_its_parts() -> None:
    code, out, err = run_main(bench_train.main, "--input-size", "64", "--batch-size", "4", "--repeats", "2",
                              "--device", "cpu")
    assert code == 0, err
    found = re.search(r"batch 4, CPU, \d+ threads: (\d+) img/s .* augment\+normalise ([\d.]+) ms", out)
    assert found and int(found[1]) > 0 and float(found[2]) > 0


@pytest.mark.parametrize("script", ["bench_predict.py", "bench_train.py", "bench_dashboard.py", "bench_stress.py",
                                    "cam_vs_stress.py", "corner_rule.py", "ensemble_search.py",
                                    "load_dashboard.py"])
def test_benchmark_scripts_document_their_command(script: str) -> None:
    """Each script's docstring holds the command that runs it, and is its ``--help`` text (``description=__doc__``;
    one real ``--help`` run is in the OOD benchmark's test): read from the source, without starting Python and
    torch seven times."""
    source = (PROJECT_ROOT / "benchmarks" / script).read_text()
    assert f"benchmarks/{script}" in ast.get_docstring(ast.parse(source))
    assert "ArgumentParser(description=__doc__" in source


def test_gpu_session_parses_and_names_its_modes() -> None:
    """The GPU script runs only on a lent machine (its CPU smoke test, ``QUICK=1``, takes 12 minutes): here, that
    bash parses it and that a wrong mode is refused with the list of modes, issue 15's ``corner`` among them."""
    script = PROJECT_ROOT / "benchmarks" / "gpu_session.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    done = subprocess.run(["bash", str(script), "nonsense"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage:" in done.stderr and "|corner" in done.stderr


def test_ood_scores_compares_the_scores_and_dimensions(ham_dir: Path) -> None:
    code, out, err = run_main(ood_scores.main, "--limit", "60", "--altered", "4")
    assert code == 0, err
    assert "answered confidently" in out
    for method in ("knn k=10", "mahalanobis"):
        assert re.search(rf"{method}\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+", out), out
    code, help_text, _ = run_main(ood_scores.main, "--help")
    assert code == 0 and "python -m benchmarks.ood_scores" in help_text


def _fake_runs(n: int = 600) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
    """Per-view probabilities of three runs on one val/test set: ``strong`` separates the classes far better; the
    two weak runs make nearly the same mistakes, so no subset of them is really better than another."""
    rng = np.random.default_rng(0)
    labels = (rng.random(n) < 0.2).astype(int)
    shared = rng.random(n)
    runs = {}
    for name, signal in (("weak_a", 0.15), ("weak_b", 0.15), ("strong", 0.6)):
        views = np.clip(signal * labels + 0.7 * shared + 0.01 * rng.random((4, n)), 0, 1)
        runs[name] = {"val": views, "test": views, "val_labels": labels, "test_labels": labels}
    return runs, np.arange(n) // 2  # two images per lesion


def test_selection_rule_keeps_limits_and_needs_a_real_gain() -> None:
    runs, lesions = _fake_runs()
    table = ensemble_search.search(runs, {"weak_a": 7.0, "weak_b": 7.0, "strong": 20.0}, [1, 2])
    assert len(table) == 7 * 2 and table["val_auroc"].is_monotonic_decreasing
    # the strong run fits the limits and clearly beats a pair of weak ones: it replaces them
    decision = ensemble_search.apply_rule(table, runs, lesions, ("weak_a", "weak_b"), 2, max_forwards=4, max_mb=25)
    assert decision["best"].split(" + ") == ["strong"] and decision["replace"] and decision["low"] > 0
    # too big for the limit: only weak subsets are eligible, and their differences are noise → keep the incumbent
    decision = ensemble_search.apply_rule(table, runs, lesions, ("weak_a",), 2, max_forwards=4, max_mb=15)
    assert "strong" not in decision["best"] and decision["low"] < 0 < decision["high"] and not decision["replace"]
    with pytest.raises(SystemExit, match="no subset"):
        ensemble_search.apply_rule(table, runs, lesions, ("weak_a",), 2, max_forwards=0, max_mb=25)


def test_search_never_mixes_runs_one_ensemble_cannot_hold() -> None:
    """A square-crop and a frame-crop run take different input tensors: ``train.py ensemble`` refuses the pair, so
    the search must not offer it, however well it scores."""
    runs, _ = _fake_runs()
    configs = {"weak_a": RunConfig(), "weak_b": RunConfig(crop="frame"), "strong": RunConfig()}
    compatible = ensemble_search.compatible_pairs(configs)
    assert ("weak_a", "strong") in compatible and ("weak_a", "weak_b") not in compatible
    table = ensemble_search.search(runs, {"weak_a": 7.0, "weak_b": 7.0, "strong": 20.0}, [1], compatible)
    assert sorted(table["members"]) == ["strong", "weak_a", "weak_a + strong", "weak_b"]


def test_ensemble_search_wants_the_whole_rule() -> None:
    code, _, err = run_main(ensemble_search.main, "--runs", "models/default", "--max-forwards", "4")
    assert code == 2 and "needs --max-forwards, --max-mb and --incumbent together" in err


def _candidate(name: str, val: pd.DataFrame, flips: float | dict[str, float] = 0.01, forwards: int = 4,
               megabytes: float = 16.6) -> corner_rule.Candidate:
    shares = flips if isinstance(flips, dict) else dict.fromkeys(("vignette_light", "vignette", "vignette_strong",
                                                                  "corner_fill"), flips)
    return corner_rule.Candidate(Path(name), shares, forwards, megabytes, val, test_auroc=float("nan"))


def _val_predictions(signal: float, seed: int, n: int = 600) -> pd.DataFrame:
    """Val predictions of one model: ``signal`` separates the classes, lesions hold two images each."""
    rng = np.random.default_rng(0)
    labels = (rng.random(n) < 0.2).astype(int)
    noise = np.random.default_rng(seed).random(n)
    return pd.DataFrame({"image_id": [f"ISIC_{i}" for i in range(n)], "lesion_id": [f"HAM_{i // 2}" for i in range(n)],
                         "label": labels, "probability": np.clip(signal * labels + noise, 0, 1)})


def test_corner_rule_wants_every_corner_flip_under_3_percent_then_no_loss_on_val() -> None:
    incumbent = _val_predictions(0.5, seed=1)
    leaning = _candidate("leaning", _val_predictions(0.9, seed=2), flips={"vignette_light": 0.0, "vignette": 0.01,
                                                                          "vignette_strong": 0.031, "corner_fill": 0.0})
    too_slow = _candidate("too_slow", _val_predictions(0.9, seed=3), forwards=8)
    robust_same = _candidate("robust_same", incumbent)
    robust_worse = _candidate("robust_worse", _val_predictions(0.1, seed=4))
    assert leaning.failures() == ["vignette_strong flips 3.1% > 3%"] and too_slow.failures() == ["8 network passes > 4"]
    # the best val AUROC among those that qualify; no loss against the incumbent → it replaces it
    decision = corner_rule.apply_corner_rule([leaning, too_slow, robust_worse, robust_same], incumbent)
    assert decision["best"] is robust_same and decision["gain"] == 0 and decision["replace"]
    # the only qualifying one is clearly worse on val: the incumbent stays
    decision = corner_rule.apply_corner_rule([leaning, robust_worse], incumbent)
    assert decision["best"] is robust_worse and decision["high"] < 0 and not decision["replace"]
    assert corner_rule.apply_corner_rule([leaning, too_slow], incumbent) == {"best": None, "replace": False}
    with pytest.raises(ValueError, match="different images"):
        corner_rule.paired_gain(incumbent.iloc[:-2], incumbent)


def test_corner_screen_averages_members_then_reads_flips_at_each_combination_s_own_threshold() -> None:
    """``blind`` never moves under a corner intervention (a masked member), ``leaning`` moves every decision near
    its threshold: alone it fails step 1, averaged with ``blind`` its moves halve; limits and incompatible pairs are
    left out, and the flags follow the rule's constants."""
    val = _val_predictions(0.5, seed=1)
    labels = val["label"].to_numpy()
    rng = np.random.default_rng(5)
    clean = np.clip(0.6 * labels + rng.random(len(val)), 0, 1)
    probabilities = {"blind": {v: np.stack([clean] * 2) for v in corner_screen.VERSIONS},
                     "leaning": {v: np.stack([clean + (0.0 if v == "clean" else 0.05)] * 2)
                                 for v in corner_screen.VERSIONS},
                     "huge": {v: np.stack([clean] * 2) for v in corner_screen.VERSIONS}}
    compatible = {(a, b) for a in probabilities for b in probabilities} - {("leaning", "huge"), ("huge", "leaning")}
    table = corner_screen.screen(probabilities, {"blind": 7.0, "leaning": 7.0, "huge": 20.0}, val, val, [1, 2],
                                 compatible).set_index(["members", "views"])
    assert "leaning + huge" not in table.index.get_level_values(0)      # incompatible
    assert ("blind + huge", 2) not in table.index and ("blind + huge", 1) not in table.index  # 27 MB > 25
    assert table.loc[("blind", 2), "flip_vignette"] == 0 and table.loc[("blind", 2), "qualifies"]
    assert table.loc[("blind", 2), "passes_margin"]                     # the incumbent's own predictions
    alone, pair = table.loc[("leaning", 1)], table.loc[("blind + leaning", 2)]
    threshold = corner_rule.metrics.youden_threshold(labels, clean)
    near = np.mean((clean < threshold) & (clean + 0.05 >= threshold))
    assert alone["flip_corner_fill"] == pytest.approx(np.mean((clean + 0.05 >= threshold) != (clean >= threshold)))
    assert near > corner_rule.MAX_FLIP and not alone["qualifies"]
    assert 0 < pair["flip_corner_fill"] < alone["flip_corner_fill"]


def test_corner_rule_reads_the_committed_stress_summary() -> None:
    code, out, err = run_main(corner_rule.main, "--candidates", "models/default")
    summary = corner_rule.runs.read_stress_summary("models/default", "val").interventions
    shares = [summary[name].flipped for name in ("vignette_light", "vignette", "vignette_strong", "corner_fill")]
    assert code == 0, err
    for share in shares:
        assert f"{share:.4f}" in out
    assert ("no candidate qualifies" in out) == (max(shares) > 0.03)
    code, _, err = run_main(corner_rule.main, "--candidates", "splits")
    assert code == 2 and "not a run directory" in err


def test_bench_stress_reports_a_median_and_a_projection(ham_dir: Path) -> None:
    code, out, err = run_main(bench_stress.main, "--images", "4", "--repeats", "2", "--interventions",
                              "corner_fill", "ink")
    assert code == 0, err
    found = re.search(r"2 interventions .* 4 images: median ([\d.]+) s over 2 repeats", out)
    assert found and float(found[1]) > 0
    assert re.search(r"projected for the 1,500 test images: [\d.]+ min", out)
    code, out, err = run_main(bench_stress.main, "--suite", "acquisition", "--images", "3", "--repeats", "2")
    assert code == 0, err
    found = re.search(r"acquisition stress test, .* 15 edits \+ clean, .* 3 images: median ([\d.]+) s", out)
    assert found and float(found[1]) > 0
    assert re.search(r"projected for its 500 images: [\d.]+ min", out)


def test_cam_vs_stress_compares_maps_with_the_interventions(ham_dir: Path) -> None:
    code, out, err = run_main(cam_vs_stress.main, "--images", "12", "--maps", "gradcam@16", "gradcam@8")
    assert code == 0, err
    assert re.search(r"12 test images of models/default \(\d+ corner-dependent", out)
    assert re.search(r"gradcam@16 +10²", out) and re.search(r"gradcam@8 +20²", out)


def test_the_source_rule_judges_the_incumbent_by_its_own_files(tmp_path: Path) -> None:
    """Issue 31's rule on the shipped model against itself: no stratified gain, the camera edits that break the
    1.5 × floor named (from its val acquisition test), and no held-out-source result to compare."""
    code, out, err = run_main(source_rule.main, "--incumbent", "models/default")
    assert code == 0, err
    summary = pd.read_json(PROJECT_ROOT / "models" / "default" / "acquisition_summary.json")["val"]
    assert "gain +0.0000" in out and f"{summary['floor']['rate']:.1%}" in out
    assert ", ".join(summary["holds"]["failing"]) in out
    assert "no held-out-source result" in out and "no candidate qualifies" in out
    loso = tmp_path / "loso"
    loso.mkdir()
    pd.DataFrame({"held_out": ["rosendahl"], "test_youden_sensitivity": [0.5], "test_auroc": [0.8]}).to_csv(
        loso / "cv_sources.csv", index=False)
    code, out, err = run_main(source_rule.main, "--incumbent-loso", str(loso))
    assert code == 2 and "lacks vidir_modern" in err


def test_the_source_rule_screens_recipes_on_the_held_out_sources(tmp_path: Path) -> None:
    """Step 4 alone, from each recipe's cv_sources.csv: a higher mean held-out sensitivity passes only with the mean
    AUROC at most 0.01 lower; the other source rows are not read."""
    def folds(name: str, sensitivity: tuple[float, float], auroc: tuple[float, float]) -> Path:
        (tmp_path / name).mkdir()
        pd.DataFrame({"held_out": ["rosendahl", "vidir_modern", "vienna_dias"],
                      "test_youden_sensitivity": [*sensitivity, 0.0], "test_auroc": [*auroc, 0.0]}).to_csv(
            tmp_path / name / "cv_sources.csv", index=False)
        return tmp_path / name

    incumbent = folds("incumbent", (0.9, 0.7), (0.72, 0.76))
    better = folds("better", (0.9, 0.72), (0.71, 0.76))          # sensitivity 0.81, AUROC 0.735 ≥ 0.73
    worse_ranking = folds("worse_ranking", (0.95, 0.8), (0.70, 0.74))  # sensitivity up, AUROC 0.72 < 0.73
    fewer_hits = folds("fewer_hits", (0.9, 0.69), (0.80, 0.80))
    code, out, err = run_main(source_rule.main, "--incumbent-loso", str(incumbent), "--recipes", str(better),
                              str(worse_ranking), str(fewer_hits))
    assert code == 0, err
    assert "held-out sensitivity 0.800, AUROC 0.740" in out
    assert "with sensitivity 0.810, AUROC 0.735: build its model" in out
    verdicts = re.findall(r"(passes|fails) the held-out-source step", out)
    assert verdicts == ["passes", "fails", "fails"]
    assert "sensitivity 0.875 vs 0.800, AUROC 0.720 vs 0.740 (at least 0.730)" in out
    assert "sensitivity 0.795 vs 0.800, AUROC 0.800 vs 0.740" in out
    code, _, err = run_main(source_rule.main, "--recipes", str(better))
    assert code == 2 and "--recipes screens recipes against --incumbent-loso" in err
