"""What defines an embedded default model: ``DefaultModelSpec``, its architecture and schedule.

Kept apart from the trainer (``default``) so that the params schema can use it without
making every stage depend on the training code.

- ``DefaultModelSpec``: frozen dataclass; sizes in features, learning rates (``lr``: the
  language phase's peak; ``vision_warmup_lr``: the tower's warm-up) per step, ``steps`` in
  optimiser steps. Field constraints are ``Annotated`` so a validator (pydantic) enforces them.
- ``DEFAULT_MODEL_FIELDS``: the fields a params entry sets (all but ``image_size``, which the
  trainer takes from the benchmark's images).
- ``architecture_problems``: the cross-field checks (divisibility of heads), as messages.
- ``check_trained_with``: that a trained folder (``training.json``) came from a given spec, as
  shipped weights must.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from pipeline.errors import PipelineError

FAMILIES = ("llava", "idefics3")
_TASKS = ("vqa", "ocr", "caption", "retrieval")


@dataclass(frozen=True)
class DefaultModelSpec:
    """Architecture (sizes in features) and training schedule of the default model.

    >>> spec = DefaultModelSpec(family="idefics3", patch_size=8, text_kv_heads=2)
    >>> train_default_model(spec, "data/benchmark", "data/models/m", name="m")
    """

    family: Literal["llava", "idefics3"] = "llava"
    patch_size: Annotated[int, Field(ge=1)] = 16
    vision_hidden: Annotated[int, Field(ge=8)] = 128
    vision_layers: Annotated[int, Field(ge=1)] = 6
    vision_heads: Annotated[int, Field(ge=1)] = 4
    vision_ffn: Annotated[int, Field(ge=8)] = 256
    text_hidden: Annotated[int, Field(ge=8)] = 128
    text_layers: Annotated[int, Field(ge=1)] = 4
    text_heads: Annotated[int, Field(ge=1)] = 4
    text_kv_heads: Annotated[int, Field(ge=1)] = 4
    text_ffn: Annotated[int, Field(ge=8)] = 512
    vision_warmup_steps: Annotated[int, Field(ge=0)] = 1500
    # The warm-up's own learning rate (constant): ``lr`` is the language phase's, and the two
    # phases train different parameters with different losses.
    vision_warmup_lr: Annotated[float, Field(gt=0, le=1)] = 1e-3
    steps: Annotated[int, Field(ge=1)] = 3000
    batch_size: Annotated[int, Field(ge=1)] = 32
    lr: Annotated[float, Field(gt=0, le=1)] = 1e-3
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    task_weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in _TASKS})
    # Negatives ranked against each retrieval item's positive in one group: the loss adds a
    # softmax cross-entropy over the group's Yes-minus-No margins, the score the evaluation
    # ranks candidates by. 0: one negative answered "No", a pointwise loss only.
    retrieval_negatives: Annotated[int, Field(ge=0)] = 0
    seed: int = 0
    # Pixels of the square input image; None until the trainer reads it from the benchmark.
    image_size: int | None = None


DEFAULT_MODEL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DefaultModelSpec) if f.name != "image_size")


def architecture_problems(values: dict) -> list[str]:
    """Cross-field problems of spec ``values`` (missing keys take the defaults), one message each."""
    defaults = DefaultModelSpec()
    get = lambda k: values.get(k, getattr(defaults, k))  # noqa: E731
    problems = []
    for width, heads in (
        ("text_hidden", "text_heads"),
        ("text_heads", "text_kv_heads"),
        ("vision_hidden", "vision_heads"),
    ):
        try:
            if int(get(width)) % int(get(heads)):
                problems.append(f"{width} ({get(width)}) must be divisible by {heads} ({get(heads)})")
        except (TypeError, ValueError, ZeroDivisionError):
            pass  # the field validators name a non-integer or zero value
    return problems


# What the model's initialisation and the vision warm-up read: two specs equal on these give the
# same warmed-up tower (on the same benchmark, code and machine), whatever their language phase.
WARM_UP_FIELDS: tuple[str, ...] = tuple(
    f
    for f in DEFAULT_MODEL_FIELDS
    if f.startswith(("vision_", "text_")) or f in ("family", "patch_size", "batch_size", "seed")
)


def _record_differences(folder: Path, spec: DefaultModelSpec, name: str, keys: tuple[str, ...]) -> list[str]:
    """``"field: trained X, params Y"`` for each of ``keys`` on which ``folder``'s ``training.json``
    (a field it lacks counts at its default) differs from ``spec``; ``PipelineError`` naming model
    ``name`` when the record is missing or unreadable."""
    record_path = Path(folder) / "training.json"
    try:
        trained = json.loads(record_path.read_text())["spec"]
    except FileNotFoundError:
        raise PipelineError(
            f"model {name!r}: {record_path} is missing; {folder} is not a folder that train_default_model wrote"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PipelineError(f"model {name!r}: {record_path} is not a training record ({exc})") from None
    defaults, wanted = asdict(DefaultModelSpec()), asdict(spec)
    return [
        f"{k}: trained {trained.get(k, defaults[k])!r}, params {wanted[k]!r}"
        for k in keys
        if trained.get(k, defaults[k]) != wanted[k]
    ]


def check_trained_with(folder: Path, spec: DefaultModelSpec, name: str) -> None:
    """Raise PipelineError unless ``folder`` holds a model trained with ``spec``: its
    ``training.json`` (written by ``train_default_model``) records every field of ``spec`` but
    ``image_size`` with the same value (a field the record lacks counts at its default). The
    message names model ``name``, the folder and each differing field."""
    differ = _record_differences(folder, spec, name, DEFAULT_MODEL_FIELDS)
    if differ:
        raise PipelineError(
            f"model {name!r}: {folder} holds weights of another recipe than the params give "
            f"({'; '.join(differ)}); train the recipe (its train_default_model stage) and ship "
            "that folder, or set the params back"
        )


def check_warmed_up_with(folder: Path, spec: DefaultModelSpec, name: str) -> None:
    """Raise PipelineError unless ``folder``'s vision tower was warmed up as ``spec`` would warm
    it up: its ``training.json`` agrees with ``spec`` on every field of ``WARM_UP_FIELDS``. The
    message names model ``name``, the folder and each differing field."""
    differ = _record_differences(folder, spec, name, WARM_UP_FIELDS)
    if differ:
        raise PipelineError(
            f"model {name!r}: the vision tower in {folder} was warmed up otherwise than the params "
            f"give ({'; '.join(differ)}); train without reusing it"
        )
