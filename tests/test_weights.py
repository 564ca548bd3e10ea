"""Damaged weights files: each is one line naming the file, at resolve (before anything is
loaded or pinned) and at load (``ModelAdapter.load``), never a safetensors traceback.

Cases: a truncated file, a damaged header, an empty file, a sharded checkpoint whose index names
an absent shard, a shard that lacks tensors its index puts there, and a truncated zip ``.bin``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_stage_errors import one_line_error, params_file, run_stage
from tiny_models import tiny_llava

from pipeline.model.adapter import AdapterError, ModelAdapter
from pipeline.model.source import FileHashes, ModelSourceError, resolve_folder
from pipeline.model.weights import WeightsError, check_weight_files


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny LLaVA saved whole, and the same model saved in shards (``sharded/``)."""
    folder = tmp_path_factory.mktemp("llava")
    model, processor = tiny_llava()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    sharded = folder / "sharded"
    model.save_pretrained(sharded, max_shard_size="60KB")
    processor.save_pretrained(sharded)
    return folder


def _copy(saved: Path, tmp_path: Path, sharded: bool = False) -> Path:
    out = tmp_path / "model"
    shutil.copytree(saved / "sharded" if sharded else saved, out, ignore=shutil.ignore_patterns("sharded"))
    return out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _damage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"{garbage"
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    "damage, what", [(_truncate, "not fully covered"), (_damage_header, "invalid JSON"), (_empty, "header too small")]
)
def test_a_damaged_safetensors_file_is_named_at_resolve_and_at_load(saved, tmp_path, damage, what):
    folder = _copy(saved, tmp_path)
    damage(folder / "model.safetensors")
    with pytest.raises(ModelSourceError, match=what) as exc:
        resolve_folder(str(folder), "m", FileHashes(None))
    message = str(exc.value)
    assert str(folder / "model.safetensors") in message and "\n" not in message
    with pytest.raises(AdapterError, match=what) as exc:
        ModelAdapter.load(str(folder))
    assert str(folder / "model.safetensors") in str(exc.value)


def test_sharded_checkpoint_loads_when_whole(saved, tmp_path):
    folder = _copy(saved, tmp_path, sharded=True)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2, "the fixture should be sharded"
    check_weight_files(folder)
    assert resolve_folder(str(folder), "m", FileHashes(None)).layout["layers"] == 2


def test_a_missing_shard_is_named(saved, tmp_path):
    folder = _copy(saved, tmp_path, sharded=True)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelSourceError, match=f"names {shard.name}, which is missing"):
        resolve_folder(str(folder), "m", FileHashes(None))
    with pytest.raises(AdapterError, match=shard.name):
        ModelAdapter.load(str(folder))


def test_a_shard_that_lacks_its_tensors_is_named(saved, tmp_path):
    folder = _copy(saved, tmp_path, sharded=True)
    index = folder / "model.safetensors.index.json"
    record = json.loads(index.read_text())
    first, second = sorted(set(record["weight_map"].values()))[:2]
    name = next(t for t, s in record["weight_map"].items() if s == first)
    record["weight_map"][name] = second
    index.write_text(json.dumps(record))
    with pytest.raises(WeightsError, match=f"lacks 1 tensor.*first: {name}"):
        check_weight_files(folder)


def test_a_truncated_zip_bin_is_named(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(1000)}, path)
    check_weight_files(tmp_path)
    _truncate(path)
    with pytest.raises(WeightsError, match="pytorch_model.bin is damaged"):
        check_weight_files(tmp_path)


@pytest.mark.slow
def test_resolve_stage_stops_with_one_line_and_pins_nothing(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _truncate(folder / "model.safetensors")
    out = tmp_path / "out" / "m"
    params = params_file(tmp_path, models={"m": {"source": "pretrained", "path": str(folder), "device": "cpu"}})
    line = one_line_error(
        run_stage(
            "resolve_model",
            "--params",
            params,
            "--model",
            "m",
            "--out",
            out,
            env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
        )
    )
    assert "model.safetensors is damaged" in line and "not fully covered" in line
    assert not out.exists()
