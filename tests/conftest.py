"""Shared fixtures: seeding, a tiny synthetic benchmark and a tiny LLaVA built over its vocabulary.

- ``_seed`` (autouse): seeds python, numpy and torch before every test.
- ``_fast_lane_starts_no_process`` (autouse): a test not marked ``slow`` may start no process.
- ``_private_hash_cache`` (session, autouse): ``XDG_CACHE_HOME`` in a temp dir.
- ``resolve_pretrained(params, name, root, monkeypatch)``: the resolve stage of a pretrained model.
- ``benchmark_dir`` (session): ``build_benchmark`` at image_size 32, a handful of images per split.
- ``annotations`` / ``images`` (session): the benchmark table and its ``ImageTable``.
- ``tiny_adapter`` (session, read-only): a random ``DefaultModelSpec`` LLaVA (2 text layers,
  4 heads, hidden 32, FFN 64) whose tokenizer, processor and chat template are those of the
  embedded default model, so every benchmark word tokenises exactly.
- ``discovery_items(annotations, task, n)``: the first ``n`` discovery items of a task.
- ``direct_z`` / ``direct_targets`` / ``direct_dvp``: golden references for the dump (one unpadded
  row per forward pass; targets, IDF weights and DVP written out from docs/method.md section 3).

``build_tiny_adapter(benchmark_dir)`` is importable from a subprocess (``sys.path`` = tests/)
and builds bitwise the same model as the fixture.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.model.hooks import capture_ffn, substitute_heads
from pipeline.tasks.benchmark import BenchmarkSpec, build_benchmark
from pipeline.tasks.items import ImageTable, read_annotations

TESTS_DIR = Path(__file__).resolve().parent

# Tiny models run ~30x faster on one thread than on two when another job holds the cores
# (OpenMP threads wait on each other for microsecond-sized ops); results do not depend on it.
torch.set_num_threads(1)

TINY_BENCHMARK = BenchmarkSpec(
    seed=0,
    image_size=32,
    n_images={"train": 2, "discovery": 8, "dev": 2, "test": 2},
    vqa_per_image={"discovery": 1},
    retrieval_negatives=3,
    retrieval_hard_negatives=1,
)


def tiny_model_spec():
    """The fixture's architecture; training-only fields are inert (``build_model`` never trains)."""
    from dataclasses import fields

    from pipeline.model.default import DefaultModelSpec

    values = dict(
        name="test-tiny",
        family="llava",
        image_size=32,
        patch_size=8,
        vision_hidden=32,
        vision_layers=1,
        vision_heads=2,
        vision_ffn=64,
        text_hidden=32,
        text_layers=2,
        text_heads=4,
        text_kv_heads=4,
        text_ffn=64,
        vision_warmup_steps=0,
        steps=1,
        batch_size=1,
        lr=1e-3,
        warmup_steps=0,
        weight_decay=0.0,
        task_weights={},
        seed=0,
        threads=1,
    )
    known = {f.name for f in fields(DefaultModelSpec)}
    return DefaultModelSpec(**{k: v for k, v in values.items() if k in known})


