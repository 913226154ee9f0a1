"""The run directory's JSON files as types: one frozen dataclass per file (and per nested section), with field names
equal to the JSON keys, so a file reads into attributes and writes back to the same JSON.

Producers build these and call ``core.runs.write_…``; readers call ``core.runs.read_…`` and get them back. The
conversion is generic (:func:`parse`, :func:`dump`) and driven by the type hints, so a new field is one line here.
Mappings keyed by data (split, intervention, edit, source, threshold and test names) stay ``dict[str, …]``.

Old files: unknown keys are ignored; a field that older runs lack has a default (``None``), and :func:`dump` leaves
it out while it is None, so a file written without it is written the same way again. A missing required key or a
value of the wrong type is a :class:`FieldError` naming the key's path, which ``core.runs`` turns into a
``RunError`` naming the file and the command that rebuilds it.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import pandas as pd

WITH = "with"            # field metadata: an optional field written (null too) whenever the named field is there
REST = "rest"            # field metadata: the object's other keys (each a row of the field's value type)
INLINE = "inline"        # field metadata: a dataclass whose keys sit in the enclosing object, not under the field


class FieldError(ValueError):
    """A run file's key is missing or holds the wrong type; ``key`` is its dotted path in the file."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"'{key}' {problem}")
        self.key, self.problem = key, problem


def written_with(other: str) -> Any:
    """An optional field that is there (None as null) exactly when the optional field ``other`` is: e.g. a camera
    edit's multiple of its floor, null for a zero floor, beside the floor that a neutral edit has not."""
    return field(default=None, metadata={WITH: other})


def rest() -> Any:
    """A field holding every key of the JSON object that no other field names and whose value is an object (e.g. one
    row per intervention beside fixed keys)."""
    return field(default_factory=dict, metadata={REST: True})


def inline() -> Any:
    """A dataclass field whose keys are written into the enclosing JSON object (e.g. a site profile's operating
    point, which ``core.sites`` computes on its own, beside the profile's name and source)."""
    return field(metadata={INLINE: True})


