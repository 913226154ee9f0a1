"""The adversarial source head (issue 31, candidate 4): gradient reversal, its place in the loss, and a fit that
trains it, saves a plain network and resumes exactly."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train
from core import checkpoint, runs
from core.config import RunConfig
from core.data import DataError, read_ham10000
from core.inference import load_run
from core.train.adversary import GradientReversal, SourceAdversary, create_adversary, logits_and_features
from core.train.fit import fit
from core.train.training import consistency_weights, create_training_parts, training_loss

META = torch.device("meta")


def test_gradient_reversal_is_the_identity_forward_and_minus_weight_backward() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    y = GradientReversal.apply(x, 0.4)
    assert torch.equal(y, x)
    grad = torch.randn(5, 3)
    y.backward(grad)
    assert torch.allclose(x.grad, -0.4 * grad)


def test_the_head_indexes_the_sorted_sources_and_keeps_its_tables_out_of_its_state() -> None:
    """Each training image's source (and, given, its diagnosis) is a lookup table that follows the head to its
    device but is never saved: a resumed run rebuilds it from the data."""
    head = SourceAdversary(8, np.array(["vienna", "rosendahl", "vienna", "molemax"]), 0.1,
                           given=np.array(["nv", "mel", "nv", "bkl"]))
    assert head.sources == ["molemax", "rosendahl", "vienna"] and head.source_index.tolist() == [2, 1, 2, 0]
    assert head.given.tolist() == [[0, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 0]]
    assert head.net[0].in_features == 8 + 3 and head.net[-1].out_features == 3
    assert set(head.state_dict()) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert head(torch.zeros(2, 8), torch.tensor([0, 3])).shape == (2, 3)
    assert head.to(META).source_index.device == META and head.given.device == META
    # Guessing the mix (2/4, 1/4, 1/4) scores its entropy; the logged mean is the images' mean cross-entropy.
    assert head.guess_loss == pytest.approx(-(0.5 * np.log(0.5) + 0.5 * np.log(0.25)))
    cpu_head = SourceAdversary(8, np.array(["a", "b", "a", "b"]), 0.1)
    features = torch.randn(4, 8)
    first = cpu_head.loss(features[:3], torch.tensor([0, 1, 2]))
    second = cpu_head.loss(features[3:], torch.tensor([3]))
    assert cpu_head.take_mean_loss() == pytest.approx((3 * first.item() + second.item()) / 4, rel=1e-6)
    assert cpu_head.take_mean_loss() == 0.0


def _parts(**settings):
    torch.manual_seed(0)
    cfg = RunConfig(pretrained=False, input_size=32, **settings)
    model, loss_fn, augment, preprocess = create_training_parts(cfg, torch.device("cpu"))
    model.eval()  # no dropout, BatchNorm on running statistics: the same pass every time
    return cfg, model, loss_fn, augment, preprocess


def test_the_adversary_adds_its_cross_entropy_and_reverses_its_gradient_into_the_backbone() -> None:
    """loss = task + CE(source): the head descends the cross-entropy while every backbone parameter gets the task
    gradient minus λ times the cross-entropy's (DANN), so the features are pushed to hide the source."""
    cfg, model, loss_fn, augment, preprocess = _parts(source_adversary=0.5)
    adversary = create_adversary(model, np.array(["a", "b", "c"] * 3), weight=0.5)
    images = (torch.rand(6, 3, 32, 32) * 255).to(torch.uint8)
    targets, index = torch.tensor([0., 1., 0., 1., 0., 1.]), torch.tensor([0, 1, 2, 3, 4, 8])
    sources = adversary.source_index[index]
    backbone = [p for name, p in model.named_parameters() if not name.startswith("classifier")]

    def run(with_adversary: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        adversary.zero_grad(set_to_none=True)
        loss = training_loss(model, loss_fn, augment, preprocess, images.clone(), targets, False,
                             torch.Generator().manual_seed(1), adversary=adversary if with_adversary else None,
                             image_index=index)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in backbone]

    plain_loss, plain_grads = run(False)
    loss, grads = run(True)
    x = preprocess(augment(images.clone().float().div_(255), torch.Generator().manual_seed(1)))
    _, features = logits_and_features(model, x)
    source_ce = torch.nn.functional.cross_entropy(adversary.net(features), sources)
    assert loss.item() == pytest.approx(plain_loss.item() + source_ce.item(), rel=1e-5)
    # The backbone's gradient of the cross-entropy itself, without the reversal:
    ce_grads = torch.autograd.grad(source_ce, backbone, allow_unused=True)
    for total, plain, ce in zip(grads, plain_grads, ce_grads):
        expected = plain - 0.5 * (ce if ce is not None else 0)
        assert torch.allclose(total, expected, rtol=1e-4, atol=1e-7)
    assert any(ce is not None and ce.abs().sum() > 0 for ce in ce_grads)
    # The head itself is not reversed: a small step along its gradient lowers the source cross-entropy.
    with torch.no_grad():
        before = adversary.loss(features, index)
        for p in adversary.parameters():
            p -= 0.1 * p.grad
        assert adversary.loss(features, index) < before


