"""Typed run files (issue 32): every JSON file of the run folder reads into its dataclass and writes back the same
JSON; the committed run's files load unchanged, and so do an external set and a site profile made by their real
producers; an old or foreign file is read where it can be (unknown keys ignored) and refused, naming the file, the
key and the command that rebuilds it, where it cannot."""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from core import runs, sites
from core.run_files import SampleSource, SiteProfile, dump

SHIPPED = {  # file → its reader on a run
    runs.METRICS_FILE: runs.read_metrics,
    runs.ATTENTION_SUMMARY: runs.read_attention_summary,
    runs.OOD_SUMMARY: runs.read_ood_summary,
}
SECTIONS = {runs.STRESS_SUMMARY: runs.read_stress_summary, runs.ACQUISITION_SUMMARY: runs.read_acquisition_summary}
WRITERS: dict[str, Callable] = {runs.METRICS_FILE: runs.write_metrics,
                                runs.ATTENTION_SUMMARY: runs.write_attention_summary,
                                runs.OOD_SUMMARY: runs.write_ood_summary}
SECTION_WRITERS: dict[str, Callable] = {runs.STRESS_SUMMARY: runs.write_stress_summary,
                                        runs.ACQUISITION_SUMMARY: runs.write_acquisition_summary}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_committed_files_load_and_write_back_the_same(name: str, tmp_path: Path) -> None:
    """Compared as text: a NaN (the attention summary has one) is never equal to itself."""
    typed = SHIPPED[name](runs.DEFAULT_RUN)
    WRITERS[name](tmp_path, typed)
    assert (tmp_path / name).read_text() == (runs.DEFAULT_RUN / name).read_text()
    assert json.dumps(dump(SHIPPED[name](tmp_path))) == json.dumps(dump(typed))


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_the_committed_per_split_summaries_load_and_write_back_the_same(name: str, tmp_path: Path) -> None:
    for split in ("val", "test"):
        section = SECTIONS[name](runs.DEFAULT_RUN, split)
        SECTION_WRITERS[name](tmp_path, split, section)
        assert SECTIONS[name](tmp_path, split) == section
    assert (tmp_path / name).read_text() == (runs.DEFAULT_RUN / name).read_text()


def test_writing_one_split_keeps_the_others(tmp_path: Path) -> None:
    shutil.copy(runs.DEFAULT_RUN / runs.STRESS_SUMMARY, tmp_path)
    val = runs.read_stress_summary(runs.DEFAULT_RUN, "val")
    runs.write_stress_summary(tmp_path, "extra", val)
    assert set(_json(tmp_path / runs.STRESS_SUMMARY)) == {"val", "test", "extra"}
    assert runs.read_stress_summary(tmp_path, "test") == runs.read_stress_summary(runs.DEFAULT_RUN, "test")


def test_nan_survives_the_round_trip(tmp_path: Path) -> None:
    """The producers write NaN where an AUROC is undefined (one class); json writes it as NaN and reads it back."""
    summary = runs.read_attention_summary(runs.DEFAULT_RUN)
    assert math.isnan(summary.auroc.flagged)  # the shipped audit flags one image: no AUROC among the flagged
    runs.write_attention_summary(tmp_path, summary)
    assert '"flagged": NaN' in (tmp_path / runs.ATTENTION_SUMMARY).read_text()
    assert math.isnan(runs.read_attention_summary(tmp_path).auroc.flagged)


def _copy_with(tmp_path: Path, name: str, change: Callable[[dict], None]) -> Path:
    report = _json(runs.DEFAULT_RUN / name)
    change(report)
    (tmp_path / name).write_text(json.dumps(report))
    return tmp_path


def test_an_unknown_key_is_ignored(tmp_path: Path) -> None:
    run = _copy_with(tmp_path, runs.METRICS_FILE, lambda r: r["test"].update(from_the_future=[1, 2]))
    assert runs.read_metrics(run) == runs.read_metrics(runs.DEFAULT_RUN)