# ---------------------------------------------------------------------------------------------------------------
# Conversion: JSON values ↔ the dataclasses below
# ---------------------------------------------------------------------------------------------------------------
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse(kind: Any, value: Any, key: str = "") -> Any:
    """``value`` (from ``json.loads``) as ``kind``: a dataclass, ``dict[str, X]``, ``list[X]``, ``tuple[X, …]``,
    ``X | None``, a scalar or ``Any``; :class:`FieldError` where it does not fit."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return _parse_object(kind, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return parse(inner[0], value, key)
    if origin is dict:
        _expect(isinstance(value, dict), key, "an object", value)
        return {k: parse(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        _expect(isinstance(value, list | tuple), key, "a list", value)
        items = [parse(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    return _parse_scalar(kind, value, key)


def _parse_object(cls: type, value: Any, key: str) -> Any:
    _expect(isinstance(value, dict), key, "an object", value)
    hints, named = _hints(cls), {f.name for f in dataclasses.fields(cls) if not f.metadata.get(REST)}
    values = {}
    for f in dataclasses.fields(cls):
        path = f"{key}.{f.name}" if key else f.name
        if f.metadata.get(REST):
            row = typing.get_args(hints[f.name])[1]
            values[f.name] = {k: parse(row, v, f"{key}.{k}" if key else k) for k, v in value.items()
                              if k not in named and isinstance(v, dict)}  # a newer scalar key is ignored, as elsewhere
        elif f.metadata.get(INLINE):
            values[f.name] = _parse_object(hints[f.name], value, key)
        elif f.name in value:
            values[f.name] = parse(hints[f.name], value[f.name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise FieldError(path, "is missing")
    return cls(**values)


_SCALARS: dict[Any, tuple[type, ...]] = {float: (float, int), int: (int,), str: (str,), bool: (bool,)}
_NAMES = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}


def _parse_scalar(kind: Any, value: Any, key: str) -> Any:
    if kind is Any:
        return value
    ok = isinstance(value, _SCALARS[kind]) and (kind is bool or not isinstance(value, bool))
    _expect(ok, key, _NAMES[kind], value)
    return value


def _expect(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise FieldError(key or "(the file)", f"should be {what}, not {type(value).__name__} {str(value)[:40]!r}")


def dump(value: Any) -> Any:
    """The JSON value of a dataclass (in field order; an optional field left out while None) or of what it holds."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.metadata.get(REST):
                out |= {k: dump(v) for k, v in item.items()}
            elif f.metadata.get(INLINE):
                out |= dump(item)
            elif item is not None or f.default is not None or getattr(value, f.metadata.get(WITH, f.name)) is not None:
                out[f.name] = dump(item)
        return out
    if isinstance(value, dict):
        return {k: dump(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [dump(v) for v in value]
    return value


def frame(rows: list[Any] | dict[str, Any]) -> pd.DataFrame:
    """A table of dataclass rows for a chart or a page: one row each (a dict's keys become the index)."""
    if isinstance(rows, dict):
        return pd.DataFrame([dataclasses.asdict(row) for row in rows.values()], index=list(rows))
    return pd.DataFrame([dataclasses.asdict(row) for row in rows])


Interval = tuple[float, float]


# ---------------------------------------------------------------------------------------------------------------
# metrics.json (train.py evaluate)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ThresholdMetrics:
    """The confusion matrix and its rates at one threshold (``core.metrics.binary_metrics``)."""
    threshold: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    balanced_accuracy: float
    f1: float
    macro_f1: float
    accuracy: float
    tn: int
    fp: int
    fn: int
    tp: int


@dataclass(frozen=True, kw_only=True)
class SplitMetrics:
    """One split's AUROC (bootstrap CI) and the metrics at each val-chosen threshold (name → metrics)."""
    n: int
    n_malignant: int
    auroc: float
    auroc_ci: Interval
    at_threshold: dict[str, ThresholdMetrics]


@dataclass(frozen=True, kw_only=True)
class Rates:
    sensitivity: float
    specificity: float


@dataclass(frozen=True, kw_only=True)
class SourceMetrics:
    """One source's share of a set; AUROC and its CI are None when the source holds one class only."""
    n: int
    n_malignant: int
    auroc: float | None
    auroc_ci: Interval | None
    at_threshold: dict[str, Rates]


@dataclass(frozen=True, kw_only=True)
class DxSourceP:
    """P(malignant) of one diagnosis × source cell."""
    dx: str | None
    source: str
    n: int
    median: float
    mean: float


@dataclass(frozen=True, kw_only=True)
class SourceReport:
    """Per source metrics and the source-stratified AUROC (``core.metrics.source_report``)."""
    sources: dict[str, SourceMetrics]
    stratified_auroc: float | None
    stratified_over: list[str]
    pooled_auroc: float | None
    p_by_dx_source: list[DxSourceP]


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """The reliability diagram's bins (``core.metrics.calibration``)."""
    ece: float
    mean_predicted: list[float]
    fraction_positive: list[float]
    count: list[int]


@dataclass(frozen=True, kw_only=True)
class Subgroup:
    """The test AUROC of one metadata subgroup (None where it holds one class)."""
    group: str
    value: str
    n: int
    n_malignant: int
    auroc: float | None


@dataclass(frozen=True, kw_only=True)
class Evaluated:
    """What was evaluated, and where and when."""
    model: str
    ensemble: list[str]
    input_size: int
    tta_views: int
    calibration: list[float]
    n_val: int
    n_test: int
    evaluated_on: str
    date: str


@dataclass(frozen=True, kw_only=True)
class Metrics:
    """``metrics.json``: thresholds chosen on val, and val and test at them; per source, calibration, subgroups."""
    min_sensitivity: float
    thresholds: dict[str, float]
    val: SplitMetrics
    test: SplitMetrics
    sources_val: SourceReport | None = None
    sources_test: SourceReport | None = None
    calibration_test: Calibration | None = None
    subgroups_test: list[Subgroup] | None = None
    run: Evaluated | None = None


# ---------------------------------------------------------------------------------------------------------------
# attention_summary.json (train.py explain)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class FlagRate:
    n: int
    flagged: int
    rate: float


@dataclass(frozen=True, kw_only=True)
class FlaggedAuroc:
    flagged: float
    unflagged: float


@dataclass(frozen=True, kw_only=True)
class DeletionChange:
    """Mean change of p when the CAM's top 20 % is blurred or removed, and when another image's CAM region is."""
    blur_mean: float
    blur_mean_abs: float
    remove_mean: float
    remove_mean_abs: float
    blur_other_cam_mean_abs: float


@dataclass(frozen=True, kw_only=True)
class LesionRatio:
    median: float
    mean_finite: float
    tschandl_2020: float | None


@dataclass(frozen=True, kw_only=True)
class AttentionSummary:
    """``attention_summary.json``: how often the Grad-CAM is corner-focused and what goes with it."""
    method: str
    threshold_youden_val: float
    corner_flag_rule: str
    n: int
    flagged: FlagRate
    by_correctness: dict[str, FlagRate]
    by_dx: dict[str, FlagRate]
    auroc: FlaggedAuroc
    mean_corner_fraction: float
    corner_vs_dark_corners_spearman: float
    deletion_top20_change: dict[str, DeletionChange]
    background_lesion_ratio_by_dx: dict[str, LesionRatio]
    mean_outside_lesion_fraction: float


# ---------------------------------------------------------------------------------------------------------------
# stress_summary.json (train.py stress): split → StressSection
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class CleanScores:
    """The images as they are, at the val Youden threshold (the acquisition test stores no AUROC CI)."""
    auroc: float
    auroc_ci: Interval | None = None
    sensitivity: float
    specificity: float


@dataclass(frozen=True, kw_only=True)
class InterventionRow:
    """One painted-in artifact: AUROC and its paired change, Δp, flips each way, the rates at the threshold."""
    corner: bool
    auroc: float
    auroc_ci: Interval
    auroc_change: float
    auroc_change_ci: Interval
    mean_delta_p: float
    mean_abs_delta_p: float
    flipped: float
    to_malignant: float
    to_benign: float
    sensitivity: float
    specificity: float


@dataclass(frozen=True, kw_only=True)
class CornerDependence:
    rule: str
    min_delta: float
    checked: list[str]
    n: int
    rate: float


@dataclass(frozen=True, kw_only=True)
class CamCheck:
    """Whether the CAM's corner share predicts one corner intervention's effect."""
    spearman_abs_delta_p: float
    auroc_flipped: float
    cam_flag_among_flipped: int
    flipped: int


@dataclass(frozen=True, kw_only=True)
class CamDependence:
    auroc: float
    spearman_corner_delta_p: float


@dataclass(frozen=True, kw_only=True)
class CamValidation:
    """The CAM against the interventions: the score compared, one row per corner intervention (its own keys in the
    file), and the CAM against the corner-dependence flag."""
    score: str
    interventions: dict[str, CamCheck] = rest()
    corner_dependent: CamDependence


@dataclass(frozen=True, kw_only=True)
class DxDarkness:
    n: int
    mean: float
    median: float


@dataclass(frozen=True, kw_only=True)
class LabelDarkness:
    mean: float
    median: float


@dataclass(frozen=True, kw_only=True)
class DarknessBin:
    low: float
    high: float
    n: int
    malignant: float


@dataclass(frozen=True, kw_only=True)
class DarkCorners:
    """How dark the training images' corners are by class (``core.audit.stress.dark_corners_by_class``)."""
    n: int
    by_dx: dict[str, DxDarkness]
    by_label: dict[str, LabelDarkness]
    malignant_share_by_quantile: list[DarknessBin]
    auroc_dark_corners_for_label: float


@dataclass(frozen=True, kw_only=True)
class StressSection:
    """One split's artifact stress test (``stress_summary.json[split]``)."""
    n: int
    threshold_youden_val: float
    clean: CleanScores
    interventions: dict[str, InterventionRow]
    corner_dependent: CornerDependence
    cam_validation: CamValidation | None = None
    seed: int
    interventions_run: dict[str, str]
    dark_corners_train: DarkCorners | None = None


# ---------------------------------------------------------------------------------------------------------------
# acquisition_summary.json (train.py stress --suite acquisition): split → AcquisitionSection
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class EditRow:
    """One acquisition edit: flips with their exact CI, Δp, AUROC and its paired change, flips per source; a camera
    edit also its floor, its multiple of it (None for a zero floor) and whether it holds."""
    kind: str
    what: str
    n: int
    flipped: float
    flipped_ci: Interval
    to_malignant: float
    to_benign: float
    mean_delta_p: float
    mean_abs_delta_p: float
    auroc: float
    auroc_change: float
    auroc_change_ci: Interval
    sensitivity: float
    specificity: float
    flipped_by_source: dict[str, float]
    floor: float | None = None
    times_floor: float | None = written_with("floor")
    holds: bool | None = None


@dataclass(frozen=True, kw_only=True)
class Floor:
    rule: str
    edits: list[str]
    rate: float


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """Whether every camera edit stays within ``factor`` × its floor."""
    rule: str
    factor: float
    limit: float
    failing: list[str]
    passed: bool
    worst: str | None


@dataclass(frozen=True, kw_only=True)
class Decisions:
    changed_by_a_camera_edit: float
    changed_by_a_neutral_edit: float
    mean_camera_edit: float | None = None
    mean_neutral_edit: float | None = None


@dataclass(frozen=True, kw_only=True)
class SourceColours:
    """A source's typical CIELAB colours (``core.audit.acquisition.ColourStats``)."""
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class AcquisitionSection:
    """One split's acquisition stress test (``acquisition_summary.json[split]``)."""
    n: int
    threshold_youden_val: float
    clean: CleanScores
    edits: dict[str, EditRow]
    floor: Floor
    holds: Verdict
    decisions: Decisions
    seed: int
    limit: int | None
    split_size: int
    edits_run: dict[str, str]
    source_colours: dict[str, SourceColours] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# ood_summary.json (train.py index)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class MistakeScores:
    """Whether the test mistakes (at the val Youden threshold) lie farther from the training data."""
    n: int
    flag_rate_mistakes: float
    flag_rate_correct: float
    median_score_mistakes: float
    median_score_correct: float
    auroc_score_for_mistake: float | None


@dataclass(frozen=True, kw_only=True)
class OODSummary:
    """``ood_summary.json``: the OOD score, its thresholds (the style ones for a run with a style index), flag rates."""
    method: str
    k: int
    dims: int
    raw_dims: int
    percentile: float
    threshold: float
    union_percentile: float | None = None
    style_dims: int | None = None
    style_raw_dims: int | None = None
    style_threshold: float | None = None
    flag_rate: dict[str, float]
    mistakes_test: MistakeScores


# ---------------------------------------------------------------------------------------------------------------
# metrics_external_<name>.json (train.py evaluate --data), and train.py shift --out
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ModelFingerprint:
    """What a threshold or a set's predictions belong to: the weights' hash and the calibration (``core.sites``)."""
    weights: str
    calibration: tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class FlaggedPart:
    """The flagged or the unflagged images of a set: AUROC (None with one class) and the metrics at the val
    thresholds."""
    n: int
    auroc: float | None
    at_threshold: dict[str, ThresholdMetrics]


@dataclass(frozen=True, kw_only=True)
class FlaggedReport:
    """The OOD guard on a labelled set (``core.audit.ood.flagged_report``); a part is None where no image falls
    in it."""
    threshold: float
    share_flagged: float
    flagged: FlaggedPart | None
    unflagged: FlaggedPart | None


@dataclass(frozen=True, kw_only=True)
class DistanceTest:
    """Whether a set's distances to the training images exceed val's (one-sided Mann–Whitney U), and the shares
    beyond the guard's threshold."""
    test: str
    statistic: float
    p_value: float
    median: float
    median_reference: float
    share_flagged: float
    share_flagged_reference: float


@dataclass(frozen=True, kw_only=True)
class CaseMixTest:
    """A test beside the verdict (P(malignant): medians; features: the permutation count)."""
    test: str
    statistic: float
    p_value: float
    median: float | None = None
    median_reference: float | None = None
    permutations: int | None = None


@dataclass(frozen=True, kw_only=True)
class ShiftReport:
    """The set-level shift verdict against val (``core.audit.shift.compare``): distance tests → verdict, the case-mix
    tests beside it; ``against_val`` adds the advice, ``train.py shift`` the image folder."""
    shifted: bool
    p_value: float
    alpha: float
    n: int
    n_reference: int
    adjustment: str
    tests: dict[str, DistanceTest]
    case_mix: dict[str, CaseMixTest]
    date: str
    advice: str | None = None
    images: str | None = None


@dataclass(frozen=True, kw_only=True)
class ExternalMetrics:
    """``metrics_external_<name>.json``: a labelled set at the run's val thresholds. Sets evaluated before the
    folder, the fingerprint, the sources, the OOD guard or the shift check were recorded lack them (None)."""
    name: str
    n: int
    data: str | None = None
    images: str | None = None
    date: str | None = None
    model: ModelFingerprint | None = None
    auroc: float
    auroc_ci: Interval
    at_threshold: dict[str, ThresholdMetrics]
    sources: SourceReport | None = None
    ood: FlaggedReport | None = None
    shift: ShiftReport | None = None


# ---------------------------------------------------------------------------------------------------------------
# sites/<name>.json (train.py site, the Threshold explorer's form)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class OperatingPoint:
    """A threshold chosen on a site's labelled sample and what it is expected to give there
    (``core.sites.choose_operating_point``); ``confidence`` is None except for the pac rule."""
    threshold: float
    rule: str
    target_sensitivity: float
    confidence: float | None
    guarantee: str
    k: int
    n: int
    n_malignant: int
    n_benign: int
    malignant_needed: int
    expected_sensitivity: float
    sensitivity_ci: Interval
    expected_specificity: float
    specificity_ci: Interval
    sample_sensitivity: float


@dataclass(frozen=True, kw_only=True)
class SampleSource:
    """Where a site's sample came from: a labels CSV and its images, or an evaluated external set."""
    set: str | None = None
    data: str | None = None
    images: str | None = None


@dataclass(frozen=True, kw_only=True)
class SiteProfile:
    """``sites/<name>.json``: a site's operating point (its keys at the top level of the file), where the sample
    came from, and the model it is a threshold of."""
    name: str
    point: OperatingPoint = inline()
    sample_date: str
    created: str
    source: SampleSource
    model: ModelFingerprint
