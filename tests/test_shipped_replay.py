"""`train.py shipped`: the shipped model rebuilt from its committed recipe (configs/shipped), here at a tiny size."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from core import runs
from core.config import RunConfig
from core.runs import DEFAULT_RUN, read_lineage
from core.train.shipped import RECIPE, read_recipe, stage_config, stages_dir
from tests.helpers import run_main


def test_the_recipe_is_the_shipped_models_recipe() -> None:
    """Each member's last stage, resolved through its `extends` chain, is the shipped member's config: the recipe
    describes the weights that ship, not a look-alike. (Only where the weights started from differs: the shipped
    config names a run folder that no longer exists; the recipe names the stage before.)"""
    recipe = read_recipe()
    shipped = RunConfig.from_yaml(DEFAULT_RUN / "config.yaml")
    assert [f"members/{m}" for m in recipe.members] == shipped.ensemble
    assert recipe.tta_views == shipped.tta_views
    for member, stages in recipe.members.items():
        built = stage_config(stages[-1], None, {})
        member_cfg = RunConfig.from_yaml(DEFAULT_RUN / "members" / member / "config.yaml")
        assert dataclasses.replace(member_cfg, init_from=None) == built
        assert Path(member_cfg.init_from).name == stages[-2].name  # the stage before is the run it started from
        assert stage_config(stages[0], None, {}).pretrained and stage_config(stages[0], None, {}).init_from is None
        lineage = list(dict.fromkeys(read_lineage(DEFAULT_RUN / "members" / member)["stage"]))
        assert lineage == [s.name for s in stages]  # the Training report shows the same chain


@pytest.mark.parametrize(("recipe", "problem"), [
    ("members:\n  m:\n    - {stage: other, config: STAGE}\n", "last stage must be named m"),
    ("members:\n  m:\n    - {stage: m, config: missing.yaml}\n", "missing.yaml, which does not exist"),
    ("members: [m: {stage: m\n", "not valid YAML"),
    ("- m\n- n\n", "`members` must map"),
    ("members:\n  m:\n    - {stage: m, config: STAGE}\n  n:\n    - {stage: m, config: STAGE}\n    - {stage: n, "
     "config: STAGE}\n", "stage names must be unique"),
    ("tta_views: 5\nmembers:\n  m:\n    - {stage: m, config: STAGE}\n", "tta_views must be 1, 2, 3 or 4"),
    ("members:\n  m:\n    - {stage: m, config: STAGE, run: fifty}\n", "row number in experiments.md"),
])
def test_a_bad_recipe_is_refused_with_its_problem_named(recipe: str, problem: str, tmp_path: Path) -> None:
    stage = (RECIPE.parent / "lite0_mask090_scratch.yaml").resolve()
    (tmp_path / "r.yaml").write_text(recipe.replace("STAGE", str(stage)))
    with pytest.raises(ValueError, match=problem):
        read_recipe(tmp_path / "r.yaml")


def test_a_replay_never_writes_over_the_shipped_model_or_a_single_run(tmp_path: Path) -> None:
    """Refused before any training: the shipped run itself, a trained single run, a stage file that does not load."""
    import shutil

    from core.train.shipped import replay

    with pytest.raises(ValueError, match="the shipped model itself"):
        replay(DEFAULT_RUN, overwrite=True)
    single = tmp_path / "single"
    shutil.copytree(DEFAULT_RUN / "members" / "lite0_160_mask090_cons15", single)
    (single / runs.MODEL_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match="single run"):
        replay(single, overwrite=True)
    with pytest.raises(ValueError, match="unknown config key"):
        replay(tmp_path / "new", overrides={"no_such_setting": 1})


def test_a_stage_is_kept_only_when_its_config_and_parent_are_unchanged(tmp_path: Path, monkeypatch) -> None:
    """An unchanged stage is kept; one whose parent was retrained is trained again (what it was fine-tuned from is
    gone); a changed config is refused without --overwrite; a stage cut short resumes."""
    import core.train.fit
    from core.train.shipped import train_stage

    calls: list[tuple[Path, bool]] = []

    def fake_fit(cfg: RunConfig, run_dir: Path, resume: bool = False) -> Path:
        calls.append((run_dir, resume))
        runs.write_config(cfg, run_dir)
        for name in (runs.MODEL_FILE, runs.METRICS_FILE):
            (run_dir / name).write_bytes(b"")
        return run_dir

    monkeypatch.setattr(core.train.fit, "fit", fake_fit)
    cfg, run_dir = RunConfig(epochs=1), tmp_path / "stage"
    run_dir.mkdir()
    assert train_stage(cfg, run_dir, overwrite=False, parent_retrained=False) == "trained"
    assert train_stage(cfg, run_dir, overwrite=False, parent_retrained=False) == "kept"
    assert train_stage(cfg, run_dir, overwrite=False, parent_retrained=True) == "trained"
    with pytest.raises(ValueError, match="another config"):
        train_stage(dataclasses.replace(cfg, epochs=2), run_dir, overwrite=False, parent_retrained=False)
    assert train_stage(dataclasses.replace(cfg, epochs=2), run_dir, overwrite=True, parent_retrained=False) == "trained"
    (run_dir / runs.METRICS_FILE).unlink()
    (run_dir / runs.STATE_FILE).write_bytes(b"")
    assert train_stage(dataclasses.replace(cfg, epochs=2), run_dir, False, False) == "resumed"
    assert [resume for _, resume in calls] == [False, False, False, True]


def test_the_whole_chain_replays_at_a_tiny_size(ham_dir: Path, small_split: Path, tmp_path: Path) -> None:
    """Every stage of both members trains, each from the one before, into its own folder; then the ensemble is
    calibrated, evaluated, audited, stress-tested (both suites, val and test) and indexed like the shipped run, and
    its members carry their whole lineage. A second replay keeps every trained stage."""
    import train

    out = tmp_path / "shipped"
    argv = ["shipped", "--out", str(out), "--device", "cpu", "--data-dir", str(ham_dir), "--split-file",
            str(small_split), "--epochs", "1", "--input-size", "64", "--limit", "8"]
    code, said, err = run_main(train.main, *argv)
    assert code == 0, err
    recipe = read_recipe()
    for member, stages in recipe.members.items():
        parent = None
        for stage in stages:
            run_dir = stages_dir(out) / stage.name
            cfg = runs.read_config(run_dir)
            assert cfg.init_from == (None if parent is None else str(parent))
            assert (cfg.epochs, cfg.input_size, cfg.model) == (1, 64, stage_config(stage, None, {}).model)
            parent = run_dir
        lineage = read_lineage(out / "members" / member)
        assert list(dict.fromkeys(lineage["stage"])) == [s.name for s in stages]
        assert lineage["epoch"].tolist() == list(range(1, len(stages) + 1))
    shipped = runs.read_config(out)
    assert shipped.ensemble == [f"members/{m}" for m in recipe.members] and shipped.tta_views == recipe.tta_views
    # calibrated, or (a one-epoch model on 64 images may rank val no better than chance) said why not
    assert (shipped.calibration != [1.0, 0.0]) != ("not calibrated (calibration slope" in said)
    for made in (runs.METRICS_FILE, runs.attention_file("test"), runs.stress_file("val"), runs.stress_file("test"),
                 runs.acquisition_file("val"), runs.acquisition_file("test"), runs.INDEX_FILE, runs.OOD_SUMMARY):
        assert (out / made).is_file(), made
    code, again, _ = run_main(train.main, *argv)  # an earlier replay of the recipe goes on: nothing to train
    assert code == 0 and again.count(": kept (") == sum(len(s) for s in recipe.members.values())
    code, _, err = run_main(train.main, *argv, "--init-from", "runs/x")
    assert code == 2 and "starts from the one before it" in err