def test_the_adversary_sees_only_the_clean_images_beside_a_consistency_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a camera twin in the same batch the head reads the clean half of the features only, and the loss is the
    twin loss without it plus the head's cross-entropy on those rows."""
    cfg, model, loss_fn, augment, preprocess = _parts(source_adversary=1.0, camera_consistency=1.0)
    adversary = create_adversary(model, np.array(["a", "b", "b", "a"]), weight=1.0, given=np.array(["x", "y"] * 2))
    images = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    targets = torch.tensor([0., 1., 0., 1.])
    seen: list[torch.Tensor] = []
    real = SourceAdversary.loss

    def spy(self: SourceAdversary, features: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        seen.append(features.detach().clone())
        return real(self, features, image_index)

    monkeypatch.setattr(SourceAdversary, "loss", spy)

    def loss(with_adversary: bool) -> torch.Tensor:
        return training_loss(model, loss_fn, augment, preprocess, images.clone(), targets, False,
                             torch.Generator().manual_seed(0), consistency=consistency_weights(cfg),
                             adversary=adversary if with_adversary else None, image_index=torch.arange(4))

    plain, with_head = loss(False), loss(True)
    clean, twin = augment(images.clone().float().div_(255), torch.Generator().manual_seed(0), twins=("camera",))
    _, features = logits_and_features(model, preprocess(torch.cat([clean, twin])))
    assert len(seen) == 1 and torch.allclose(seen[0], features[:4], atol=1e-6)
    assert not torch.allclose(seen[0], features[4:], atol=1e-3)
    assert with_head.item() == pytest.approx(plain.item() + real(adversary, features[:4], torch.arange(4)).item(),
                                             rel=1e-5)
    with pytest.raises(ValueError, match="training-image indices"):
        training_loss(model, loss_fn, augment, preprocess, images, targets, False, adversary=adversary)
    with pytest.raises(ValueError, match="mixup"):
        training_loss(model, loss_fn, augment, preprocess, images, targets, False, mixup_lam=0.5,
                      adversary=adversary, image_index=torch.arange(4))


def test_an_adversarial_step_runs_wholly_on_another_device() -> None:
    cfg = RunConfig(pretrained=False, input_size=32, source_adversary=0.3)
    model, loss_fn, augment, preprocess = create_training_parts(cfg, META)
    adversary = create_adversary(model, np.array(["a", "b"] * 4), weight=0.3, given=np.array(["x"] * 4 + ["y"] * 4))
    loss = training_loss(model, loss_fn, augment, preprocess, torch.empty(4, 3, 32, 32, dtype=torch.uint8,
                                                                           device=META),
                         torch.empty(4, device=META), cfg.amp, adversary=adversary,
                         image_index=torch.tensor([0, 2, 5, 7], device=META))
    loss.backward()
    assert loss.device == META and all(p.grad is None or p.grad.device == META for p in adversary.parameters())


def test_bad_adversary_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="source_adversary must be ≥ 0"):
        RunConfig(source_adversary=-0.1)
    with pytest.raises(ValueError, match="source_adversary.*mixup"):
        RunConfig(source_adversary=0.3, mixup=0.2)
    with pytest.raises(ValueError, match="torch.compile would bypass"):
        RunConfig(source_adversary=0.3, compile=True)
    with pytest.raises(ValueError, match="source_adversary_given_dx.*needs source_adversary > 0"):
        RunConfig(source_adversary_given_dx=True)
    with pytest.raises(ValueError, match="at least two sources"):
        create_adversary(create_training_parts(RunConfig(pretrained=False, input_size=32), torch.device("cpu"))[0],
                         np.array(["only"] * 3), 0.3)


