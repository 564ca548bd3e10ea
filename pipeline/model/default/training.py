"""Training of the default models: ``train_default_model`` reads the benchmark's train split,
builds the untrained model, warms up its vision tower, trains the projector and language model
on the frozen tower (``_train_language_model``, ``_training_step``) and saves the result with
its ``training.json`` summary."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_directory, resumable_scratch
from pipeline.model.default.build import (
    IDEFICS3_SPECIALS,
    benchmark_vocabulary,
    build_model,
    build_processor,
    build_tokenizer,
    count_parameters,
)
from pipeline.model.default.checkpoints import Checkpoints, _gradients, _restore_model, _restore_rng
from pipeline.model.default.vision import FrozenVisionCache, image_word_targets, vision_tower, warm_up_vision
from pipeline.model.default_spec import DefaultModelSpec, check_warmed_up_with
from pipeline.model.scoring import answer_cross_entropy, answer_token_id
from pipeline.tasks.items import (
    RETRIEVAL_NO,
    RETRIEVAL_YES,
    ImageTable,
    RankingExample,
    TrainingExample,
    read_annotations,
    training_examples,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSplit:
    """The benchmark as training reads it: ``annotations`` of every split (the vocabulary covers
    them all), the ``train`` rows trained on, and the ``images`` table (image_id -> PIL image)."""

    annotations: pd.DataFrame
    train: pd.DataFrame
    images: ImageTable


@dataclass
class TrainingCurves:
    """What the VLM training loop measured, in step order: ``losses`` (mean answer
    cross-entropy of each step's batch, nats), ``task_losses`` (task -> every training row's
    answer cross-entropy, nats) and ``task_steps`` (task -> the step of each of those rows)."""

    losses: list[float] = field(default_factory=list)
    task_losses: dict[str, list[float]] = field(default_factory=dict)
    task_steps: dict[str, list[int]] = field(default_factory=dict)


def _read_train_split(benchmark_dir: Path) -> TrainSplit:
    """The benchmark at ``benchmark_dir``; ``PipelineError`` when it has no train rows."""
    benchmark_dir = Path(benchmark_dir)
    annotations = read_annotations(benchmark_dir / "annotations.parquet")
    train = annotations[annotations["split"] == "train"]
    if train.empty:
        raise PipelineError(f"{benchmark_dir}/annotations.parquet has no 'train' rows to train on")
    return TrainSplit(annotations, train, ImageTable(benchmark_dir / "images.parquet"))


def _build_untrained(spec: DefaultModelSpec, annotations: pd.DataFrame, device: str):
    """(model on ``device``, processor) before training: the family's word-level tokenizer over
    the benchmark vocabulary, its processor, and a model initialised by ``build_model`` (which
    seeds torch with ``spec.seed`` itself). ``processor.tokenizer`` is that tokenizer."""
    tokenizer = build_tokenizer(
        benchmark_vocabulary(annotations), IDEFICS3_SPECIALS if spec.family == "idefics3" else ()
    )
    processor = build_processor(tokenizer, spec)
    return build_model(tokenizer, spec).to(device), processor


def _decode_images(images: ImageTable, image_ids: pd.Series) -> dict:
    """image_id -> decoded PIL image for each distinct id of ``image_ids``, in sorted order.

    Each training image is decoded once; PNG decoding would otherwise cost as much as a step.
    """
    from tqdm import tqdm

    return {iid: images[iid] for iid in tqdm(sorted(image_ids.unique()), desc="decode images", leave=False)}


def _learning_rate(spec: DefaultModelSpec, step: int) -> float:
    """Learning rate of VLM step ``step`` (0-based): linear warm-up to ``spec.lr`` over
    ``spec.warmup_steps`` steps, then cosine decay to 5% of ``spec.lr`` at ``spec.steps``."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _language_optimizer(model: torch.nn.Module, spec: DefaultModelSpec) -> torch.optim.AdamW:
    """Freeze the vision tower (dropping the warm-up's last gradients); AdamW over every
    parameter still trainable (projector + LM)."""
    # As in LLaVA, the language model learns to read a frozen vision tower; letting the VLM loss
    # reach the tower collapsed its features to an image-independent vector (measured: patch
    # features differing by 1% between images after 1,500 steps) and nothing was learned.
    tower = vision_tower(model)
    tower.requires_grad_(False)
    for p in tower.parameters():
        # Left in place, the warm-up's last gradient would count in every language step's
        # clipping norm (``_training_step`` clips what the optimiser trains, for the same reason).
        p.grad = None
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        betas=(0.9, 0.98),
    )


