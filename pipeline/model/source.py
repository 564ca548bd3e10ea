"""Where a pretrained model comes from, pinned: a local folder or a Hugging Face hub id.

``resolve_folder`` / ``resolve_hub`` check, before any weight is read, that the named model
exists, is a vision-language model, has the decoder layout ``ModelAdapter`` needs and intact
weights files (headers and shard indexes, ``pipeline.model.weights``), and return
a ``ModelSource``: the sha256 of every weight, config, tokenizer and processor file, and for a
hub id the commit the requested revision resolves to. Its JSON is the small, machine-independent
record that the model's downstream stages depend on. ``ModelSource.folder`` is where those exact
files are loaded from later; it refuses files that changed since they were recorded.

Hashing a 7B model's 14 GB takes about a minute, so ``FileHashes`` remembers each file's sha256
under its (size, mtime, inode): a file is hashed again only when it changed on disk.

The hub is asked at most once per resolve (no retries), and never when ``HF_HUB_OFFLINE=1``:
then the revision is looked up in the local Hugging Face cache only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.io import atomic_file, write_json

__all__ = [
    "FileHashes",
    "ModelSource",
    "ModelSourceError",
    "RECORD_NAME",
    "read_source",
    "resolve_folder",
    "resolve_hub",
    "write_source",
]

log = logging.getLogger(__name__)

# The files that decide what a model computes. READMEs, images and .gitattributes do not.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".jinja", ".model", ".txt", ".tiktoken", ".py")
RECORD_NAME = "source.json"
_HASH_BLOCK = 1 << 24


class ModelSourceError(PipelineError):
    """The model a params entry names cannot be used; the message names it and why."""


# ----------------------------------------------------------------------------------- hashing
class FileHashes:
    """sha256 of files, remembered in the JSON file ``cache`` under each file's real path and
    (size, mtime_ns, inode); ``None``: nothing is remembered."""

    def __init__(self, cache: Path | None = None) -> None:
        self.cache = None if cache is None else Path(cache)
        self._known: dict[str, list] = {}
        if self.cache is not None and self.cache.is_file():
            try:
                self._known = json.loads(self.cache.read_text())
            except json.JSONDecodeError:
                log.warning("ignoring unreadable hash cache %s; files will be hashed again", self.cache)
        self._dirty = False

    def sha256(self, path: Path) -> str:
        """Hex sha256 of the file at ``path`` (symlinks followed)."""
        real = os.path.realpath(path)
        st = os.stat(real)
        key = [st.st_size, st.st_mtime_ns, st.st_ino]
        known = self._known.get(real)
        if known is not None and known[:3] == key:
            return known[3]
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
        self._known[real] = [*key, digest.hexdigest()]
        self._dirty = True
        return digest.hexdigest()

    def save(self) -> None:
        if self.cache is None or not self._dirty:
            return
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.cache) as tmp:
            tmp.write_text(json.dumps(self._known, indent=0, sort_keys=True))
        self._dirty = False


def model_files(folder: Path) -> list[str]:
    """Relative paths (POSIX) of the files under ``folder`` that decide what the model computes
    (``MODEL_FILE_SUFFIXES``), hidden files and folders left out, sorted."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.endswith(MODEL_FILE_SUFFIXES):
                out.append((Path(root) / name).relative_to(folder).as_posix())
    return sorted(out)


def hash_files(folder: Path, hashes: FileHashes) -> dict[str, str]:
    """{relative path: sha256} of ``model_files(folder)``, with a progress bar."""
    from tqdm import tqdm

    names = model_files(folder)
    out = {name: hashes.sha256(folder / name) for name in tqdm(names, desc=f"sha256 {folder.name}", leave=False)}
    hashes.save()
    return out