def test_an_adversarial_fit_saves_a_plain_network_and_resumes_exactly(tiny_config, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The head trains beside the network and is kept in the training state only: the best weights load into the
    plain network, and a run stopped after epoch 1 resumes to the very same weights (head included)."""
    cfg = tiny_config(source_adversary=0.3, source_adversary_given_dx=True, source_balanced=True)
    whole = fit(cfg, tmp_path / "whole")
    state = checkpoint.read_tensors(whole / runs.STATE_FILE)
    assert any(k.startswith("adversary.") for k in state)
    assert not any("adversary" in k for k in checkpoint.read_tensors(whole / runs.MODEL_FILE))
    load_run(whole)  # the plain network, as every reader builds it
    # The head's own cross-entropy is logged each epoch: a part of the train loss, and finite.
    history = pd.read_csv(whole / runs.HISTORY_FILE)
    assert np.isfinite(history["source_ce"]).all() and (history["source_ce"] > 0).all()
    assert (history["train_loss"] > history["source_ce"]).all()
    assert RunConfig.from_yaml(whole / "config.yaml").source_adversary == 0.3

    real = checkpoint.save_training_state

    def stop_after_epoch_1(path: Path, tensors: dict, meta: dict) -> None:
        real(path, tensors, meta)
        if meta["epoch"] == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_training_state", stop_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "stopped")
    monkeypatch.undo()
    assert train.main(["fit", "--resume", str(tmp_path / "stopped")]) == 0
    resumed = checkpoint.read_tensors(tmp_path / "stopped" / runs.STATE_FILE)
    assert resumed.keys() == state.keys()
    assert all(torch.equal(resumed[k], state[k]) for k in state if k.startswith(("model.", "adversary.")))
    # The head's outputs are the sources by name: a state whose sources differ is refused, not loaded.
    meta = checkpoint.load_training_meta(whole / runs.STATE_FILE)
    assert meta["adversary_sources"] == sorted(meta["adversary_sources"]) and len(meta["adversary_sources"]) >= 2
    monkeypatch.setattr(checkpoint, "load_training_state", lambda path: (
        state, {**meta, "adversary_sources": ["elsewhere", *meta["adversary_sources"][1:]]}))
    with pytest.raises(checkpoint.CheckpointError, match="source head was trained on the sources"):
        fit(cfg, whole, resume=True)


def test_an_adversarial_fit_needs_two_sources(tiny_config, small_split: Path, ham_dir: Path, tmp_path: Path) -> None:
    split = pd.read_csv(small_split, dtype={"image_id": str})
    source = split["image_id"].map(read_ham10000(ham_dir).set_index("image_id")["source"])
    one = split[(split["split"] != "train") | (source == "vidir_molemax")]
    one.to_csv(tmp_path / "one_source.csv", index=False)
    with pytest.raises(DataError, match="at least two sources; all come from 'vidir_molemax'"):
        fit(dataclasses.replace(tiny_config(source_adversary=0.3), split_file=str(tmp_path / "one_source.csv")),
            tmp_path / "run")