def build_tiny_adapter(benchmark_dir: Path):
    """The tiny LLaVA of the fixture (deterministic: ``build_model`` seeds itself)."""
    from pipeline.model.adapter import ModelAdapter
    from pipeline.model.default import benchmark_vocabulary, build_model, build_processor, build_tokenizer

    spec = tiny_model_spec()
    annotations = read_annotations(Path(benchmark_dir) / "annotations.parquet")
    tokenizer = build_tokenizer(benchmark_vocabulary(annotations))
    processor = build_processor(tokenizer, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(tokenizer, spec)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return ModelAdapter.from_model(model, processor)


def discovery_items(annotations: pd.DataFrame, task: str, n: int | None = None) -> pd.DataFrame:
    items = annotations[(annotations["split"] == "discovery") & (annotations["task"] == task)]
    return (items if n is None else items.head(n)).reset_index(drop=True)


# --- golden references, from docs/method.md section 3 without the store or pipeline.method.dump ---
@torch.no_grad()
def direct_z(adapter, images, items: pd.DataFrame, heads: pd.DataFrame) -> np.ndarray:
    """z [condition, item, layer, neuron] at the last prompt token, one unpadded row at a time."""
    conds = [None] + [(int(l), int(h)) for l, h in zip(heads["layer"], heads["head"])]
    prompts = [
        p.format(candidate=c[k]) if t == "retrieval" else p  # retrieval: the positive pair
        for t, p, c, k in zip(items["task"], items["prompt"], items["candidates"], items["positive_index"])
    ]
    out = np.zeros((len(conds), len(items), adapter.num_layers, adapter.ffn_width), dtype=np.float32)
    for n, (image_id, prompt) in enumerate(zip(items["image_id"], prompts)):
        inputs = adapter.build_inputs([images[image_id]], [prompt])
        for c, head in enumerate(conds):
            with substitute_heads(adapter, [head]), capture_ffn(adapter, None, inputs.last_prompt_index) as z:
                adapter.model(**inputs.tensors)
            out[c, n] = torch.stack([z[l][0] for l in range(adapter.num_layers)]).numpy()
    return out


def direct_targets(tokenizer, items: pd.DataFrame) -> tuple[list[list[int]], list[list[float]]]:
    """Target token ids and weights written out from docs/method.md section 3 (independent of
    item_targets); captions as the authors' code: the first five references joined by spaces,
    every token occurrence kept, the first 128 tokens."""
    special = set(tokenizer.all_special_ids)
    ids = []
    for task, refs in zip(items["task"], items["references"]):
        text = "Yes" if task == "retrieval" else (" ".join(map(str, list(refs)[:5])) if task == "caption" else refs[0])
        toks = [t for t in tokenizer(str(text), add_special_tokens=False)["input_ids"] if t not in special]
        ids.append(toks[:128] if task == "caption" else toks[:1] if task == "retrieval" else toks)
    n = len(items)
    weights = []
    for task, toks in zip(items["task"], ids):
        if task == "caption":
            df = {t: sum(t in set(other) for other in ids) for t in toks}
            weights.append([math.log((n + 1) / (df[t] + 1)) + 1 for t in toks])
        else:
            weights.append([1.0] * len(toks))
    return ids, weights


def direct_dvp(adapter, target_ids, target_weights) -> np.ndarray:
    """dvp [item, layer, neuron] in float64: <W_down[l][:, i], u_y> with u_y the normalised weighted sum."""
    U = adapter.unembedding().detach().double().numpy()
    downs = [adapter.ffn_down_proj(l).weight.detach().double().numpy() for l in range(adapter.num_layers)]
    out = np.zeros((len(target_ids), adapter.num_layers, adapter.ffn_width))
    for n, (ids, w) in enumerate(zip(target_ids, target_weights)):
        u = sum(wj * U[t] for t, wj in zip(ids, w))
        u = u / np.linalg.norm(u)
        for l, W in enumerate(downs):
            out[n, l] = [W[:, i] @ u for i in range(W.shape[1])]
    return out


@pytest.fixture(scope="session", autouse=True)
def _private_hash_cache(tmp_path_factory):
    """Model file hashes go to a temp cache, not the user's ~/.cache (subprocesses inherit it)."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


def resolve_pretrained(params: Path, name: str, root: Path, monkeypatch) -> Path:
    """Run the resolve_model stage of pretrained model ``name`` as ``dvc repro`` would, in ``root``
    (the working directory from then on); returns ``root/data/models/<name>``."""
    import sys

    from stages import resolve_model

    monkeypatch.chdir(root)
    out = Path(root) / "data" / "models" / name
    monkeypatch.setattr(sys, "argv", ["resolve_model", "--params", str(params), "--model", name, "--out", str(out)])
    resolve_model.main()
    return out


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fast_lane_starts_no_process(request, monkeypatch):
    """Keeps ``-m "not slow"`` fast: a test that starts a process must be marked ``slow``.

    A process start (stage, DVC, torchrun, a worker pool) costs seconds of imports, so an
    unmarked one fails here with its test's name instead of quietly slowing the lane.
    """
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    import multiprocessing.process
    import subprocess

    def refuse(*args, **kwargs):
        raise AssertionError(
            f"{request.node.nodeid} starts a process: mark it @pytest.mark.slow "
            "(the fast lane, -m 'not slow', starts none)"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    yield


@pytest.fixture(scope="module")
def adapter64(benchmark_dir):
    """The tiny LLaVA in float64, so that finite differences are exact to ~1e-9. Llama's
    RMSNorm computes in float32 whatever its input; here it keeps float64 (same formula)."""
    a = build_tiny_adapter(benchmark_dir)
    a.model.double()
    for module in a.model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = lambda x, m=module: (
                m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))
            )
    return a


def utility64(a, imgs, prompts, answers) -> np.ndarray:
    """[item] mean answer log-probability in float64 (answer_logprob's utility; it rounds to float32)."""
    inputs = a.build_inputs(imgs, prompts, answers=answers)
    logp = torch.log_softmax(a.model(**inputs.tensors).logits.double()[:, :-1], dim=-1)
    tok = logp.gather(-1, inputs.input_ids[:, 1:, None])[..., 0]
    mask = inputs.answer_mask[:, 1:].double()
    return ((tok * mask).sum(1) / mask.sum(1)).numpy()


@pytest.fixture(scope="session")
def benchmark_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("benchmark") / "bench"
    build_benchmark(TINY_BENCHMARK, out)
    return out


@pytest.fixture(scope="session")
def annotations(benchmark_dir) -> pd.DataFrame:
    return read_annotations(benchmark_dir / "annotations.parquet")


@pytest.fixture(scope="session")
def images(benchmark_dir) -> ImageTable:
    return ImageTable(benchmark_dir / "images.parquet")


@pytest.fixture(scope="session")
def tiny_adapter(benchmark_dir):
    return build_tiny_adapter(benchmark_dir)


def random_item_arrays(rng: np.random.Generator, n: int, n_layers: int, n_neurons: int, dvp: np.ndarray | None = None):
    """``ItemArrays`` of n items with random values (``dvp`` given or random; counts consistent:
    0 <= gate_positive <= prompt_tokens)."""
    from pipeline.method.store import ItemArrays

    shape = (n, n_layers, n_neurons)
    tokens = rng.integers(5, 40, size=n).astype(np.int32)
    return ItemArrays(
        dvp=rng.normal(size=shape).astype(np.float32) if dvp is None else dvp,
        dvp_logprob=rng.normal(size=shape).astype(np.float32),
        atp=rng.normal(size=shape).astype(np.float32),
        gate_sum=rng.normal(size=shape).astype(np.float32),
        gate_positive=rng.integers(0, tokens[:, None, None] + 1, size=shape).astype(np.int32),
        prompt_tokens=tokens,
    )


def item_arrays_like(dvp: np.ndarray):
    """``ItemArrays`` whose arrays are fixed functions of ``dvp`` [n, layer, neuron], so that a
    slice of the result equals the result of the slice (tests that only care about z and dvp)."""
    from pipeline.method.store import ItemArrays

    dvp = np.asarray(dvp, dtype=np.float32)
    return ItemArrays(
        dvp=dvp,
        dvp_logprob=0.5 * dvp,
        atp=2.0 * dvp,
        gate_sum=dvp - 0.1,
        gate_positive=(3 * (dvp > 0)).astype(np.int32),
        prompt_tokens=np.full(dvp.shape[0], 3, np.int32),
    )
