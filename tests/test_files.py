"""Files the project writes and reads back: every writer is atomic (a failure or a kill mid-write leaves the old file
whole), training state commits an epoch in one rename, and broken checkpoints are named, never unpickled."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import core.io
from core import checkpoint, runs, split
from core.config import RunConfig
from core.data import PROJECT_ROOT
from core.inference import load_run
from core.io import atomic_write, atomic_write_text, remove_stale_temp_files
from core.train.fit import restore_state


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


# --- atomic_write -----------------------------------------------------------------------------------------------------

def test_a_write_failing_halfway_leaves_the_old_file(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "f.txt", "old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and not temp_files(tmp_path)


def test_a_failing_rename_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = atomic_write_text(tmp_path / "f.txt", "old")
    monkeypatch.setattr(core.io.os, "replace", _failing_replace)
    with pytest.raises(OSError, match="killed mid-write"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and not temp_files(tmp_path)


def _failing_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    raise OSError("killed mid-write")


WRITER_LOOP = """
import sys
from core.io import atomic_write_text
path, size = sys.argv[1], int(sys.argv[2])
for k in range(10**6):
    atomic_write_text(path, "AB"[k % 2] * size)
    if k == 0:
        print("written", flush=True)
"""


def test_sigkill_at_random_moments_never_leaves_half_a_file(tmp_path: Path) -> None:
    """A process rewriting a 4 MB file in a loop, SIGKILLed at random moments: the file is always one whole
    version, and the temporary files left behind are exactly what ``remove_stale_temp_files`` clears."""
    size, target = 4 * 2**20, tmp_path / "data.txt"
    rng = np.random.default_rng(0)
    for _ in range(10):  # ~2/3 of kills land mid-write; a plain write_text tears the file ~1 in 2
        writer = subprocess.Popen([sys.executable, "-c", WRITER_LOOP, str(target), str(size)], cwd=PROJECT_ROOT,
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline() == "written\n"
        time.sleep(rng.uniform(0.0, 0.2))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        writer.stdout.close()
        text = target.read_text()
        assert len(text) == size and text in ("A" * size, "B" * size)
        remove_stale_temp_files(tmp_path, (target.name,))
        assert not temp_files(tmp_path)


def test_stale_temp_files_of_other_names_are_kept(tmp_path: Path) -> None:
    for name in (".last.safetensors.abc123.tmp", ".history.csv.x.tmp", ".metrics.json.y.tmp", "last.safetensors"):
        (tmp_path / name).write_text("x")
    remove_stale_temp_files(tmp_path, ("last.safetensors", "history.csv"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".metrics.json.y.tmp", "last.safetensors"]


# --- every writer of the project goes through atomic_write ------------------------------------------------------

def _frame() -> pd.DataFrame:
    return pd.DataFrame({"image_id": ["I1", "I2"], "lesion_id": ["L1", "L2"], "dx": ["mel", "nv"], "label": [1, 0],
                         "probability": [0.9, 0.2], "split": ["train", "test"], "path": ["a", "b"]})


WRITERS: dict[str, Callable[[Path], object]] = {
    "weights": lambda p: checkpoint.save_weights(nn.Linear(3, 1), p),
    "training state": lambda p: checkpoint.save_training_state(p, {"w": torch.ones(2)}, {"epoch": 3}),
    "split file": lambda p: split.write_csv(_frame()[split.SPLIT_COLUMNS], p),
    "split plot": lambda p: split.plot_class_distribution(_frame(), p),
    "predictions": lambda p: runs.write_predictions(_frame(), p),
    "history": lambda p: runs.write_history([{"epoch": 1, "train_loss": 0.5}], p),
    "CAM store": lambda p: runs.write_cam_store(p, np.array(["I1"]), np.zeros((1, 4, 4), np.uint8)),
    "config": lambda p: RunConfig().to_yaml(p),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_is_atomic(writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the final rename failing (as if killed just before it), each writer leaves the previous file as it was."""
    target = tmp_path / "out.file"
    target.write_bytes(b"previous version")
    monkeypatch.setattr(core.io.os, "replace", _failing_replace)
    with pytest.raises(OSError, match="killed mid-write"):
        WRITERS[writer](target)
    assert target.read_bytes() == b"previous version" and not temp_files(tmp_path)


def test_cam_store_round_trips(tmp_path: Path) -> None:
    cams = np.arange(32, dtype=np.uint8).reshape(2, 4, 4)
    runs.write_cam_store(tmp_path / "cams.npz", np.array(["I1", "I2"]), cams)
    with np.load(tmp_path / "cams.npz") as store:
        assert list(store["image_id"]) == ["I1", "I2"] and np.array_equal(store["cam"], cams)


# --- training state: one file commits an epoch ------------------------------------------------------------------------

def _state(epoch: int) -> tuple[dict[str, torch.Tensor], dict]:
    return {"model.w": torch.full((3,), float(epoch))}, {"epoch": epoch, "best_auroc": 0.5 + epoch / 100}


