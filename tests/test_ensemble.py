"""Ensembles (core/ensemble.py): one run directory whose P(malignant) is its members' mean, through load_run,
evaluation-time TTA, the Predictor, Grad-CAM, the CLI and the dashboard's training report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

import train
from core import checkpoint, runs
from core.audit import explain
from core.config import RunConfig
from core.data import PROJECT_ROOT
from core.ensemble import Ensemble, create_ensemble
from core.inference import FLIP_DIMS, Preprocess, load_run, predict_probabilities
from core.model import create_model, head_outputs, malignant_probability
from core.predictor import Predictor
from core.run import load
from core.runs import MEMBERS_DIR, read_members, run_summary

SIZE = 64


def make_run(path: Path, head: str = "binary", seed: int = 0, **overrides) -> Path:
    """A run directory as ``fit`` leaves it (config + weights + history), with random weights: no training needed
    to check how members are combined."""
    torch.manual_seed(seed)
    cfg = RunConfig(**{"input_size": SIZE, "head": head, "seed": seed, "amp": False, "device": "cpu", **overrides})
    model = create_model(cfg.model, pretrained=False, num_outputs=head_outputs(head))
    with torch.no_grad():  # a random head, so members disagree visibly
        for p in model.get_classifier().parameters():
            p.normal_(0, 0.03)  # logits of std ~1: probabilities spread, not saturated
    path.mkdir(parents=True)
    cfg.to_yaml(path / "config.yaml")
    checkpoint.save_weights(model, path / runs.MODEL_FILE)
    pd.DataFrame({"epoch": [1, 2], "train_loss": [0.2, 0.1], "val_loss": [0.3, 0.2],
                  "val_auroc": [0.6, 0.7]}).to_csv(path / "history.csv", index=False)
    return path


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("members")
    return [make_run(root / "single", "binary", 0), make_run(root / "dx", "dx", 1)]


@pytest.fixture(scope="module")
def ensemble_run(members: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_ensemble(members, tmp_path_factory.mktemp("ens") / "ens", tta_views=2)


def member_mean(members: list[Path], images: torch.Tensor, **kwargs) -> np.ndarray:
    outputs = []
    for run in members:
        cfg, model = load_run(run)
        outputs.append(predict_probabilities(model, images, Preprocess(cfg), torch.device("cpu"), amp=False,
                                             **kwargs))
    return np.mean(outputs, axis=0)


def test_forward_is_the_log_odds_of_the_mean_probability(members: list[Path]) -> None:
    models = [load_run(run)[1] for run in members]
    x = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.stack([malignant_probability(m(x)) for m in models]).mean(0)
        logits = Ensemble(models).eval()(x)
    assert logits.shape == (5, 1)
    assert torch.allclose(malignant_probability(logits), expected, atol=1e-6)
    single = [malignant_probability(m(x)) for m in models]
    assert not torch.allclose(single[0], single[1], atol=1e-3)  # the members really differ: the mean means something


def test_run_directory_layout_and_config(ensemble_run: Path, members: list[Path]) -> None:
    cfg = RunConfig.from_yaml(ensemble_run / "config.yaml")
    assert cfg.ensemble == ["members/single", "members/dx"]
    assert (cfg.head, cfg.tta_views, cfg.input_size) == ("binary", 2, SIZE)
    assert {name: c.head for name, c in read_members(ensemble_run).items()} == {"members/single": "binary",
                                                                                "members/dx": "dx"}
    assert (ensemble_run / "members" / "dx" / "history.csv").is_file()
    assert not list((ensemble_run / "members").rglob("*.safetensors"))  # weights live in one file at the top
    assert run_summary(ensemble_run)["model"] == "ensemble of 2: single + dx"


def test_predictions_are_the_members_mean_with_tta_views(ensemble_run: Path, members: list[Path]) -> None:
    images = torch.randint(0, 256, (6, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cfg, model = load_run(ensemble_run)
    got = predict_probabilities(model, images, Preprocess(cfg), torch.device("cpu"), amp=False, tta_views=2)
    # fp16 weights in the ensemble file, fp32 in the members: equal to fp16 precision
    np.testing.assert_allclose(got, member_mean(members, images, tta_views=2), atol=2e-3)
    identity_and_h = member_mean(members, images) / 2 + member_mean(members, images.flip(-1)) / 2
    np.testing.assert_allclose(got, identity_and_h, atol=2e-3)
    assert not np.allclose(got, member_mean(members, images, tta_views=4), atol=1e-4)


def test_tta_views_is_checked() -> None:
    model = create_model("efficientnet_lite0", pretrained=False)
    images = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)
    with pytest.raises(ValueError, match="tta_views must be 1 to 4"):
        predict_probabilities(model, images, Preprocess(RunConfig()), torch.device("cpu"), tta_views=5)
    assert len(FLIP_DIMS) == 4


def test_predictor_and_predict_frame_on_real_images(ensemble_run: Path, members: list[Path], ham) -> None:
    frame = ham.head(8).reset_index(drop=True)
    ens = load(ensemble_run).predict_frame(frame)[0]["probability"].to_numpy()
    parts = []
    for run in members:
        member = load(run)
        member.config.tta_views = 2
        parts.append(member.predict_frame(frame)[0]["probability"].to_numpy())
    np.testing.assert_allclose(ens, np.mean(parts, axis=0), atol=2e-3)
    predictor = Predictor.load(ensemble_run)
    result = predictor.predict(frame.loc[0, "path"], explain=True)
    assert result.probability == pytest.approx(ens[0], abs=1e-5)
    assert result.cam.shape == (SIZE, SIZE) and 0 <= result.cam.min() and result.cam.max() <= 1


def test_grad_cam_is_the_mean_of_the_members_maps(ensemble_run: Path) -> None:
    cfg, model = load_run(ensemble_run)
    x = Preprocess(cfg)(torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(2)))
    assert [type(layer) for layer in explain.target_layers(model)] == [type(explain.target_layer(m))
                                                                      for m in model.members]
    for category in (0, 1):
        cams = explain.compute_cam(model, x, categories=[category] * 3)
        parts = np.mean([explain.compute_cam(m, x, categories=[category] * 3) for m in model.members], axis=0)
        low = parts.min(axis=(1, 2), keepdims=True)
        expected = (parts - low) / (parts.max(axis=(1, 2), keepdims=True) - low + 1e-7)
        # pytorch-grad-cam divides each member's map by (max + 1e-7): with these random-weight members' small
        # activations that epsilon shows at the 1e-2 level; trained members' maps are far larger.
        np.testing.assert_allclose(cams, expected, atol=2e-2)
        first_member = explain.compute_cam(model.members[0], x, categories=[category] * 3)
        assert np.abs(cams - first_member).max() > 0.1  # not just one member's map


def test_members_must_share_the_input(tmp_path: Path, members: list[Path]) -> None:
    other = make_run(tmp_path / "big", input_size=SIZE * 2)
    with pytest.raises(ValueError, match="must share input_size"):
        create_ensemble([members[0], other], tmp_path / "bad")
    frame = make_run(tmp_path / "frame", crop="frame")
    with pytest.raises(ValueError, match="must share crop: .* has square, .*frame has frame"):
        create_ensemble([members[0], frame], tmp_path / "bad")
    per_image = make_run(tmp_path / "per_image", normalization="per_image")
    with pytest.raises(ValueError, match="must share normalization"):
        create_ensemble([members[0], per_image], tmp_path / "bad")
    elsewhere = make_run(tmp_path / "elsewhere", split_file=str(tmp_path / "other_split.csv"))
    with pytest.raises(ValueError, match="same split file: .*val/test images may be in the other's training set"):
        create_ensemble([members[0], elsewhere], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing half-written


def test_overwrite_leaves_nothing_of_the_replaced_run(tmp_path: Path, members: list[Path]) -> None:
    out = create_ensemble(members, tmp_path / "ens")
    stale = [out / "metrics.json", out / "predictions_val.csv", out / "attention_summary.json",
             out / MEMBERS_DIR / "old_member" / "config.yaml"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    create_ensemble(members[:1], out, overwrite=True)
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in (out / MEMBERS_DIR).iterdir()) == [members[0].name]
    assert RunConfig.from_yaml(out / "config.yaml").ensemble == [f"{MEMBERS_DIR}/{members[0].name}"]


def test_cli_builds_and_refuses(tmp_path: Path, members: list[Path], ensemble_run: Path,
                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert train.main(["ensemble", "--members", *map(str, members), "--out", str(out)]) == 0
    assert RunConfig.from_yaml(out / "config.yaml").tta_views == 1  # the first member's setting
    assert "next: python train.py evaluate" in capsys.readouterr().out
    assert train.main(["ensemble", "--members", *map(str, members), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train.main(["ensemble", "--members", str(ensemble_run), str(members[0]), "--out", str(tmp_path / "x")]) == 2
    assert "itself an ensemble" in capsys.readouterr().err
    assert train.main(["ensemble", "--members", str(members[0]), str(tmp_path / "nothing"), "--out",
                       str(tmp_path / "y")]) == 2
    assert "not run directories" in capsys.readouterr().err
    assert train.main(["fit", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "z")]) == 2
    assert "an ensemble config is not trained" in capsys.readouterr().err


def test_training_report_shows_each_member(ensemble_run: Path) -> None:
    at = AppTest.from_file(str(PROJECT_ROOT / "pages" / "training.py"), default_timeout=60)
    at.session_state["run"] = ensemble_run
    at.run()
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "an **ensemble** averaging the P(malignant) of 2 trained runs" in text
    assert [h.value for h in at.subheader] == ["Member single", "Member dx"]
    assert "(dx head)" in text and "flip TTA on (2 views)" in text