# ----------------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class ModelSource:
    """What will be loaded for one pretrained model.

    kind: "folder" (``location`` is the path as the params give it) or "hub" (``location`` is
    the hub id; ``revision`` as requested, ``commit`` what it resolved to).
    files: {relative path: sha256} of the model's files (``MODEL_FILE_SUFFIXES``).
    model_type / architecture: from config.json; layout: the decoder as ``ModelAdapter`` sees it
    (layers, heads, kv_heads, head_dim, ffn_width, hidden_size); processor: the class
    AutoProcessor builds from the folder.
    """

    kind: str
    location: str
    model_type: str
    architecture: str
    files: dict[str, str]
    layout: dict[str, int] = field(default_factory=dict)
    processor: str = ""
    revision: str | None = None
    commit: str | None = None

    @property
    def identity(self) -> tuple[str, str]:
        """(model, revision) for provenance: the hub id and commit, or the folder and the
        sha256 of its file list."""
        if self.kind == "hub":
            return self.location, str(self.commit)
        listing = json.dumps(self.files, sort_keys=True).encode()
        return self.location, "sha256:" + hashlib.sha256(listing).hexdigest()

    def folder(self, hashes: FileHashes, name: str) -> Path:
        """The local folder holding exactly the recorded files (a hub snapshot is looked up in
        the local cache by commit, never on the network). ModelSourceError naming model ``name``
        and the first changed file when the files differ from the record."""
        if self.kind == "hub":
            folder = _cached_snapshot(self.location, str(self.commit), name)
        else:
            folder = _existing_folder(self.location, name)
        now = hash_files(folder, hashes)
        if now != self.files:
            changed = sorted(set(now) ^ set(self.files) | {f for f in now if self.files.get(f) not in (None, now[f])})
            raise ModelSourceError(
                f"model {name!r}: {folder} changed since it was resolved ({', '.join(changed[:3])}); "
                f"run `dvc repro` so that resolve_model@{name} records the new files and their stages rerun"
            )
        return folder


def write_source(source: ModelSource, out_dir: Path) -> Path:
    """Write ``source`` as ``out_dir/source.json`` (fields in order: equal sources, equal bytes)."""
    path = Path(out_dir) / RECORD_NAME
    write_json(asdict(source), path)
    return path