# Examples per length-sorting window: 16 batches. Large enough that a window's batches are
# nearly uniform in length, small enough that each batch still mixes examples from all over
# the pass (a window is a random sample of it).
BUCKET_BATCHES = 16


Example = TrainingExample | RankingExample


def _example_words(example: Example) -> int:
    """Words of prompt + answer (a ranking group: of its longest row): the sorting key standing
    in for the token count."""
    if isinstance(example, RankingExample):
        return max(len(p.split()) for p in example.prompts) + 1
    return len(example.prompt.split()) + len(example.answer.split())


def _length_bucketed(examples: list, batch_size: int, rng: np.random.Generator) -> list:
    """``examples`` reordered so that each run of ``batch_size`` holds examples of similar length.

    Within consecutive windows of ``BUCKET_BATCHES`` batches (the examples are already in random
    order), examples are sorted by length, cut into batches, and the batches shuffled. A batch
    is padded to its longest row, so mixed lengths wasted ~40% of every step on padding (rows of
    28 tokens padded to 59, measured on the default benchmark). Draws one permutation per window."""
    window = batch_size * BUCKET_BATCHES
    out: list = []
    for start in range(0, len(examples), window):
        chunk = sorted(examples[start : start + window], key=_example_words)
        batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for k in rng.permutation(len(batches)):
            out.extend(batches[k])
    return out


def _refill_pool(pool: list[Example], train: pd.DataFrame, spec: DefaultModelSpec, rng: np.random.Generator) -> None:
    """When ``pool`` holds fewer than ``spec.batch_size`` examples, add one pass over the train
    split (``training_examples``) resampled with replacement in proportion to
    ``spec.task_weights`` (default weight 1), and reorder the leftover and the pass into
    batches of similar length (``_length_bucketed``). Draws from ``rng``: the pass's draws, the
    resampling, then the bucketing's permutations."""
    if len(pool) < spec.batch_size:
        fresh = training_examples(train, rng, caption_reference="sampled", retrieval_negatives=spec.retrieval_negatives)
        p = np.array([spec.task_weights.get(e.task, 1.0) for e in fresh], dtype=float)
        take = rng.choice(len(fresh), size=len(fresh), replace=True, p=p / p.sum())
        merged = pool + [fresh[i] for i in take]
        pool[:] = _length_bucketed(merged, spec.batch_size, rng)


def _batch_rows(batch: list[Example]) -> tuple[list[str], list[str], list[str], list[int]]:
    """(image ids, prompts, answers, example index) of every row of ``batch``: one row per
    ``TrainingExample``, one per candidate of a ``RankingExample``."""
    images, prompts, answers, owner = [], [], [], []
    for k, e in enumerate(batch):
        rows = zip(e.prompts, e.answers) if isinstance(e, RankingExample) else [(e.prompt, e.answer)]
        for prompt, answer in rows:
            images.append(e.image_id)
            prompts.append(prompt)
            answers.append(answer)
            owner.append(k)
    return images, prompts, answers, owner


