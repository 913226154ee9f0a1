"""The engine end to end on real images, small enough for a CPU: fit, checkpoint, evaluate, predict, resume."""
from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import train
from core import checkpoint, runs
from core.config import RunConfig
from core.data import PROJECT_ROOT, DataError
from core.inference import Preprocess, load_run, load_splits, predict_probabilities, preload_images
from core.predictor import Predictor
from core.train.augment import BatchAugment
from core.train.fit import fit
from core.train.losses import create_loss
from core.train.training import TrainingError, out_of_memory_advice, train_one_epoch
from tests.helpers import SMALL_SPLIT


@pytest.fixture(scope="module")
def tiny_run(tiny_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit(tiny_config(), tmp_path_factory.mktemp("runs") / "tiny")


def test_run_directory_holds_everything(tiny_run: Path) -> None:
    for name in ("config.yaml", "model.safetensors", "history.csv", "metrics.json", "predictions_val.csv",
                 "predictions_test.csv", "last.safetensors", "last.json"):
        assert (tiny_run / name).is_file(), name
    history = pd.read_csv(tiny_run / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert {"train_loss", "val_loss", "val_auroc", "lr", "seconds"} <= set(history.columns)
    assert RunConfig.from_yaml(tiny_run / "config.yaml").input_size == 64


def test_predictions_and_metrics_are_consistent(tiny_run: Path) -> None:
    report = runs.read_metrics(tiny_run)
    test = pd.read_csv(tiny_run / "predictions_test.csv")
    assert list(test.columns[:5]) == ["image_id", "lesion_id", "dx", "label", "probability"]
    assert len(test) == SMALL_SPLIT["test"] and test["probability"].between(0, 1).all()
    from sklearn.metrics import roc_auc_score
    # The CSV rounds probabilities to 6 decimals, which can tie a few near-equal scores of a barely trained model.
    assert report.test.auroc == pytest.approx(roc_auc_score(test["label"], test["probability"]), abs=1e-5)
    assert set(report.thresholds) == {"0.5", "youden", "sens95"}
    # Where each image was taken (HAM10000's dataset) is carried into the predictions and reported per source.
    sources = report.sources_test
    assert sources is not None and set(sources.sources) == set(test["source"])
    assert sum(r.n for r in sources.sources.values()) == 48
    within = [r.auroc for r in sources.sources.values() if r.auroc is not None]
    assert sources.stratified_auroc == pytest.approx(sum(within) / len(within))


def test_checkpoint_round_trips_to_identical_predictions(tiny_run: Path, ham_dir: Path) -> None:
    cfg, model = load_run(tiny_run)
    frame = load_splits(cfg)["test"].head(40)
    images = preload_images(frame["path"].tolist(), cfg.input_size)
    first = predict_probabilities(model, images, Preprocess(cfg), torch.device("cpu"))
    _, again = load_run(tiny_run)
    second = predict_probabilities(again, images, Preprocess(cfg), torch.device("cpu"))
    np.testing.assert_array_equal(first, second)
    saved = pd.read_csv(tiny_run / "predictions_test.csv").set_index("image_id")["probability"]
    np.testing.assert_allclose(first, saved.loc[frame["image_id"]].to_numpy(), atol=2e-6)
    predictor = Predictor.load(tiny_run)
    assert predictor.predict(frame["path"][0]).probability == pytest.approx(first[0], abs=1e-5)
    assert predictor.predict(Path(frame["path"][1]).read_bytes()).probability == pytest.approx(first[1], abs=1e-5)


def test_a_source_balanced_camera_augmented_fit_runs(tiny_config, tmp_path: Path) -> None:
    """Issue 31's first candidates end to end at tiny size: sampling balanced within sources, camera edits on half
    the training images; source balancing without a sampler is refused."""
    run = fit(tiny_config(source_balanced=True, camera_augment=0.5), tmp_path / "balanced")
    saved = RunConfig.from_yaml(run / "config.yaml")
    assert saved.source_balanced and saved.camera_augment == 0.5
    assert (run / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="needs --positive-fraction > 0"):
        fit(tiny_config(source_balanced=True, positive_fraction=0.0), tmp_path / "plain")


def test_a_fine_tune_carries_the_lineage_and_a_fresh_fit_clears_the_folder(tiny_run: Path, tiny_config,
                                                                           tmp_path: Path) -> None:
    """A fine-tune inherits its parent's stages; a fresh fit into the same folder removes the old weights, metrics,
    history and lineage before anything else, so a fit stopped early never sits beside an older run's files (a
    resumable replay would keep such a stage)."""
    from core.runs import read_lineage

    child = fit(tiny_config(epochs=1, head_warmup_epochs=0, init_from=str(tiny_run)), tmp_path / "child")
    lineage = read_lineage(child)
    assert lineage["stage"].tolist() == [tiny_run.name] * 2 + ["child"]
    assert lineage["epoch"].tolist() == [1, 2, 3] and lineage["stage_epoch"].tolist() == [1, 2, 1]
    with pytest.raises(DataError):  # stops while loading the data, after the folder was cleared
        fit(dataclasses.replace(tiny_config(), split_file=str(tmp_path / "no_split.csv")), child)
    assert sorted(p.name for p in child.iterdir()) == ["config.yaml"]


def test_loss_falls_when_overfitting_a_few_images(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(epochs=6, head_warmup_epochs=0, lr=3e-3, rotation=0.0, jitter=0.0)
    fit(cfg, tmp_path / "overfit")
    losses = pd.read_csv(tmp_path / "overfit" / "history.csv")["train_loss"].to_numpy()
    assert losses[-1] < 0.6 * losses[0]


def test_predict_command_writes_one_row_per_image(tiny_run: Path, ham: pd.DataFrame, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path in ham["path"].head(3):
        (folder / Path(path).name).write_bytes(Path(path).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"garbage")
    out = tmp_path / "p.csv"
    assert train.main(["predict", "--run", str(tiny_run), "--images", str(folder), "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert sorted(frame["image"]) == sorted(Path(p).name for p in ham["path"].head(3))
    assert frame["probability"].between(0, 1).all()


@pytest.mark.parametrize("name", ["labels", "val"])  # "val": must not overwrite the run's own val outputs
def test_evaluate_command_on_an_external_labelled_csv(tiny_run: Path, ham: pd.DataFrame, tmp_path: Path,
                                                      name: str) -> None:
    rows = ham.groupby("label").head(10)
    own_val = (tiny_run / "predictions_val.csv").read_bytes()
    (tmp_path / f"{name}.csv").write_text("image,label\n" + "".join(f"{i},{y}\n" for i, y in
                                                                    zip(rows["image_id"], rows["label"])))
    images = Path(rows["path"].iloc[0]).parent
    assert train.main(["evaluate", "--run", str(tiny_run), "--data", str(tmp_path / f"{name}.csv"),
                       "--images", str(images), "--device", "cpu"]) == 0
    report = runs.read_external(tiny_run, name)
    assert report.n == 20 and 0 <= report.auroc <= 1
    assert len(pd.read_csv(tiny_run / f"predictions_external_{name}.csv")) == 20
    assert (tiny_run / "predictions_val.csv").read_bytes() == own_val


def test_bad_run_directory_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train.main(["evaluate", "--run", str(tmp_path), "--device", "cpu"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_corrupt_weights_are_reported(tiny_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(checkpoint.CheckpointError, match="not a readable safetensors"):
        Predictor.load(broken)


@pytest.mark.parametrize("when", ["before", "after"])
def test_stop_while_saving_an_epoch_then_resume_matches_an_uninterrupted_run(when: str, tiny_config, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            tiny_run: Path) -> None:
    """Ctrl-C while epoch 2 is being saved, just before or just after its training state commits it: epoch 2's
    history row is already on disk either way, and resuming ends with the history and weights of the run that was
    never stopped (redoing epoch 2, or only evaluating)."""
    real = checkpoint.save_training_state

    def interrupted(path: Path, tensors: dict, meta: dict) -> None:
        if meta["epoch"] == 1 and when == "before":
            raise KeyboardInterrupt
        real(path, tensors, meta)
        if meta["epoch"] == 1:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "save_training_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(), run)
    monkeypatch.undo()
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [1, 2]
    assert checkpoint.load_training_meta(run / runs.STATE_FILE)["epoch"] == {"before": 0, "after": 1}[when]
    assert train.main(["fit", "--resume", str(run)]) == 0
    assert_same_training(run, tiny_run)


def assert_same_training(run: Path, reference: Path) -> None:
    """Same history and the very same final weights as the reference run."""
    ours, theirs = pd.read_csv(run / "history.csv"), pd.read_csv(reference / "history.csv")
    pd.testing.assert_frame_equal(ours[["epoch", "train_loss", "val_auroc"]],
                                  theirs[["epoch", "train_loss", "val_auroc"]])
    from safetensors.torch import load_file
    a, b = load_file(str(run / "last.safetensors")), load_file(str(reference / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))


# Runs ``train.py`` and holds training at the start of epoch 2 (epoch 1 committed) so a signal lands mid-training.
# A shell's background job (`make test &`, nohup) starts with SIGINT ignored, and Python then installs no Ctrl-C
# handler: the child restores it, as an interactive ``train.py`` has it.
HELD_AFTER_EPOCH_1 = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import core.train.fit, train
real = core.train.fit.train_one_epoch
def held(**kwargs):
    if kwargs["epoch"] == 1:
        print("EPOCH 1 COMMITTED", flush=True)
        time.sleep(300)
    return real(**kwargs)
core.train.fit.train_one_epoch = held
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_or_kill_then_resume_matches_an_uninterrupted_run(stop: signal.Signals, tiny_config, tmp_path: Path,
                                                                 tiny_run: Path) -> None:
    """A real ``train.py fit`` process stopped during epoch 2: epoch 1 is whole on disk, SIGTERM/SIGINT say how to
    go on, and ``--resume`` ends with the same history and weights as the run that was never stopped."""
    tiny_config().to_yaml(tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    with (tmp_path / "stderr.txt").open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", HELD_AFTER_EPOCH_1, "fit", "--config",
                                 str(tmp_path / "tiny.yaml"), "--out", str(run)], cwd=PROJECT_ROOT,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            while (line := proc.stdout.readline()) and line != "EPOCH 1 COMMITTED\n":
                pass
            assert line, f"train.py ended early: {(tmp_path / 'stderr.txt').read_text()[-2000:]}"
            proc.send_signal(stop)
            code = proc.wait(timeout=60)
        finally:
            proc.kill()
            proc.stdout.close()
    err = (tmp_path / "stderr.txt").read_text()
    assert code == {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGKILL: -9}[stop], err[-2000:]
    if stop != signal.SIGKILL:
        assert f"{run} holds epoch 1 whole" in err and f"train.py fit --resume {run}" in err
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [1]
    assert checkpoint.load_training_meta(run / runs.STATE_FILE)["epoch"] == 0
    assert train.main(["fit", "--resume", str(run)]) == 0
    assert_same_training(run, tiny_run)
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("poison", ["loss", "weights"])
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(poison: str, tiny_config, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN loss in epoch 2, or weights gone NaN at its last step: a clear TrainingError, and epoch 1's files stay."""
    import core.train.fit

    real = core.train.fit.train_one_epoch

    def poisoned(**kwargs):
        if kwargs["epoch"] != 1:
            return real(**kwargs)
        if poison == "loss":
            loss_fn = kwargs["loss_fn"]
            return real(**kwargs | {"loss_fn": lambda logits, y: loss_fn(logits, y) * float("nan")})
        stats = real(**kwargs)
        with torch.no_grad():
            next(kwargs["model"].parameters()).fill_(float("nan"))
        return stats

    monkeypatch.setattr(core.train.fit, "train_one_epoch", poisoned)
    run = tmp_path / "run"
    message = {"loss": r"loss became nan at epoch 2, step 1; stopping\. The last good checkpoint is kept: lower --lr",
               "weights": r"val predictions are not finite after epoch 2; stopping\. The last good checkpoint is kept"}
    with pytest.raises(TrainingError, match=message[poison]):
        fit(tiny_config(), run)
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [1]
    tensors, meta = checkpoint.load_training_state(run / runs.STATE_FILE)
    assert meta["epoch"] == 0 and all(torch.isfinite(t).all() for t in tensors.values())
    _, model = load_run(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class OutOfMemoryModel(nn.Module):
    """Runs out of GPU memory in the forward or the backward pass, as a too-large batch would."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.head = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.where == "forward":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        out = self.head(x.mean((2, 3))).view(-1)
        out.register_hook(self.fail)
        return out

    @staticmethod
    def fail(grad: torch.Tensor) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_out_of_memory_suggests_a_smaller_batch_with_accumulation(where: str) -> None:
    cfg = RunConfig(batch_size=32, grad_accum=2, normalization="imagenet", device="cpu", amp=False)
    model = OutOfMemoryModel(where)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    images, labels = torch.zeros((64, 3, 32, 32), dtype=torch.uint8), torch.zeros(64)
    with pytest.raises(TrainingError, match=r"out of GPU memory at batch size 32: try --batch-size 16 --grad-accum 4 "
                                            r"\(effective batch 64, as now 64, with gradient accumulation\)") as caught:
        train_one_epoch(model, images, labels, None, BatchAugment(), Preprocess(cfg), create_loss("bce"), optimizer,
                        scheduler, cfg, torch.device("cpu"), 0)
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)


def test_out_of_memory_advice_at_odd_and_single_batches() -> None:
    assert "--batch-size 13 --grad-accum 2 (effective batch 26, as now 25" in out_of_memory_advice(
        RunConfig(batch_size=25))
    assert "smaller --input-size or --model" in out_of_memory_advice(RunConfig(batch_size=1))


def test_predictor_names_unreadable_input(tiny_run: Path) -> None:
    from core.data import DataError
    predictor = Predictor.load(tiny_run)
    with pytest.raises(DataError, match="uploaded bytes: cannot read image"):
        predictor.predict(b"definitely not an image")
    from PIL import Image
    rgba = Image.new("RGBA", (300, 200), (120, 60, 40, 128))
    result = predictor.predict(rgba)
    assert 0 <= result.probability <= 1 and result.model_input.shape == (64, 64, 3)
    assert set(result.thresholds) == {"0.5", "youden", "sens95"}


def test_explain_command_on_twenty_images(tiny_run: Path) -> None:
    assert train.main(["explain", "--run", str(tiny_run), "--split", "test", "--limit", "20"]) == 0
    table = pd.read_csv(tiny_run / "attention_test.csv")
    assert len(table) == 20 and table["image_id"].is_unique
    for column in ("corner_fraction", "border_fraction", "outside_lesion_fraction", "background_lesion_ratio",
                   "flag", "dark_corner_score", "deletion_blur_change", "deletion_remove_change", "correct"):
        assert column in table.columns, column
    assert table["corner_fraction"].between(0, 1).all() and table["outside_lesion_fraction"].notna().all()
    store = np.load(tiny_run / "cams_test.npz")
    assert store["cam"].shape == (20, 56, 56) and store["cam"].dtype == np.uint8
    assert list(store["image_id"]) == table["image_id"].tolist()
    summary = runs.read_attention_summary(tiny_run)
    assert summary.n == 20 and summary.flagged.n == 20 and set(summary.by_correctness) <= {"correct", "incorrect"}


def test_predictor_explains(tiny_run: Path, ham: pd.DataFrame) -> None:
    result = Predictor.load(tiny_run).predict(ham["path"][0], explain=True)
    assert result.cam.shape == (64, 64) and 0 <= result.cam.min() and result.cam.max() <= 1
    assert {"corner_fraction", "flag", "dark_corner_score"} <= set(result.attention)
