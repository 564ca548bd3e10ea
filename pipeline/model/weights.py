"""Weights files checked without reading tensor data.

- ``check_weight_files(folder)``: every ``*.safetensors`` header parses and covers its file
  (``safe_open`` reads the header and checks the tensors' byte ranges against the file size, so a
  truncated file fails here), every sharded index (``*.safetensors.index.json``) parses and every
  shard it names exists and holds the tensors the index puts there, and every zip-format
  ``*.bin`` has its central directory (at the end of the file: a truncated one has none).
  ``WeightsError`` names the first bad file and what is wrong with it.
- ``load_errors()``: the exception types transformers' loader raises for a damaged weights file,
  so that ``ModelAdapter.load`` turns them into one line (naming the file via the check above).

Reading a 7B model's headers takes milliseconds; hashing it (``pipeline.model.source``) a minute.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from pipeline.errors import PipelineError

__all__ = ["WeightsError", "check_weight_files", "load_errors"]

INDEX_SUFFIX = ".safetensors.index.json"


class WeightsError(PipelineError):
    """A weights file is missing, truncated or has a damaged header; the message names it."""


def load_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that loading damaged or missing weights raises (safetensors' own included)."""
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, SafetensorError)


def _weight_files(folder: Path, pattern: str) -> list[Path]:
    return sorted(
        p for p in folder.rglob(pattern) if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _safetensors_keys(path: Path) -> set[str]:
    """The tensor names in ``path``'s header; WeightsError naming it when the header is damaged
    or the file is shorter than the header says."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return set(f.keys())
    except (SafetensorError, OSError) as exc:
        raise WeightsError(
            f"weights file {path} is damaged ({' '.join(str(exc).split())}): download or copy it again"
        ) from None


def _check_index(index: Path, headers: dict[Path, set[str]]) -> None:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"shard index {index} is not a valid index ({' '.join(str(exc).split())})") from None
    for shard_name in sorted(set(weight_map.values())):
        shard = index.parent / str(shard_name)
        if not shard.is_file():
            raise WeightsError(
                f"shard index {index} names {shard_name}, which is missing from {index.parent}: "
                "the checkpoint is incomplete; download or copy the missing shard"
            )
        keys = headers.get(shard)
        if keys is None:
            keys = headers[shard] = _safetensors_keys(shard)
        absent = sorted(t for t, s in weight_map.items() if s == shard_name and t not in keys)
        if absent:
            raise WeightsError(
                f"shard {shard} lacks {len(absent)} tensor(s) that {index.name} puts there "
                f"(first: {absent[0]}): the shard and its index do not belong together"
            )


def check_weight_files(folder: Path) -> None:
    """Check every weights file under ``folder`` (hidden folders skipped) without reading tensor
    data; WeightsError naming the first bad file. A folder with no weights at all is left to the
    loader, whose message says which names it looked for."""
    folder = Path(folder)
    headers = {path: _safetensors_keys(path) for path in _weight_files(folder, "*.safetensors")}
    for index in _weight_files(folder, f"*{INDEX_SUFFIX}"):
        _check_index(index, headers)
    for path in _weight_files(folder, "*.bin"):
        with open(path, "rb") as f:
            head = f.read(4)
        if not head:
            raise WeightsError(f"weights file {path} is empty: download or copy it again")
        # torch.save's zip format keeps its directory at the end: opening it catches a truncation.
        if head == b"PK\x03\x04":
            try:
                zipfile.ZipFile(path).close()
            except (zipfile.BadZipFile, OSError) as exc:
                raise WeightsError(f"weights file {path} is damaged ({exc}): download or copy it again") from None