def test_a_missing_key_is_refused_with_the_file_the_key_and_the_command(tmp_path: Path) -> None:
    run = _copy_with(tmp_path, runs.METRICS_FILE, lambda r: r["test"].pop("auroc"))
    with pytest.raises(runs.RunError) as err:
        runs.read_metrics(run)
    message = str(err.value)
    assert str(run / runs.METRICS_FILE) in message and "'test.auroc' is missing" in message
    assert f"python train.py evaluate --run {run}" in message


def test_a_wrong_type_is_refused(tmp_path: Path) -> None:
    run = _copy_with(tmp_path, runs.STRESS_SUMMARY, lambda r: r["val"]["interventions"]["ink"].update(flipped="x"))
    with pytest.raises(runs.RunError, match=r"'val\.interventions\.ink\.flipped' should be a number.*"
                                            r"train\.py stress --split val"):
        runs.read_stress_summary(run, "val")
    assert runs.read_stress_summary(run, "test").n == 1500  # the other split still reads


def test_optional_fields_of_older_runs_default_to_none(tmp_path: Path) -> None:
    def older(report: dict) -> None:
        for key in ("sources_val", "sources_test", "calibration_test", "subgroups_test", "run"):
            del report[key]

    report = runs.read_metrics(_copy_with(tmp_path, runs.METRICS_FILE, older))
    assert report.sources_test is None and report.calibration_test is None and report.run is None
    assert "calibration_test" not in dump(report)  # written back as it was: without them
    ood = runs.read_ood_summary(_copy_with(tmp_path, runs.OOD_SUMMARY, lambda r: r.pop("style_threshold")))
    assert ood.style_threshold is None


def test_a_camera_edit_keeps_its_null_multiple_of_a_zero_floor(tmp_path: Path) -> None:
    """``times_floor`` is null beside a zero floor and absent on a neutral edit: both are written back as they were."""
    def zero_floor(summary: dict) -> None:
        summary["val"]["edits"]["warmer"] |= {"floor": 0.0, "times_floor": None}

    run = _copy_with(tmp_path, runs.ACQUISITION_SUMMARY, zero_floor)
    section = runs.read_acquisition_summary(run, "val")
    rows = dump(section)["edits"]
    assert rows["warmer"]["times_floor"] is None and "times_floor" not in rows["jpeg_90"]


# ---------------------------------------------------------------- external sets and site profiles

OLDEST_EXTERNAL = ("name", "n", "auroc", "auroc_ci", "at_threshold")  # evaluate --data before the OOD guard (18828fd)