def test_a_stop_between_the_state_and_its_readable_copy_resumes_the_new_epoch(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / runs.STATE_FILE
    checkpoint.save_training_state(path, *_state(0))
    monkeypatch.setattr(checkpoint, "atomic_write_text", lambda *a: _failing_replace(None, None))
    with pytest.raises(OSError):
        checkpoint.save_training_state(path, *_state(1))  # tensors committed; last.json still says epoch 0
    tensors, meta = checkpoint.load_training_state(path)
    assert meta["epoch"] == 1 and torch.equal(tensors["model.w"], torch.full((3,), 1.0))


def test_a_stop_before_the_state_commits_resumes_the_old_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / runs.STATE_FILE
    checkpoint.save_training_state(path, *_state(0))
    monkeypatch.setattr(core.io.os, "replace", _failing_replace)
    with pytest.raises(OSError):
        checkpoint.save_training_state(path, *_state(1))
    tensors, meta = checkpoint.load_training_state(path)
    assert meta["epoch"] == 0 and torch.equal(tensors["model.w"], torch.zeros(3))


def test_older_runs_resume_only_when_their_two_files_agree(tmp_path: Path) -> None:
    """Before the meta moved into the header, last.json held it: used only if it names the tensors' epoch."""
    path = tmp_path / runs.STATE_FILE
    save_file({"model.w": torch.zeros(3)}, str(path), metadata={"epoch": "4"})
    (tmp_path / runs.STATE_META).write_text(json.dumps({"epoch": 4, "best_auroc": 0.7}))
    assert checkpoint.load_training_state(path)[1]["best_auroc"] == 0.7
    (tmp_path / runs.STATE_META).write_text(json.dumps({"epoch": 3, "best_auroc": 0.7}))
    with pytest.raises(checkpoint.CheckpointError, match=r"epoch index 3\).*epoch index 4\) disagree"):
        checkpoint.load_training_state(path)


def test_missing_state_says_no_epoch_finished(tmp_path: Path) -> None:
    with pytest.raises(checkpoint.CheckpointError, match="last.safetensors missing: no epoch has finished"):
        checkpoint.load_training_state(tmp_path / runs.STATE_FILE)


def test_state_that_does_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    other = nn.Linear(4, 3)
    tensors, meta = checkpoint.optimizer_to_tensors(torch.optim.AdamW(other.parameters()))
    checkpoint.save_training_state(tmp_path / runs.STATE_FILE,
                                   {f"model.{k}": v for k, v in other.state_dict().items()} | tensors,
                                   meta | {"epoch": 0, "scheduler": scheduler.state_dict()})
    with pytest.raises(checkpoint.CheckpointError, match=r"does not fit the model and optimiser that .*config\.yaml"):
        restore_state(tmp_path, model, None, optimizer, scheduler)


def test_history_shorter_than_the_checkpoint_is_refused(tmp_path: Path) -> None:
    runs.write_history([{"epoch": 1, "train_loss": 0.5}], tmp_path / runs.HISTORY_FILE)
    assert len(runs.committed_history(tmp_path, 1)) == 1
    with pytest.raises(runs.RunError, match=r"holds 1 epoch\(s\) but last.safetensors has 2"):
        runs.committed_history(tmp_path, 2)


# --- checkpoints: safetensors only, checked against the config ------------------------------------------------------

@pytest.fixture(scope="module")
def lite0_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding an (untrained) EfficientNet-Lite0 and its config."""
    from core.model import create_model
    run = tmp_path_factory.mktemp("run")
    RunConfig(model="efficientnet_lite0").to_yaml(run / "config.yaml")
    checkpoint.save_weights(create_model("efficientnet_lite0", pretrained=False), run / runs.MODEL_FILE)
    return run


def _copy_run(run: Path, to: Path, weights: bytes | None = None, **config) -> Path:
    to.mkdir()
    cfg = RunConfig.from_yaml(run / "config.yaml")
    RunConfig.from_dict({**cfg.__dict__, **config}).to_yaml(to / "config.yaml")
    (to / runs.MODEL_FILE).write_bytes(weights if weights is not None
                                             else (run / runs.MODEL_FILE).read_bytes())
    return to


def test_run_loads(lite0_run: Path) -> None:
    cfg, model = load_run(lite0_run)
    assert cfg.model == "efficientnet_lite0" and model(torch.zeros(1, 3, 64, 64)).shape == (1, 1)


def test_weights_of_another_architecture_than_the_config_says(lite0_run: Path, tmp_path: Path) -> None:
    run = _copy_run(lite0_run, tmp_path / "run", model="efficientnet_lite1")
    with pytest.raises(checkpoint.CheckpointError, match=r"model.safetensors does not fit the model in its config "
                                                         r"\(missing \['blocks"):
        load_run(run)


@pytest.mark.parametrize("damage", ["truncated", "zeroed header", "pickle"])
def test_damaged_or_pickled_weights_are_refused(damage: str, lite0_run: Path, tmp_path: Path) -> None:
    """A cut-off or garbled file is named; a pickle (``torch.save``) is refused, never unpickled."""
    good = (lite0_run / runs.MODEL_FILE).read_bytes()
    if damage == "pickle":
        torch.save({"weight": torch.zeros(2)}, tmp_path / "pickled.pt")
        data = (tmp_path / "pickled.pt").read_bytes()
    else:
        data = good[:len(good) // 2] if damage == "truncated" else bytes(64) + good[64:]
    run = _copy_run(lite0_run, tmp_path / "run", weights=data)
    with pytest.raises(checkpoint.CheckpointError, match=r"run/model.safetensors is not a readable safetensors file"):
        load_run(run)
