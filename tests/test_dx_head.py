"""The 7-way dx head: P(malignant) as the softmax mass of mel+bcc+akiec, its focal loss, its Grad-CAM target, and a
tiny real fit through train, evaluate, Predictor and explain."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

from core import runs
from core.audit.explain import MalignantTarget
from core.model import DX_CLASSES, MALIGNANT_OUTPUTS, malignant_log_odds, malignant_probability
from core.predictor import Predictor
from core.train.fit import fit
from core.train.losses import SoftmaxFocalLoss, create_loss
from core.train.training import TrainingError, training_targets
from tests.helpers import SMALL_SPLIT


def test_dx_classes_and_malignant_outputs() -> None:
    assert DX_CLASSES == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert sorted(DX_CLASSES[i] for i in MALIGNANT_OUTPUTS) == ["akiec", "bcc", "mel"]


def test_malignant_probability_of_both_heads() -> None:
    single = torch.tensor([[-2.0], [0.0], [3.0]])
    assert torch.allclose(malignant_probability(single), torch.sigmoid(single.view(-1)))
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    softmax = logits.softmax(-1)
    mass = softmax[:, MALIGNANT_OUTPUTS].sum(-1)
    assert torch.allclose(malignant_probability(logits), mass, atol=1e-6)
    assert torch.allclose(malignant_log_odds(logits), torch.log(mass) - torch.log(1 - mass), atol=1e-5)
    with pytest.raises(ValueError, match="1 or 7 logits"):
        malignant_log_odds(torch.zeros(2, 3))


def test_softmax_focal_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    target = F.one_hot(torch.tensor([5]), 7).float()  # nv (benign): weight 1 − α
    p = logits.softmax(-1)[0, 5].item()
    expected = (1 - 0.6) * (1 - p) ** 2 * -math.log(p)
    assert SoftmaxFocalLoss(MALIGNANT_OUTPUTS, 7, 0.6, 2.0)(logits, target).item() == pytest.approx(expected, rel=1e-5)
    mel = F.one_hot(torch.tensor([4]), 7).float()  # malignant: weight α
    q = logits.softmax(-1)[0, 4].item()
    assert SoftmaxFocalLoss(MALIGNANT_OUTPUTS, 7, 0.6, 2.0)(logits, mel).item() == pytest.approx(
        0.6 * (1 - q) ** 2 * -math.log(q), rel=1e-5)
    # γ = 0 and α = ½: half the cross-entropy; "bce" on the dx head is plain (soft-target) cross-entropy.
    batch = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    soft = torch.rand(6, 7, generator=torch.Generator().manual_seed(2)).softmax(-1)
    assert SoftmaxFocalLoss(MALIGNANT_OUTPUTS, 7, 0.5, 0.0)(batch, soft).item() == pytest.approx(
        0.5 * F.cross_entropy(batch, soft).item(), rel=1e-5)
    assert create_loss("bce", head="dx")(batch, soft).item() == pytest.approx(F.cross_entropy(batch, soft).item())


def test_cam_target_matches_the_library_on_a_single_logit() -> None:
    output = torch.tensor([1.7])
    for category in (0, 1):
        assert MalignantTarget(category)(output).item() == pytest.approx(
            BinaryClassifierOutputTarget(category)(output).item())
    dx_output = torch.randn(7, generator=torch.Generator().manual_seed(3))
    assert MalignantTarget(1)(dx_output).item() == pytest.approx(-MalignantTarget(0)(dx_output).item())


def test_training_targets() -> None:
    frame = pd.DataFrame({"dx": ["mel", "nv", "akiec"], "label": [1, 0, 1]})
    assert training_targets(frame, "binary").tolist() == [1.0, 0.0, 1.0]
    onehot = training_targets(frame, "dx")
    assert onehot.shape == (3, 7) and onehot.argmax(-1).tolist() == [4, 5, 0]
    with pytest.raises(TrainingError, match="scc"):
        training_targets(pd.DataFrame({"dx": ["scc"], "label": [1]}), "dx")
    with pytest.raises(ValueError, match="unknown head"):
        training_targets(frame, "three-way")


def test_tiny_dx_head_fit_predicts_and_explains(tiny_config, ham_dir: Path, tmp_path: Path) -> None:
    run = fit(tiny_config(head="dx", epochs=1, head_warmup_epochs=0), tmp_path / "dx")
    report = runs.read_metrics(run)
    assert 0 <= report.test.auroc <= 1 and report.test.n == SMALL_SPLIT["test"]
    history = pd.read_csv(run / "history.csv")
    assert history["val_loss"].notna().all()
    predictor = Predictor.load(run)
    assert predictor.model.get_classifier().out_features == 7
    first = pd.read_csv(run / "predictions_test.csv", dtype={"image_id": str}).iloc[0]
    result = predictor.predict(ham_dir / "images" / f"{first['image_id']}.jpg", explain=True)
    assert result.probability == pytest.approx(first["probability"], abs=1e-4)  # same model, same number
    assert result.cam.shape == (64, 64) and 0 <= result.cam.min() <= result.cam.max() <= 1
