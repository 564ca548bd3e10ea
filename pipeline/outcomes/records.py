"""Typed records of the result documents: one strict pydantic model per file.

The producers return these records (``suppression_statistics``, ``steering_statistics``,
``shared_neuron_statistics``) or their stages build them (the masks stage's attribution metrics,
model quality), and the stages write them with ``write_record``; the report loads each file
through its record again. A missing or misspelt field stops the producer, or the report, with
one line naming the result and the field instead of leaving a blank cell. A record dumps back
(``document()``) to the document it was made from, key for key and number for number (an int
stays an int).

Map of this module:
- ``IntervalRecord`` {value, ci_low, ci_high} (None where the producer's value was not
  finite); ``DecidedInterval`` adds its ``verdict``.
- ``Comparison``: a difference's name ("hones-minus-random") parsed once into
  (method, baseline); any other form of name is refused.
- ``SuppressionRecord``: ``suppression.json`` of the evaluate and transfer stages
  (``pipeline.outcomes.suppression.suppression_statistics``), per utility a
  ``UtilitySuppression``.
- ``SteeringRecord``: ``steering_intervals.json`` of the steer and transfer stages
  (``pipeline.outcomes.steering.steering_statistics``), per utility a ``UtilitySteering``.
- ``AttributionRecord``: ``metrics/attribution/<m>.json`` (stage ``masks``).
- ``QualityRecord``: ``metrics/model_quality/<m>.json``
  (``pipeline.model.quality.evaluate_model_quality``).
- ``SharedNeuronsRecord``: ``shared_neurons/<m>/shared.json``
  (``pipeline.outcomes.shared_neurons.shared_neuron_statistics``).
- ``TransferRecord``: the transfer stage's two documents, each None where the stage measured
  nothing (it writes ``{}``); for a transfer_ood stage also its set's ``OodImportRecord``.
- ``as_record(cls, document, what)``: a producer's document as its record, checked to dump
  back to the same JSON; ``write_record(record, path)``: the file a stage writes.
- ``load_record(cls, path)`` (also ``cls.load(path)``) and ``load_transfer(folder)``: read a
  file into its record; ``RecordError`` (a ``PipelineError``) names the file and every invalid
  field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StrictFloat,
    StrictInt,
    ValidationError,
    model_serializer,
    model_validator,
)

from pipeline.errors import PipelineError
from pipeline.io import write_json
from pipeline.outcomes.statistics import Interval

UTILITIES = ("likelihood", "generative")
Verdict = Literal["holds", "fails", "equivalent", "undecided"]
# A JSON number as written: an int stays an int and a float a float (NaN included), so that a
# record dumps back to the same text.
Number = StrictInt | StrictFloat


class RecordError(PipelineError):
    """A result file is absent, not JSON, or not the document its stage writes."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def document(self) -> dict:
        """The JSON document this record was read from (fields it did not hold left out)."""
        return self.model_dump(by_alias=True, exclude_unset=True)

    @classmethod
    def load(cls: type[R], path: Path) -> R:
        return load_record(cls, path)


R = TypeVar("R", bound=_Record)


# --- intervals and comparisons ------------------------------------------------------------------


class IntervalRecord(_Record):
    """A value with its bootstrap interval (None: not finite when it was written)."""

    value: Number | None
    ci_low: Number | None
    ci_high: Number | None

    def to_interval(self) -> Interval:
        """As ``statistics.Interval``, NaN where the record holds None."""
        return Interval(*(float("nan") if v is None else float(v) for v in (self.value, self.ci_low, self.ci_high)))


class DecidedInterval(IntervalRecord):
    """An interval with the verdict its producer decided (``statistics.verdict``)."""

    verdict: Verdict


class Comparison(NamedTuple):
    """A difference "<method>-minus-<baseline>", parsed."""

    method: str
    baseline: str

    def __str__(self) -> str:
        return f"{self.method}-minus-{self.baseline}"


_COMPARISON = re.compile(r"^([A-Za-z0-9_]+)-minus-([A-Za-z0-9_]+)$")