def ranking_loss(margins: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy (nats) of a ranking group whose positive is row 0: ``margins`` [K]
    are the candidates' Yes-minus-No logit margins, the score evaluation ranks them by."""
    return -torch.log_softmax(margins, dim=0)[0]


def _training_step(
    adapter, optimizer: torch.optim.Optimizer, batch: list[Example], decoded: dict, lr: float
) -> tuple[float, list[float]]:
    """One optimiser step at learning rate ``lr`` on ``batch`` (examples; images from
    ``decoded``), the gradients of the parameters ``optimizer`` trains clipped to norm 1.

    An example's loss is its answer cross-entropy; a ranking group's is the mean answer
    cross-entropy of its rows plus ``ranking_loss`` of their margins. The step minimises the
    mean over examples. Returns (that mean, each example's loss), in nats, measured before the step.
    """
    model = adapter.model
    image_ids, prompts, answers, owner = _batch_rows(batch)
    inputs = adapter.build_inputs([decoded[i] for i in image_ids], prompts, answers)
    for g in optimizer.param_groups:
        g["lr"] = lr
    logits = model(**inputs.tensors).logits
    row_loss = answer_cross_entropy(logits, inputs.tensors["input_ids"], inputs.answer_mask, per_row=True)
    if len(owner) == len(batch):
        example_loss = row_loss  # no ranking group: rows are the examples (bitwise the pointwise step)
    else:
        tok = adapter.processor.tokenizer
        yes, no = answer_token_id(tok, RETRIEVAL_YES), answer_token_id(tok, RETRIEVAL_NO)
        first = logits[torch.arange(len(owner)), inputs.last_prompt_index].float()
        margins = first[:, yes] - first[:, no]
        owner_t = torch.tensor(owner)
        losses = []
        for k, e in enumerate(batch):
            rows = (owner_t == k).nonzero().squeeze(1)
            loss_k = row_loss[rows].mean()
            if isinstance(e, RankingExample):
                loss_k = loss_k + ranking_loss(margins[rows])
            losses.append(loss_k)
        example_loss = torch.stack(losses)
    loss = example_loss.mean()
    values = example_loss.detach().tolist()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    return loss.item(), values


def _train_language_model(
    adapter,
    optimizer: torch.optim.Optimizer,
    spec: DefaultModelSpec,
    train: pd.DataFrame,
    decoded: dict,
    rng: np.random.Generator,
    *,
    name: str,
    checkpoints: Checkpoints | None = None,
    resume: dict | None = None,
    warmup_losses: list[float] | None = None,
) -> TrainingCurves:
    """``spec.steps`` steps of ``spec.batch_size`` rows drawn in order from a pool that
    ``_refill_pool`` tops up from ``rng``; the vision tower stays in eval mode (frozen).

    With ``checkpoints``, the state is saved every ``checkpoints.every`` steps (with
    ``warmup_losses``, for the summary); ``resume`` (a "language" checkpoint; the model's weights
    and gradients already restored by the caller) continues from its step, bitwise as if never stopped."""
    from tqdm import tqdm

    pool: list[Example] = []
    curves = TrainingCurves()
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        rng.bit_generator.state = resume["numpy_rng"]
        pool, start = list(resume["pool"]), resume["step"]
        curves = TrainingCurves(
            list(resume["losses"]),
            {t: list(v) for t, v in resume["task_losses"].items()},
            {t: list(v) for t, v in resume["task_steps"].items()},
        )
        _restore_rng(resume)
    adapter.model.train()
    vision_tower(adapter.model).eval()
    bar = tqdm(range(start, spec.steps), desc=f"train {name}", initial=start, total=spec.steps)
    for step in bar:
        _refill_pool(pool, train, spec, rng)
        batch = pool[: spec.batch_size]
        del pool[: spec.batch_size]
        loss, row_losses = _training_step(adapter, optimizer, batch, decoded, _learning_rate(spec, step))
        for task_name, v in zip((b.task for b in batch), row_losses):
            curves.task_losses.setdefault(task_name, []).append(v)
            curves.task_steps.setdefault(task_name, []).append(step)
        curves.losses.append(loss)
        if step % 20 == 0:
            bar.set_postfix({t: f"{np.mean(v[-100:]):.3f}" for t, v in sorted(curves.task_losses.items())})
        if checkpoints is not None and checkpoints.due(step + 1, spec.steps):
            checkpoints.save(
                {
                    "phase": "language",
                    "step": step + 1,
                    "model": adapter.model.state_dict(),
                    "gradients": _gradients(adapter.model),
                    "optimizer": optimizer.state_dict(),
                    "numpy_rng": rng.bit_generator.state,
                    "pool": pool,
                    "losses": curves.losses,
                    "task_losses": curves.task_losses,
                    "task_steps": curves.task_steps,
                    "warmup_losses": warmup_losses,
                }
            )
    return curves


def _every_50(values: list[float]) -> list[float]:
    """Means of consecutive windows of 50 values (the last window may be shorter)."""
    return [float(np.mean(values[i : i + 50])) for i in range(0, len(values), 50)]


def _windowed_by_step(steps: list[int], values: list[float], total: int, window: int = 50) -> list[float | None]:
    """Mean of ``values`` per window of ``window`` steps (by their ``steps``), None where a window has none."""
    sums, counts = np.zeros(-(-total // window)), np.zeros(-(-total // window))
    np.add.at(sums, np.asarray(steps, dtype=int) // window, values)
    np.add.at(counts, np.asarray(steps, dtype=int) // window, 1)
    return [float(s / c) if c else None for s, c in zip(sums, counts)]


def _training_summary(
    name: str, spec: DefaultModelSpec, model: torch.nn.Module, curves: TrainingCurves, warmup_losses: list[float]
) -> dict:
    """The ``training.json`` record: sizes, final loss (mean of the last 50 steps), loss curves in
    windows of 50 steps, final loss per task (last 200 rows), the spec. No wall-clock time: the
    record is part of a DVC output, and the same training must give the same bytes."""
    text = model.config.text_config
    return {
        "name": name,
        "family": spec.family,
        "parameters": count_parameters(model),
        "language_model": {
            "layers": text.num_hidden_layers,
            "heads": text.num_attention_heads,
            "kv_heads": text.num_key_value_heads,
            "hidden": text.hidden_size,
            "ffn_width": text.intermediate_size,
            "vocab": text.vocab_size,
        },
        "steps": spec.steps,
        "final_loss": float(np.mean(curves.losses[-50:])),
        "loss_curve": _every_50(curves.losses),
        "vision_warmup_loss": _every_50(warmup_losses),
        "final_task_loss": {t: float(np.mean(v[-200:])) for t, v in sorted(curves.task_losses.items())},
        # Per task: the mean loss of its rows in each window of 50 steps (windows without one: null).
        "task_loss_curve": {
            t: _windowed_by_step(curves.task_steps[t], v, spec.steps) for t, v in sorted(curves.task_losses.items())
        },
        "spec": asdict(spec),
    }


def reuse_warm_tower(model: torch.nn.Module, source: Path, spec: DefaultModelSpec, name: str) -> list[float]:
    """Load into ``model`` the vision tower of the model ``train_default_model`` saved in
    ``source``, in place of the warm-up, and return that training's warm-up loss curve.

    The language phase never changes the tower (it is frozen), so ``source``'s tower is its
    warm-up's output. ``source`` must have been trained with the same ``WARM_UP_FIELDS``
    (``check_warmed_up_with``), on the same benchmark and warm-up code: then the training that
    follows writes bitwise the model a full training would, warm-up included, on a machine whose
    warm-up gives ``source``'s tower (the language phase draws nothing from torch's global RNG,
    the only state the skipped warm-up would have advanced). The benchmark and code are the
    caller's to keep; what ``source`` records is checked."""
    source = Path(source)
    check_warmed_up_with(source, spec, name)
    # from_pretrained, not the raw file: it maps the saved keys to the module's, as loading does.
    trained = type(model).from_pretrained(source, dtype=torch.float32)
    vision_tower(model).load_state_dict(vision_tower(trained).state_dict())
    return list(json.loads((source / "training.json").read_text())["vision_warmup_loss"])


def _save_trained(model: torch.nn.Module, processor, summary: dict, out_dir: Path) -> None:
    """``save_pretrained`` model and processor plus ``training.json`` into ``out_dir``, written
    under a temporary sibling name and renamed (``pipeline.io.atomic_directory``)."""
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(summary, indent=2))


def _image_size(data: TrainSplit) -> int:
    """Side of the square train images (pixels); the processor and the vision tower are built for it."""
    first = data.train["image_id"].iloc[0]
    width, height = data.images[first].size
    if width != height:
        raise PipelineError(
            f"{data.images.path}: image {first!r} is {width}x{height}; the default model is built for square images"
        )
    return width


def train_default_model(
    spec: DefaultModelSpec,
    benchmark_dir: Path,
    out_dir: Path,
    *,
    name: str,
    device: str = "cpu",
    resume_key: str | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[str, int], None] | None = None,
    warm_tower_from: Path | None = None,
) -> dict:
    """Train the default model ``name`` on the benchmark's train split and save it to ``out_dir``.

    Returns a summary (parameters, sizes, final loss, loss curves) that is also written to
    ``out_dir/training.json``. The folder is written under a temporary name and renamed.
    Steps: read the benchmark, build the untrained model for its image size, decode the train
    images, warm up the vision tower (``warm_up_vision``), freeze it, train the projector and
    language model, save. The seeds are set first and every random draw follows in that order,
    so a spec trains bitwise the same model on the same machine and thread count (the caller
    sets torch's threads).

    Resumable: with ``resume_key`` (what identifies this training: spec, data, code, threads),
    the state is saved every ``checkpoint_every`` steps into ``out_dir/.partial-<resume_key>/``
    and a run killed after a save resumes from it, to bitwise the weights of an uninterrupted
    run; anything else in ``out_dir`` is removed at the start (``pipeline.io.resumable_scratch``),
    and the scratch goes with the finished model's rename. ``on_checkpoint(phase, step)`` runs
    after each save.

    With ``warm_tower_from`` (a folder this function wrote, with the same warm-up), its vision
    tower replaces the warm-up (``reuse_warm_tower``): a recipe that changes only the language
    phase retrains without repeating the warm-up, to the bytes of a full training.
    """
    from pipeline.model.adapter import ModelAdapter

    checkpoints = None
    if resume_key is not None:
        checkpoints = Checkpoints(resumable_scratch(out_dir, resume_key), checkpoint_every, on_checkpoint)
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    data = _read_train_split(benchmark_dir)
    spec = replace(spec, image_size=_image_size(data))
    model, processor = _build_untrained(spec, data.annotations, device)
    adapter = ModelAdapter.from_model(model, processor)
    log.info("default model %s: %s parameters", name, f"{count_parameters(model)['total']:,}")
    decoded = _decode_images(data.images, data.train["image_id"])
    resume = checkpoints.load() if checkpoints is not None else None
    if resume is not None:
        _restore_model(model, resume)

    t0 = time.perf_counter()
    if warm_tower_from is not None and (resume is None or resume["phase"] == "warmup"):
        warmup_losses = reuse_warm_tower(model, Path(warm_tower_from), spec, name)
        resume = None
    elif resume is None or resume["phase"] == "warmup":
        warmup_losses = warm_up_vision(
            model,
            processor,
            decoded,
            image_word_targets(data.train, processor.tokenizer),
            steps=spec.vision_warmup_steps,
            batch_size=spec.batch_size * 2,
            lr=spec.vision_warmup_lr,
            seed=spec.seed,
            checkpoints=checkpoints,
            resume=resume,
        )
        resume = None
    else:
        warmup_losses = list(resume["warmup_losses"])
    optimizer = _language_optimizer(model, spec)
    t_cache = time.perf_counter()
    cache = FrozenVisionCache(model, processor, decoded)
    log.info("frozen vision tower: outputs of %d images cached in %.1f s", len(decoded), time.perf_counter() - t_cache)
    with cache.installed():
        curves = _train_language_model(
            adapter,
            optimizer,
            spec,
            data.train,
            decoded,
            rng,
            name=name,
            checkpoints=checkpoints,
            resume=resume,
            warmup_losses=warmup_losses,
        )
    model.eval()
    model.to("cpu")

    summary = _training_summary(name, spec, model, curves, warmup_losses)
    _save_trained(model, processor, summary, out_dir)
    log.info("trained %s in %.0f s, final loss %.4f", name, time.perf_counter() - t0, summary["final_loss"])
    return summary