def read_source(model_dir: Path, name: str) -> ModelSource:
    """The record ``write_source`` left in ``model_dir``; ModelSourceError naming model ``name``
    when it is missing or unreadable."""
    path = Path(model_dir) / RECORD_NAME
    try:
        return ModelSource(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise ModelSourceError(
            f"model {name!r}: {path} not found; run `dvc repro resolve_model@{name}` first"
        ) from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelSourceError(
            f"model {name!r}: {path} is not a model record ({exc}); rerun resolve_model@{name}"
        ) from None


# ----------------------------------------------------------------------------------- resolving
def _existing_folder(path: str, name: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelSourceError(
            f"model {name!r}: folder {folder.resolve()} not found "
            f"(models.{name}.path; a Hugging Face hub id goes in models.{name}.hub_id)"
        )
    return folder


def _cached_snapshot(hub_id: str, revision: str, name: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hub_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"model {name!r}: hub id {hub_id!r} at revision {revision!r} is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and the hub may not be asked (HF_HUB_OFFLINE=1 or offline); "
            f"download it first (`hf download {hub_id}`) or point HF_HUB_CACHE at a cache that has it"
        ) from None


def _ask_hub(hub_id: str, revision: str, name: str) -> str | None:
    """The commit ``revision`` of ``hub_id`` is at on the hub, from one request; None when the
    hub cannot be reached (the caller falls back to the local cache)."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().model_info(hub_id, revision=revision, timeout=20).sha
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"model {name!r}: hub id {hub_id!r} not found on the Hugging Face hub (or it is gated and no token is set)"
        ) from None
    except RevisionNotFoundError:
        raise ModelSourceError(f"model {name!r}: revision {revision!r} of {hub_id!r} not found on the hub") from None
    except (httpx.HTTPError, HfHubHTTPError, OSError) as exc:
        log.warning("model %r: the hub could not be reached (%s); using the local cache", name, exc)
        return None


def _config(folder: Path, name: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelSourceError(f"model {name!r}: {path.resolve()} not found: not a save_pretrained model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"model {name!r}: {path.resolve()} is not valid JSON: {exc}") from None


def _check_vision_language(config: dict[str, Any], folder: Path, name: str) -> tuple[str, str]:
    """(model_type, architecture) of a config that AutoModelForImageTextToText can build."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from pipeline.model.adapter import SUPPORTED_FAMILIES

    model_type = str(config.get("model_type", ""))
    architecture = ", ".join(config.get("architectures") or []) or "no architectures listed"
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ModelSourceError(
            f"model {name!r}: {folder.resolve()} is not a vision-language model: its config.json has model_type "
            f"{model_type or '(none)'!r} ({architecture}); supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return model_type, architecture


def _check_layout(folder: Path, name: str) -> dict[str, int]:
    """Build the model on the meta device (no weights read, no memory) and find its decoder
    layers, heads and FFN neurons; ModelSourceError naming the missing module."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from pipeline.model.adapter import AdapterError, ModelAdapter

    config = AutoConfig.from_pretrained(folder)
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    except (AttributeError, KeyError, TypeError, ValueError, ImportError, RuntimeError) as exc:
        raise ModelSourceError(
            f"model {name!r}: transformers cannot build {type(config).__name__} from "
            f"{folder.resolve()}/config.json: {exc}"
        ) from None
    try:
        adapter = ModelAdapter.from_model(model)
    except AdapterError as exc:
        raise ModelSourceError(f"model {name!r}: {exc}") from None
    return {
        "layers": adapter.num_layers,
        "heads": adapter.num_heads,
        "kv_heads": adapter.num_kv_heads,
        "head_dim": adapter.head_dim,
        "ffn_width": adapter.ffn_width,
        "hidden_size": adapter.hidden_size,
    }


def _check_processor(folder: Path, name: str) -> str:
    """The class name of the processor AutoProcessor builds from ``folder``."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise ModelSourceError(f"model {name!r}: no usable processor in {folder.resolve()}: {exc}") from None
    if getattr(processor, "image_processor", None) is None:
        raise ModelSourceError(
            f"model {name!r}: the processor in {folder.resolve()} ({type(processor).__name__}) has no image processor"
        )
    return type(processor).__name__


def _check_weights(folder: Path, name: str) -> None:
    from pipeline.model.weights import WeightsError, check_weight_files

    try:
        check_weight_files(folder)
    except WeightsError as exc:
        raise ModelSourceError(f"model {name!r}: {exc}") from None


def _inspect(folder: Path, name: str, hashes: FileHashes) -> dict[str, Any]:
    model_type, architecture = _check_vision_language(_config(folder, name), folder, name)
    layout = _check_layout(folder, name)
    processor = _check_processor(folder, name)
    _check_weights(folder, name)
    return {
        "model_type": model_type,
        "architecture": architecture,
        "layout": layout,
        "processor": processor,
        "files": hash_files(folder, hashes),
    }


def resolve_folder(path: str, name: str, hashes: FileHashes) -> ModelSource:
    """The record of the save_pretrained folder ``path`` (as the params of model ``name`` give it)."""
    folder = _existing_folder(path, name)
    return ModelSource(kind="folder", location=path, **_inspect(folder, name, hashes))


def resolve_hub(hub_id: str, revision: str | None, name: str, hashes: FileHashes) -> ModelSource:
    """The record of ``hub_id`` at ``revision`` (default "main"): the commit it resolves to, asked
    of the hub once unless HF_HUB_OFFLINE=1, else (or when the hub is unreachable) from the local
    cache; the snapshot is downloaded when missing and the hub is reachable."""
    from huggingface_hub import constants, snapshot_download

    revision = revision or "main"
    commit = None if constants.HF_HUB_OFFLINE else _ask_hub(hub_id, revision, name)
    if commit is None:
        folder = _cached_snapshot(hub_id, revision, name)
        commit = folder.name
    else:
        log.info("model %r: %s@%s is commit %s", name, hub_id, revision, commit)
        folder = Path(
            snapshot_download(hub_id, revision=commit, allow_patterns=[f"*{suffix}" for suffix in MODEL_FILE_SUFFIXES])
        )
    return ModelSource(kind="hub", location=hub_id, revision=revision, commit=commit, **_inspect(folder, name, hashes))