def parse_comparison(name: Any) -> Comparison:
    """``Comparison`` of a name "<method>-minus-<baseline>" (method names: letters, digits, _)."""
    if isinstance(name, Comparison):
        return name
    match = _COMPARISON.match(name) if isinstance(name, str) else None
    if not match:
        raise ValueError(f"comparison name {name!r} is not of the form '<method>-minus-<baseline>'")
    return Comparison(*match.groups())


ComparisonName = Annotated[Comparison, PlainValidator(parse_comparison), PlainSerializer(str)]


# --- suppression (evaluate and transfer stages) --------------------------------------------------


class _Figures(_Record):
    def intervals(self) -> dict[str, IntervalRecord]:
        """{figure: interval} of the figures this record holds, in their order."""
        return {k: getattr(self, k) for k in type(self).model_fields if k in self.model_fields_set}


class MethodSummary(_Figures):
    """One method's headline figures (relative drop, %)."""

    on_target_drop: IntervalRecord
    off_target_drop: IntervalRecord
    selectivity: IntervalRecord


class CurvePoint(_Figures):
    """On- and off-target drop of one method at one mask size (or their area under the curve)."""

    on_target_drop: IntervalRecord
    off_target_drop: IntervalRecord


class ComparisonDifference(_Record):
    """One comparison's difference in on-target drop and in selectivity, each decided."""

    on_target_drop: DecidedInterval
    selectivity: DecidedInterval


class DrawDistribution(_Record):
    """The random masks' draws of one figure: mean, central percentiles, number of draws."""

    mean: Number
    p2_5: Number = Field(alias="p2.5")
    p97_5: Number = Field(alias="p97.5")
    n: StrictInt


class RandomDraws(_Record):
    on_target_drop: DrawDistribution
    off_target_drop: DrawDistribution
    selectivity: DrawDistribution


class Sensitivity(_Record):
    """Whether the evaluation sees the ground truth's own effect."""

    ground_truth_on_target_drop: IntervalRecord
    excludes_zero: bool
    half_width_within_third: bool
    per_task: dict[str, IntervalRecord]


class UtilitySuppression(_Record):
    """One utility's suppression statistics.

    baseline {task: interval}; relative_drop {method: {target: {evaluated: interval}}};
    summary {method: figures}; random_draws (several random draws); differences
    {comparison: figures} (any comparison); curve {method: {rho: figures}} and auc {method:
    figures} (several mask sizes); sensitivity (the ground truth evaluated)."""

    baseline: dict[str, IntervalRecord]
    relative_drop: dict[str, dict[str, dict[str, IntervalRecord]]]
    summary: dict[str, MethodSummary]
    random_draws: RandomDraws | None = None
    differences: dict[ComparisonName, ComparisonDifference] | None = None
    curve: dict[str, dict[str, CurvePoint]] | None = None
    auc: dict[str, CurvePoint] | None = None
    sensitivity: Sensitivity | None = None

    def difference(self, method: str, baseline: str) -> ComparisonDifference | None:
        """The difference "<method>-minus-<baseline>" (None when it was not compared)."""
        return (self.differences or {}).get(Comparison(method, baseline))


class SuppressionRecord(_Record):
    """A ``suppression.json`` (evaluate stage, or transfer stage when it measured something)."""

    confidence: Number
    resamples: StrictInt
    equivalence_margin: Number
    items_per_task: dict[str, dict[str, StrictInt]]
    likelihood: UtilitySuppression
    generative: UtilitySuppression | None = None

    def of(self, utility: str) -> UtilitySuppression | None:
        """One utility's statistics (None when it was not evaluated)."""
        if utility not in UTILITIES:
            raise ValueError(f"unknown utility {utility!r}")
        return getattr(self, utility)


# --- steering (steer and transfer stages) --------------------------------------------------------


class UtilitySteering(_Record):
    """One utility's steering statistics: utility {task | "mean": {variant: interval}} and
    differences {comparison: {task | "mean": decided interval}}."""

    utility: dict[str, dict[str, IntervalRecord]]
    differences: dict[ComparisonName, dict[str, DecidedInterval]]

    def mean_difference(self, method: str, baseline: str) -> DecidedInterval | None:
        """The mean over tasks of "<method>-minus-<baseline>" (None when not compared)."""
        return self.differences.get(Comparison(method, baseline), {}).get("mean")


