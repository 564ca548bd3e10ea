"""Mistakes a user can make stop a stage with one line naming the file, key or item, exit code 2,
no traceback, before any model loads where the mistake is in params.

Each case runs the real stage entry point in a subprocess (``python -m stages.<name>``), as DVC does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import item_arrays_like

ROOT = Path(__file__).resolve().parents[1]


def params_file(tmp_path: Path, **over) -> Path:
    params = {
        "studied_models": ["m"],
        "pretrained_models": ["m"],
        "tasks": ["vqa", "ocr"],
        "models": {"m": {"source": "pretrained", "path": str(tmp_path / "no-such-model"), "device": "cpu"}},
        "runtime": {"threads": 1},
    }
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            params.setdefault(section, {})[leaf] = value
        else:
            params[section] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_stage(
    stage: str, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop("HONES_PARAMS_AUDIT", None)
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single ERROR line of a stage that stopped on a user mistake."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def heads(params: Path, benchmark: Path, out: Path, task: str = "vqa", model: str = "m"):
    return run_stage(
        "heads", "--params", params, "--model", model, "--task", task, "--benchmark", benchmark, "--out", out
    )


@pytest.mark.slow
def test_unknown_task_is_named_before_any_model_loads(tmp_path, benchmark_dir) -> None:
    params = params_file(tmp_path, tasks=["vqa", "ocrr"])
    line = one_line_error(heads(params, benchmark_dir, tmp_path / "out"))
    assert "tasks" in line and "'ocrr'" in line and "known: ['vqa', 'ocr', 'caption', 'retrieval']" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_empty_split_is_named(tmp_path) -> None:
    from pipeline.tasks.benchmark import BenchmarkSpec, build_benchmark

    bench = tmp_path / "bench"
    build_benchmark(
        BenchmarkSpec(
            seed=0,
            image_size=32,
            n_images={"discovery": 2, "test": 0},
            vqa_per_image={"discovery": 1},
            retrieval_negatives=3,
            retrieval_hard_negatives=1,
        ),
        bench,
    )
    params = params_file(tmp_path, heads__split="test")
    line = one_line_error(heads(params, bench, tmp_path / "out"))
    assert "annotations.parquet has no 'vqa' items in split 'test'" in line


@pytest.mark.slow
def test_bad_device_name_is_named(tmp_path, benchmark_dir) -> None:
    params = params_file(tmp_path, models={"m": {"source": "pretrained", "path": "x", "device": "gpu"}})
    line = one_line_error(heads(params, benchmark_dir, tmp_path / "out"))
    assert "models.m.device" in line and "'gpu'" in line


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_named(tmp_path, benchmark_dir) -> None:
    params = params_file(tmp_path, models={"m": {"source": "pretrained", "path": "x", "device": "cuda"}})
    line = one_line_error(heads(params, benchmark_dir, tmp_path / "out"))
    assert "models.m.device: 'cuda' but torch sees no CUDA device" in line


@pytest.mark.slow
def test_yaml_syntax_error_names_file_and_line(tmp_path, benchmark_dir) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("tasks: [vqa, ocr]\nheads:\n  split: discovery\n   top_k: 3\n")
    line = one_line_error(heads(params, benchmark_dir, tmp_path / "out"))
    assert f"{params}: line 4" in line and "YAML syntax error" in line


@pytest.mark.slow
def test_unknown_key_is_one_line(tmp_path, benchmark_dir) -> None:
    params = params_file(tmp_path, heads__topk=3)
    line = one_line_error(heads(params, benchmark_dir, tmp_path / "out"))
    assert "heads.topk: Extra inputs are not permitted" in line


def _finished_store(path: Path) -> None:
    from pipeline.method.store import ActivationStore, StoreLayout

    lay = StoreLayout.plan(2, 6, 2, 8, "float32", target_chunk_bytes=2 * 2 * 8 * 4)
    store = ActivationStore.create_or_resume(
        path,
        lay,
        [(-1, -1, float("nan")), (0, 1, 0.5)],
        [f"i{k}" for k in range(6)],
        [[1]] * 6,
        [[1.0]] * 6,
        {"model": "m"},
        "h",
    )
    rng = np.random.default_rng(0)
    for k in store.pending_blocks():
        n = lay.block(k).stop - lay.block(k).start
        store.write_block(
            k, rng.normal(size=(2, n, 2, 8)).astype(np.float32), item_arrays_like(rng.normal(size=(n, 2, 8)))
        )
    store.finalize()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["group", "array"])
def test_truncated_store_metadata_names_the_store(tmp_path, damage) -> None:
    acts = tmp_path / "activations"
    for task in ("vqa", "ocr"):
        _finished_store(acts / f"{task}.zarr")
    meta = acts / "ocr.zarr" / ("zarr.json" if damage == "group" else "z/zarr.json")
    meta.write_bytes(meta.read_bytes()[:40])
    params = params_file(tmp_path)
    proc = run_stage(
        "attribute",
        "--params",
        params,
        "--model",
        "m",
        "--activations",
        acts,
        "--ablation",
        tmp_path,
        "--benchmark",
        tmp_path,
        "--out",
        tmp_path / "out.zarr",
    )
    line = one_line_error(proc)
    assert f"activation store {acts / 'ocr.zarr'}" in line and "dvc checkout" in line


def _flip_bytes(path: Path, at: int = 16, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    data[at : at + n] = bytes(b ^ 0xFF for b in data[at : at + n])
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped", "deleted", "truncated"])
def test_damaged_chunk_stops_attribute_naming_store_array_and_chunk(tmp_path, damage) -> None:
    """Eight flipped bytes in one chunk (the checksum catches them), a deleted chunk file (never
    read as zeros) or a chunk cut short: attribute stops with one line naming the store, the
    array and the chunk, and how to restore it; it writes no output."""
    acts = tmp_path / "activations"
    for task in ("vqa", "ocr"):
        _finished_store(acts / f"{task}.zarr")
    chunk = acts / "ocr.zarr" / "z" / "c" / "0" / "1" / "0" / "0"
    assert chunk.is_file()
    if damage == "flipped":
        _flip_bytes(chunk)
    elif damage == "deleted":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:-9])
    for task in ("vqa", "ocr"):  # ablation off: the stage goes straight to the stores
        pd.DataFrame({"layer": [], "neuron": [], "effect": []}).to_parquet(tmp_path / f"{task}.parquet")
    params = params_file(tmp_path)
    out = tmp_path / "out.zarr"
    proc = run_stage(
        "attribute",
        "--params",
        params,
        "--model",
        "m",
        "--activations",
        acts,
        "--ablation",
        tmp_path,
        "--benchmark",
        tmp_path,
        "--out",
        out,
    )
    line = one_line_error(proc)
    what = "is missing" if damage == "deleted" else "is damaged"
    assert f"activation store {acts / 'ocr.zarr'}: array 'z' chunk c/0/1/0/0 (condition 0-0, item 2-3, " in line
    assert (
        what in line and f"restore it with `dvc checkout --force {acts / 'ocr.zarr'}` or re-run the dump stage" in line
    )
    assert not out.exists() and not Path(f"{out}.tmp").exists()


@pytest.mark.slow
def test_second_run_on_the_same_output_is_refused(tmp_path, benchmark_dir) -> None:
    from stages._common import output_lock

    out = tmp_path / "out"
    with output_lock(out):
        line = one_line_error(heads(params_file(tmp_path), benchmark_dir, out))
    assert f"{out} is being written by another run (PID {os.getpid()})" in line


# ------------------------------------------------------------------ the model a user names
def resolve(tmp_path: Path, entry: dict, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The resolve_model stage of model ``m`` = ``entry``, run in ``tmp_path`` as DVC would."""
    params = params_file(tmp_path, models={"m": {"source": "pretrained", "device": "cpu", **entry}})
    out = tmp_path / "data" / "models" / "m"
    proc = run_stage("resolve_model", "--params", params, "--model", "m", "--out", out, env=env, cwd=tmp_path)
    if proc.returncode != 0:
        assert not out.exists(), "a failed resolve left a record behind"
    return proc


