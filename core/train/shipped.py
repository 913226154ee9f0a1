"""The shipped model, rebuilt from its committed recipe (``configs/shipped/recipe.yaml``, ``train.py shipped``).

Each member is a chain of stages: the first from the ImageNet weights, every later one fine-tuned from the one
before, each a config file that says what it changes. The replay trains every stage into a folder of its own, then
does what shipping did: one ensemble of the members' last stages, Platt calibration on val (which evaluates it),
the Grad-CAM audit of test, both stress tests on val and test, and the embedding index. A stage that is already
trained with the same config is kept, and one cut short is resumed, so an interrupted replay goes on where it
stopped. The replay does not match the shipped weights bit for bit (thread counts, kernels and hardware change the
arithmetic): its figures are recorded beside the shipped ones (docs/training.md).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from core import runs
from core.config import RunConfig
from core.data import PROJECT_ROOT

RECIPE = PROJECT_ROOT / "configs" / "shipped" / "recipe.yaml"


@dataclass(frozen=True)
class Stage:
    name: str          # the run folder it was trained in (the last stage's is the member's name)
    config: Path
    run: int | None    # its row in benchmarks/experiments.md


@dataclass(frozen=True)
class Recipe:
    members: dict[str, list[Stage]]
    tta_views: Literal[1, 2, 3, 4]


def read_recipe(path: str | Path = RECIPE) -> Recipe:
    """The recipe file, checked: every stage names an existing config, stage names are unique, and each member's
    last stage carries the member's name (the ensemble names a member by its run folder)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path} is not valid YAML ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("members"), dict) or not data["members"]:
        raise ValueError(f"{path}: `members` must map each member's name to its list of stages")
    members: dict[str, list[Stage]] = {}
    for member, entries in data["members"].items():
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{path}: member {member} has no stages")
        stages = []
        for entry in entries:
            if not isinstance(entry, dict) or not {"stage", "config"} <= set(entry):
                raise ValueError(f"{path}: every stage of {member} needs `stage` and `config`, got {entry!r}")
            config = path.parent / str(entry["config"])
            if not config.is_file():
                raise ValueError(f"{path}: stage {entry['stage']} names {config}, which does not exist")
            run = entry.get("run")
            if run is not None and not isinstance(run, int):
                raise ValueError(f"{path}: stage {entry['stage']}'s `run` is its row number in experiments.md, "
                                 f"got {run!r}")
            stages.append(Stage(runs.check_name(str(entry["stage"]), "stage"), config, run))
        if stages[-1].name != member:
            raise ValueError(f"{path}: member {member}'s last stage must be named {member}, got {stages[-1].name}")
        members[member] = stages
    names = [s.name for stages in members.values() for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: stage names must be unique, got {names}")
    tta_views = data.get("tta_views", 1)
    if tta_views not in (1, 2, 3, 4):
        raise ValueError(f"{path}: tta_views must be 1, 2, 3 or 4, got {tta_views!r}")
    return Recipe(members, cast(Literal[1, 2, 3, 4], tta_views))


def stages_dir(out: Path) -> Path:
    """Where the stages' runs go: beside the shipped run, not in it, so that the run folder stays what ships."""
    return out.with_name(f"{out.name}_stages")


def stage_config(stage: Stage, parent: Path | None, overrides: dict[str, Any]) -> RunConfig:
    """The stage's file over the base recipe, with ``overrides`` (data, device, a smaller size) on top and the
    previous stage's run as its starting weights."""
    settings = {**dataclasses.asdict(RunConfig.from_yaml(stage.config)), **overrides,
                "init_from": None if parent is None else str(parent)}
    return RunConfig.from_dict(settings, source=f"stage {stage.name} with the replay's settings")


MACHINE_SETTINGS: dict[str, Any] = {"device": "auto", "eval_batch_size": 1, "compile": False}  # how, not what, trains


def same_recipe(a: RunConfig, b: RunConfig) -> bool:
    """Equal but for the machine it ran on: a replay started on a CPU may go on on a GPU."""
    return dataclasses.replace(a, **MACHINE_SETTINGS) == dataclasses.replace(b, **MACHINE_SETTINGS)


def train_stage(cfg: RunConfig, run_dir: Path, overwrite: bool, parent_retrained: bool) -> str:
    """Train one stage; keep it when it is already trained with this recipe from an unchanged parent, resume it
    when it was cut short. Returns what was done: "trained", "kept" or "resumed"."""
    from core.train.fit import fit

    held = (run_dir / runs.CONFIG_FILE).is_file()
    same = held and same_recipe(runs.read_config(run_dir, need_weights=False), cfg)
    if same and not parent_retrained:
        if (run_dir / runs.MODEL_FILE).is_file() and (run_dir / runs.METRICS_FILE).is_file():
            return "kept"
        if (run_dir / runs.STATE_FILE).is_file():
            fit(runs.read_config(run_dir, need_weights=False), run_dir, resume=True)
            return "resumed"
    elif held and not same and not overwrite:
        raise ValueError(f"{run_dir} holds a run with another config than this stage's; pass --overwrite to "
                         "train the stage again, or choose another --out")
    fit(cfg, run_dir)  # new, or its parent's weights changed: what it was fine-tuned from is gone
    return "trained"


def check_destination(out: Path, recipe: Recipe, overwrite: bool) -> None:
    """The replay writes into ``out``: an earlier replay of this recipe there goes on; the shipped model itself,
    a trained single run, or (without --overwrite) any other run there is refused."""
    if out == runs.DEFAULT_RUN.resolve():
        raise ValueError(f"{out} is the shipped model itself: replay into another --out and compare")
    if not runs.is_run_dir(out):
        return
    cfg = runs.read_config(out, need_weights=False)
    if not cfg.ensemble:
        raise ValueError(f"{out} holds a trained single run; choose another --out")
    own = cfg.ensemble == [f"{runs.MEMBERS_DIR}/{m}" for m in recipe.members] and stages_dir(out).is_dir()
    if not own and not overwrite:
        raise ValueError(f"{out} already holds another run; pass --overwrite to replace it with the replay, or "
                         "choose another --out")


def replay(out: str | Path, recipe_path: str | Path = RECIPE, overrides: dict[str, Any] | None = None,
           limit: int | None = None, overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Every stage of every member, then the ensemble and what shipping does; returns the shipped run's folder.
    ``overrides`` are config settings set on every stage (the device, a candidate's options, a smaller size);
    ``limit`` caps the images of the audit and the stress tests (None: as shipped)."""
    from core.audit.attention import explain_split
    from core.audit.ood import build_index
    from core.audit.stress import ACQUISITION_LIMIT, acquisition_split, stress_split
    from core.calibration import CalibrationError
    from core.ensemble import create_ensemble
    from core.evaluation import calibrate_run, evaluate_run

    out = Path(out).resolve()  # a stage's init_from must name the same folder from wherever it is read
    recipe = read_recipe(recipe_path)
    check_destination(out, recipe, overwrite)
    overrides = overrides or {}
    device = overrides.get("device", "auto")
    for stages in recipe.members.values():  # every stage's settings checked before hours of training, not after
        for stage in stages:
            stage_config(stage, None, overrides)
    last_stages: list[str | Path] = []
    for member, stages in recipe.members.items():
        parent: Path | None = None
        retrained = False
        for i, stage in enumerate(stages, 1):
            run_dir = stages_dir(out) / stage.name
            done = train_stage(stage_config(stage, parent, overrides), run_dir, overwrite, retrained)
            log(f"{member}, stage {i}/{len(stages)} {stage.name}: {done} ({run_dir})")
            parent, retrained = run_dir, retrained or done != "kept"
        last_stages.append(run_dir)
    create_ensemble(last_stages, out, recipe.tta_views, overwrite=True)
    log(f"ensemble of {len(last_stages)} members in {out}; calibrating and evaluating")
    try:
        calibrate_run(out, device)
    except CalibrationError as err:  # a smoke replay's few-image model may rank no better than chance on val
        log(f"not calibrated ({err}); evaluated as it is")
        evaluate_run(out, device)
    explain_split(out, "test", limit=limit, device_name=device)
    for split in ("val", "test"):
        stress_split(out, split, limit=limit, device_name=device)
        acquisition_split(out, split, limit=ACQUISITION_LIMIT if limit is None else limit, device_name=device)
    build_index(out, device)
    log(f"done: {out} holds the replayed shipped model (compare: python train.py evaluate --run {out})")
    return out