class ScaleMovement(_Record):
    mean_abs_change: Number
    max_abs_change: Number


class SteeringRecord(_Record):
    """A ``steering_intervals.json``: per utility (the steered one and the likelihood) its
    statistics, and how far the learned scales moved per task."""

    confidence: Number
    resamples: StrictInt
    generative: UtilitySteering | None = None
    likelihood: UtilitySteering | None = None
    scale_movement: dict[str, ScaleMovement]

    def of(self, utility: str) -> UtilitySteering | None:
        if utility not in UTILITIES:
            raise ValueError(f"unknown utility {utility!r}")
        return getattr(self, utility)


# --- attribution metrics (masks stage) ----------------------------------------------------------


class MethodFaithfulness(_Record):
    """One method's agreement with the ablation ground truth (``pipeline.method.masks.faithfulness``);
    the significant-neuron figures only where the ground truth has standard errors."""

    spearman: Number
    precision_at_k: Number
    k: StrictInt
    captured_effect: Number
    n_significant: StrictInt | None = None
    spearman_significant: Number | None = None

    def figures(self) -> dict[str, Any]:
        """{figure: value} of the figures it holds, in the file's order."""
        return self.document()


class GroundTruthSE(_Record):
    median: Number
    max: Number


class TaskFaithfulness(_Record):
    """One task's faithfulness: {method: figures} and the ground truth's standard errors (in the
    file, a "ground_truth_se" entry beside the methods)."""

    methods: dict[str, MethodFaithfulness]
    ground_truth_se: GroundTruthSE | None = None

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        if isinstance(data, dict) and "methods" not in data:
            methods = {k: v for k, v in data.items() if k != "ground_truth_se"}
            se = {"ground_truth_se": data["ground_truth_se"]} if "ground_truth_se" in data else {}
            return {"methods": methods, **se}
        return data

    @model_serializer(mode="wrap")
    def _merge(self, handler: Any) -> dict:
        out = handler(self)
        return {**out["methods"], **({"ground_truth_se": out["ground_truth_se"]} if "ground_truth_se" in out else {})}


class LayerPreference(_Record):
    """Cramér's V of the HONES masks' layers against its permutation null."""

    cramers_v: IntervalRecord
    null_q95: Number
    p_value: Number
    verdict: Verdict


class AttributionRecord(_Record):
    """``metrics/attribution/<m>.json``: the masks' size, faithfulness (empty without a ground
    truth), the HONES masks' Jaccard overlap, and their layer preference (several tasks)."""

    mask_size: StrictInt
    faithfulness: dict[str, TaskFaithfulness]
    faithfulness_on_ablation_items: dict[str, dict[str, MethodFaithfulness]]
    overlap_jaccard_hones: dict[str, dict[str, Number]]
    layer_preference_hones: LayerPreference | None = None


# --- model quality ------------------------------------------------------------------------------


# The per-task utilities a QualityRecord holds (what `of` gives).
QUALITY_UTILITIES = ("generative", "likelihood", "generative_standard")


class QualityRecord(_Record):
    """``metrics/model_quality/<m>.json``: {task: value} per utility measured."""

    generative: dict[str, Number | None] | None = None
    likelihood: dict[str, Number | None] | None = None
    generative_standard: dict[str, Number | None] | None = None
    # {task: {question type: generative value}}, tasks whose items have several types.
    generative_by_question_type: dict[str, dict[str, Number | None]] | None = None

    def of(self, utility: str) -> dict[str, Number | None] | None:
        if utility not in QUALITY_UTILITIES:
            raise ValueError(f"unknown quality utility {utility!r}")
        return getattr(self, utility)


# --- shared neurons -----------------------------------------------------------------------------


class SharedMinusSubset(_Record):
    on_pair: IntervalRecord
    cross_task: IntervalRecord | None = None