@pytest.fixture(scope="module")
def evaluated(ham_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shipped run with one external set evaluated by the real producer: 20 test images (10
    malignant) from two sources, enough for the shift check, so every optional part is there."""
    import pandas as pd

    from core.evaluation import evaluate_external

    root = tmp_path_factory.mktemp("external")
    run = root / "run"
    shutil.copytree(runs.DEFAULT_RUN, run, ignore=shutil.ignore_patterns("cams_*", "stress_*", "attention_*",
                                                                         "acquisition_*"))
    test = runs.read_predictions(runs.DEFAULT_RUN, "test")
    chosen = test.groupby("label").sample(10, random_state=0)
    (root / "images").mkdir()
    for image_id in chosen["image_id"]:
        shutil.copy(ham_dir / "images" / f"{image_id}.jpg", root / "images")
    pd.DataFrame({"image": chosen["image_id"] + ".jpg", "label": chosen["label"],
                  "source": ["clinic_a", "clinic_b"] * 10}).to_csv(root / "labels.csv", index=False)
    evaluate_external(run, str(root / "labels.csv"), str(root / "images"), "cpu", name="few")
    return run


def _profile(run: Path) -> SiteProfile:
    """A site profile from the shipped run's test predictions (no model pass: the producer needs p and labels)."""
    frame = runs.read_predictions(runs.DEFAULT_RUN, "test").head(300)
    return sites.make_profile(run, "clinic_a", frame, SampleSource(data="labels.csv", images="images"),
                              sample_date="2026-11-30")


def test_an_evaluated_external_set_loads_and_writes_back_the_same(evaluated: Path, tmp_path: Path) -> None:
    report = runs.read_external(evaluated, "few")
    assert report.n == 20 and report.model == sites.model_fingerprint(evaluated) and report.sources is not None
    assert report.ood is not None and report.shift is not None and report.shift.advice is not None
    runs.write_external(tmp_path, report)
    name = runs.external_metrics_file("few")
    assert (tmp_path / name).read_text() == (evaluated / name).read_text()
    runs.write_shift_report(tmp_path / "shift.json", report.shift)  # train.py shift --out: the same type
    assert runs.read_shift_report(tmp_path / "shift.json") == report.shift
    assert set(runs.external_sets(evaluated)) == {"few"}


def test_an_external_set_from_before_the_ood_and_shift_parts_still_loads(evaluated: Path, tmp_path: Path) -> None:
    report = _json(evaluated / runs.external_metrics_file("few"))
    (tmp_path / runs.external_metrics_file("old")).write_text(json.dumps({k: report[k] for k in OLDEST_EXTERNAL}
                                                                         | {"name": "old"}))
    old = runs.read_external(tmp_path, "old")
    assert (old.images, old.model, old.sources, old.ood, old.shift) == (None, None, None, None, None)
    assert old.at_threshold == runs.read_external(evaluated, "few").at_threshold
    assert set(dump(old)) == set(OLDEST_EXTERNAL)  # written back without them


def test_a_damaged_external_set_is_refused_with_the_evaluate_command(evaluated: Path, tmp_path: Path) -> None:
    report = _json(evaluated / runs.external_metrics_file("few"))
    del report["shift"]["tests"]["ood_score"]["p_value"]
    (tmp_path / runs.external_metrics_file("few")).write_text(json.dumps(report))
    with pytest.raises(runs.RunError, match=r"'shift\.tests\.ood_score\.p_value' is missing.*"
                                            r"train\.py evaluate .*--name few"):
        runs.read_external(tmp_path, "few")
    assert runs.external_sets(tmp_path) == {}  # left out of the list, named when opened


def test_a_site_profile_round_trip_keeps_the_file_flat(tmp_path: Path) -> None:
    """The operating point is a field of the profile but its keys sit at the top of the file, as before."""
    run = tmp_path / "run"
    run.mkdir()
    for name in (runs.CONFIG_FILE, runs.MODEL_FILE):
        shutil.copy(runs.DEFAULT_RUN / name, run / name)
    profile = _profile(run)
    path = runs.write_site_profile(run, profile)
    written = _json(path)
    assert list(written)[:2] == ["name", "threshold"] and written["source"] == {"data": "labels.csv",
                                                                                 "images": "images"}
    assert runs.read_site_profile(run, "clinic_a") == profile == sites.load_profile(run, "clinic_a")
    runs.write_site_profile(tmp_path, profile)
    assert (tmp_path / runs.site_file("clinic_a")).read_text() == path.read_text()


def test_a_site_profile_with_a_missing_key_is_refused_with_the_file_the_key_and_the_command(tmp_path: Path) -> None:
    runs.write_site_profile(tmp_path, _profile(runs.DEFAULT_RUN))
    path = tmp_path / runs.site_file("clinic_a")
    profile = _json(path)
    del profile["expected_sensitivity"]
    path.write_text(json.dumps(profile))
    with pytest.raises(runs.RunError) as err:
        runs.read_site_profile(tmp_path, "clinic_a")
    message = str(err.value)
    assert str(path) in message and "'expected_sensitivity' is missing" in message
    assert f"python train.py site --run {tmp_path} --name clinic_a" in message
    assert runs.site_profiles(tmp_path) == {}
