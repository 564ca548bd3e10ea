"""Pinning a pretrained model: the record of a folder or hub id, the hash memory, and the checks
that stop a wrong model before any weight is read (pipeline.model.source)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_models import llava_with_opt_text, tiny_llava, tiny_paligemma

from pipeline.model import source as source_mod
from pipeline.model.source import FileHashes, ModelSourceError, read_source, resolve_folder, resolve_hub, write_source


@pytest.fixture(scope="module")
def paligemma_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "pg"
    model, processor = tiny_paligemma(seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "README.md").write_text("a model card")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "download.json").write_text("{}")
    return folder


def test_folder_record_lists_the_model_files_and_layout(paligemma_dir, tmp_path):
    src = resolve_folder(str(paligemma_dir), "pg", FileHashes(tmp_path / "hashes.json"))
    assert src.kind == "folder" and src.location == str(paligemma_dir)
    assert src.model_type == "paligemma" and src.architecture == "PaliGemmaForConditionalGeneration"
    assert src.layout == {"layers": 2, "heads": 4, "kv_heads": 1, "head_dim": 8, "ffn_width": 48, "hidden_size": 32}
    # Weights, config, tokenizer and processor files; not the model card nor hidden folders.
    assert {"model.safetensors", "config.json", "tokenizer.json", "processor_config.json"} <= set(src.files)
    assert "README.md" not in src.files and not any(f.startswith(".") for f in src.files)
    import hashlib

    assert src.files["config.json"] == hashlib.sha256((paligemma_dir / "config.json").read_bytes()).hexdigest()
    write_source(src, tmp_path / "rec")
    assert read_source(tmp_path / "rec", "pg") == src
    first = (tmp_path / "rec" / "source.json").read_bytes()
    write_source(resolve_folder(str(paligemma_dir), "pg", FileHashes(None)), tmp_path / "rec")
    assert (tmp_path / "rec" / "source.json").read_bytes() == first, "the same folder gave another record"


def test_hashes_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    cache = tmp_path / "hashes.json"
    hashes = FileHashes(cache)
    first = hashes.sha256(f)
    hashes.save()
    opened = []
    real_open = open

    def spy(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    assert FileHashes(cache).sha256(f) == first and str(f) not in opened, "an unchanged file was read again"
    f.write_bytes(b"b" * 1000)
    again = FileHashes(cache).sha256(f)
    assert again != first and os.path.realpath(f) in opened


def test_changed_files_are_refused_at_load(paligemma_dir, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(paligemma_dir, folder)
    hashes = FileHashes(tmp_path / "hashes.json")
    src = resolve_folder(str(folder), "pg", hashes)
    assert src.folder(hashes, "pg") == folder
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "x": 1}))
    with pytest.raises(ModelSourceError, match=r"model 'pg': .* changed since it was resolved \(config.json\)"):
        src.folder(hashes, "pg")
    ident = src.identity
    assert ident[0] == str(folder) and ident[1].startswith("sha256:")


def test_missing_folder_names_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match=f"folder {tmp_path}/models/none not found .*hub_id"):
        resolve_folder("models/none", "m", FileHashes(None))


def test_text_only_model_is_not_a_vision_language_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path / "llama")
    with pytest.raises(
        ModelSourceError,
        match=r"not a vision-language model: its config.json has model_type "
        r"'llama' \(LlamaForCausalLM\); supported families: llava, qwen2_vl",
    ):
        resolve_folder(str(tmp_path / "llama"), "m", FileHashes(None))


def test_folder_without_config_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match=r"empty/config.json not found: not a save_pretrained model folder"):
        resolve_folder(str(tmp_path / "empty"), "m", FileHashes(None))


def test_undiscoverable_decoder_is_named_before_weights_are_read(tmp_path, monkeypatch):
    llava_with_opt_text().save_pretrained(tmp_path / "odd")

    def no_weights(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("weights were loaded to check the layout")

    monkeypatch.setattr("transformers.modeling_utils.PreTrainedModel.from_pretrained", no_weights)
    with pytest.raises(ModelSourceError, match=r"decoder layers not found in LlavaForConditionalGeneration"):
        resolve_folder(str(tmp_path / "odd"), "m", FileHashes(None))


def _fake_cache(cache, hub_id, folder, commit, refs=("main",)):
    import shutil

    repo = cache / ("models--" + hub_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


def test_hub_id_offline_resolves_from_the_local_cache(paligemma_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "f" * 40
    _fake_cache(tmp_path / "hub", "org/pg", paligemma_dir, commit, refs=("main", "v1"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the hub was asked while HF_HUB_OFFLINE=1")

    monkeypatch.setattr(source_mod, "_ask_hub", no_network)
    hashes = FileHashes(None)
    src = resolve_hub("org/pg", "v1", "pg", hashes)
    assert (src.kind, src.location, src.revision, src.commit) == ("hub", "org/pg", "v1", commit)
    assert src.files == resolve_folder(str(paligemma_dir), "pg", hashes).files
    assert src.folder(hashes, "pg") == tmp_path / "hub" / "models--org--pg" / "snapshots" / commit
    assert src.identity == ("org/pg", commit)
    assert resolve_hub("org/pg", None, "pg", hashes).revision == "main"
    with pytest.raises(
        ModelSourceError,
        match=r"hub id 'org/pg' at revision 'v2' is not in the local Hugging Face "
        r"cache .*HF_HUB_OFFLINE=1",
    ):
        resolve_hub("org/pg", "v2", "pg", hashes)
    with pytest.raises(ModelSourceError, match=r"hub id 'org/other' at revision 'main' is not in the local"):
        resolve_hub("org/other", None, "pg", hashes)


def test_loading_the_record_gives_the_same_model(tmp_path):
    from pipeline.model.adapter import ModelAdapter

    model, processor = tiny_llava(seed=2)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    hashes = FileHashes(None)
    folder = resolve_folder(str(tmp_path / "m"), "m", hashes).folder(hashes, "m")
    loaded = ModelAdapter.load(str(folder))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