@pytest.mark.slow
def test_missing_relative_folder_names_its_absolute_path(tmp_path) -> None:
    line = one_line_error(resolve(tmp_path, {"path": "models/llava-local"}))
    assert (
        f"model 'm': folder {tmp_path}/models/llava-local not found (models.m.path; "
        "a Hugging Face hub id goes in models.m.hub_id)" in line
    )


@pytest.mark.slow
def test_hub_id_missing_from_the_offline_cache_is_named_at_once(tmp_path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    proc = resolve(tmp_path, {"hub_id": "llava-hf/llava-1.5-7b-hf", "revision": "main"}, env)
    line = one_line_error(proc)
    assert (
        "hub id 'llava-hf/llava-1.5-7b-hf' at revision 'main' is not in the local Hugging Face cache "
        f"({tmp_path}/empty-cache)"
        in line
        and "HF_HUB_OFFLINE=1" in line
    )


@pytest.mark.slow
def test_text_only_model_is_named_with_the_supported_families(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path / "llama")
    line = one_line_error(resolve(tmp_path, {"path": str(tmp_path / "llama")}))
    assert (
        f"{tmp_path}/llama is not a vision-language model: its config.json has model_type 'llama' "
        "(LlamaForCausalLM); supported families: llava, qwen2_vl, qwen2_5_vl, idefics3" in line
    )


@pytest.mark.slow
def test_decoder_the_adapter_cannot_find_is_named(tmp_path) -> None:
    from tiny_models import llava_with_opt_text

    llava_with_opt_text().save_pretrained(tmp_path / "odd")
    line = one_line_error(resolve(tmp_path, {"path": str(tmp_path / "odd")}))
    assert "decoder layers not found in LlavaForConditionalGeneration" in line and "OPTModel" in line


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_named_before_the_model_is_read(tmp_path) -> None:
    line = one_line_error(resolve(tmp_path, {"path": str(tmp_path / "not-even-there"), "device": "cuda:1"}))
    assert "models.m.device: 'cuda:1' but torch sees no CUDA device on this machine; use 'cpu' or 'auto'" in line


@pytest.mark.slow
def test_path_and_hub_id_together_are_refused(tmp_path) -> None:
    line = one_line_error(resolve(tmp_path, {"path": "a", "hub_id": "org/a"}))
    assert "models.m: give exactly one of 'path' (a local folder) and 'hub_id'" in line


@pytest.mark.slow
def test_shipped_weights_are_checked_against_the_recipe_and_pinned(benchmark_dir, tmp_path) -> None:
    """ship_model pins data/shipped/<model> when its training record is the params' recipe, and
    names each differing field (or the missing record) otherwise, writing nothing."""
    from dataclasses import asdict, replace

    from conftest import tiny_model_spec

    from pipeline.model.default import train_default_model
    from pipeline.model.source import read_source

    spec = replace(tiny_model_spec(), steps=2, batch_size=2, warmup_steps=1)
    shipped = tmp_path / "data" / "shipped" / "m"
    train_default_model(spec, benchmark_dir, shipped, name="m")
    recipe = {k: v for k, v in asdict(spec).items() if k != "image_size"}
    params = params_file(
        tmp_path,
        pretrained_models=[],
        shipped_models=["m"],
        models={"m": {"source": "train", "device": "cpu", **recipe}},
    )
    out = tmp_path / "data" / "models" / "m"
    proc = run_stage("ship_model", "--params", params, "--model", "m", "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    source = read_source(out, "m")
    assert source.location == "data/shipped/m" and "model.safetensors" in source.files
    # The analysis stages load the pinned folder, not data/models/m (which holds only the record).
    from stages import _load
    from stages.params import read_params

    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        view = read_params(params, ("models.{model}",), model="m")
        assert _load._model_folder(view, "m").resolve() == shipped.resolve()
        assert _load.model_identity(view, "m") == source.identity
        # The report draws the shipped model's learning curves from the pinned folder's record.
        from pipeline.report.study import training_record

        assert training_record(Path("data/models/m"), "m")["steps"] == 2
    finally:
        os.chdir(cwd)

    other = params_file(
        tmp_path,
        pretrained_models=[],
        shipped_models=["m"],
        models={"m": {"source": "train", "device": "cpu", **recipe, "steps": 3}},
    )
    bad_out = tmp_path / "data" / "models" / "bad"
    line = one_line_error(run_stage("ship_model", "--params", other, "--model", "m", "--out", bad_out, cwd=tmp_path))
    assert "holds weights of another recipe" in line and "steps: trained 2, params 3" in line
    (shipped / "training.json").unlink()
    line = one_line_error(run_stage("ship_model", "--params", params, "--model", "m", "--out", bad_out, cwd=tmp_path))
    assert "training.json is missing" in line
    assert not bad_out.exists()


def _transfer_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A masks table with HONES and random headline masks of vqa and ocr, and a steer folder."""
    rows = [
        (method, task, 0.01, 0, True, 0, 0, k)
        for k, (method, task) in enumerate([(m, t) for m in ("hones", "random") for t in ("vqa", "ocr")])
    ]
    masks = tmp_path / "masks.parquet"
    pd.DataFrame(rows, columns=["method", "task", "rho", "draw", "headline", "rank", "layer", "neuron"]).to_parquet(
        masks
    )
    steer = tmp_path / "steer"
    steer.mkdir()
    pd.DataFrame({"task": ["vqa", "ocr"], "layer": [0, 0], "neuron": [0, 1], "scale": [1.1, 0.9]}).to_parquet(
        steer / "scales.parquet"
    )
    pd.DataFrame(
        {"task": ["vqa", "ocr"], "variant": ["grid@1", "grid@1"], "split": "dev", "utility": [0.5, 0.5], "metric": "m"}
    ).to_parquet(steer / "steering.parquet")
    return masks, steer


def transfer(params: Path, benchmark: Path, masks: Path, steer: Path, out: Path):
    return run_stage(
        "transfer",
        "--params",
        params,
        "--model",
        "m",
        "--benchmark",
        benchmark,
        "--masks",
        masks,
        "--steer",
        steer,
        "--out",
        out,
    )


@pytest.mark.slow
def test_transfer_names_its_methods_key_and_a_missing_split(tmp_path, benchmark_dir) -> None:
    masks, steer = _transfer_inputs(tmp_path)
    params = params_file(tmp_path, transfer__methods=["hones", "atp"])
    line = one_line_error(transfer(params, benchmark_dir, masks, steer, tmp_path / "out"))
    assert "transfer.methods: ['atp'] not in" in line and "available: ['hones', 'random']" in line
    # The test fixture's benchmark has no ood split: named, with nothing written.
    params = params_file(tmp_path, transfer__methods=["hones"])
    line = one_line_error(transfer(params, benchmark_dir, masks, steer, tmp_path / "out"))
    assert "has no 'vqa' items in split 'ood'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_transfer_without_an_ood_split_measures_nothing(tmp_path, benchmark_dir) -> None:
    masks, steer = _transfer_inputs(tmp_path)
    params = params_file(tmp_path, transfer__split=None)
    proc = transfer(params, benchmark_dir, masks, steer, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "transfer.split is null" in proc.stderr
    for name in ("suppression.json", "steering_intervals.json"):
        assert (tmp_path / "out" / name).read_text().strip() == "{}"


@pytest.mark.slow
def test_a_bad_record_of_a_brought_set_stops_its_import_naming_it(tmp_path) -> None:
    """ood_benchmark@<name>: a GQA question without its answer stops the import in one line
    naming the file and the record, and nothing is written; a name params does not list is named."""
    import json

    from PIL import Image

    inputs = tmp_path / "data" / "inputs" / "gqa"
    (inputs / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(inputs / "images" / "n1.jpg")
    questions = {"1": {"question": "Is it red?", "answer": "yes", "imageId": "n1"}, "2": {"question": "Why?"}}
    (inputs / "q.json").write_text(json.dumps(questions))
    entry = {"format": "gqa", "records": "data/inputs/gqa/q.json", "images": "data/inputs/gqa/images"}
    params = params_file(tmp_path, ood_benchmarks={"gqa": entry})

    def ood_benchmark(name: str) -> subprocess.CompletedProcess:
        return run_stage("ood_benchmark", "--params", params, "--name", name, "--out", "out", cwd=tmp_path)

    assert "data/inputs/gqa/q.json: question '2': answer: missing" in one_line_error(ood_benchmark("gqa"))
    assert not (tmp_path / "out").exists()
    line = one_line_error(ood_benchmark("vqa2"))
    assert "benchmark 'vqa2' is not under 'ood_benchmarks'" in line and "defined: ['gqa']" in line