class PairFigures(_Record):
    """One pair of tasks: how many neurons their masks share, the drop zeroing them (and each
    matched subset) causes on the pair's tasks and the others, and shared minus subset."""

    shared_neurons: StrictInt
    on_pair: dict[str, IntervalRecord]
    cross_task: dict[str, IntervalRecord] | None = None
    shared_minus_subset: SharedMinusSubset


class VqaPairsClaim(DecidedInterval):
    pairs_with_vqa: list[str]
    other_pairs: list[str]


class SharedMinusSubsetClaim(DecidedInterval):
    pairs: list[str]


class SharedClaims(_Record):
    vqa_pairs_minus_others: VqaPairsClaim | None = None
    shared_minus_subset: SharedMinusSubsetClaim | None = None


class SharedNeuronsRecord(_Record):
    """``shared_neurons/<m>/shared.json`` (no pairs, claims, confidence or resamples when no two
    masks share a neuron)."""

    mask_size: Number
    utility: str
    confidence: Number | None = None
    resamples: StrictInt | None = None
    pairs: dict[str, PairFigures]
    claims: SharedClaims


# --- transfer -----------------------------------------------------------------------------------


class OodImportRecord(_Record):
    """``import.json`` of an out-of-distribution import (``pipeline.tasks.ood_import.import_ood``):
    items per task, images, and the one-line reason of every record left out (``skip_bad``)."""

    format: str
    records_file: str
    split: str
    items: dict[str, StrictInt]
    images: StrictInt
    skipped: list[str]


class TransferRecord(_Record):
    """The transfer stage's ``suppression.json`` and ``steering_intervals.json``; each None where
    the stage measured nothing (no out-of-distribution split: it writes ``{}``)."""

    suppression: SuppressionRecord | None
    steering: SteeringRecord | None
    # A set you brought (transfer_ood stage): its import's summary (``import.json``); None for
    # the benchmark's own ood split.
    imported: OodImportRecord | None = None


# --- loading ------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: file not found; run the stage that writes it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e})") from None


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(document)"


def validate_record(cls: type[R], document: Any, source: str) -> R:
    """``document`` as a ``cls``; RecordError naming ``source`` and every invalid field."""
    try:
        return cls.model_validate(document)
    except ValidationError as e:
        problems = "; ".join(f"{_field(err['loc'])}: {err['msg']}" for err in e.errors())
        raise RecordError(f"{source}: not a valid {cls.__name__}: {problems}") from None


def as_record(cls: type[R], document: dict, what: str) -> R:
    """``document``, a producer's result, as its record ``cls``: RecordError naming ``what``
    and every invalid field, or when the record would not write back the very same JSON (a
    key it drops or reorders), so that what a stage writes is exactly what was computed."""
    record = validate_record(cls, document, what)
    if json.dumps(record.document()) != json.dumps(document):
        raise RecordError(f"{what}: the {cls.__name__} does not write back the document it was made from")
    return record


def write_record(record: _Record, path: Path) -> None:
    """``record``'s document as the stage's JSON file ``path`` (``io.write_json``: atomic)."""
    write_json(record.document(), path)


def load_record(cls: type[R], path: Path) -> R:
    """The record ``cls`` of the JSON file ``path``."""
    return validate_record(cls, _read_json(path), str(path))


def load_transfer(folder: Path, *, imported: bool = False) -> TransferRecord:
    """The transfer stage's documents in ``folder`` (each None where it wrote ``{}``); with
    ``imported``, a transfer_ood stage's folder, which also holds its set's ``import.json``."""
    folder = Path(folder)
    docs = {name: _read_json(folder / f"{name}.json") for name in ("suppression", "steering_intervals")}
    return TransferRecord(
        imported=load_record(OodImportRecord, folder / "import.json") if imported else None,
        suppression=validate_record(SuppressionRecord, docs["suppression"], str(folder / "suppression.json"))
        if docs["suppression"] != {}
        else None,
        steering=validate_record(SteeringRecord, docs["steering_intervals"], str(folder / "steering_intervals.json"))
        if docs["steering_intervals"] != {}
        else None,
    )
