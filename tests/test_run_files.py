"""Typed run files (issue 32): every JSON file of the run folder reads into its dataclass and writes back the same
JSON; the committed run's files load unchanged; an old or foreign file is read where it can be (unknown keys
ignored) and refused, naming the file, the key and the command that rebuilds it, where it cannot."""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from core import runs
from core.run_files import dump

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
