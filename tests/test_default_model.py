"""The embedded default model: tokenizer, training loop, and loading back like any hub model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from conftest import tiny_model_spec
from pipeline.model.adapter import ModelAdapter
from pipeline.tasks.items import read_annotations
from pipeline.model.default_model import (
    benchmark_vocabulary, build_tokenizer, image_word_targets, train_default_model,
)
from pipeline.model.scoring import answer_cross_entropy


def test_tokenizer_covers_the_benchmark(annotations) -> None:
    tok = build_tokenizer(benchmark_vocabulary(annotations))
    unk = tok.unk_token_id
    for text in list(annotations["prompt"].str.replace("{candidate}", "")) + [r for refs in annotations["references"] for r in refs]:
        assert unk not in tok(text, add_special_tokens=False)["input_ids"], text
    assert tok.decode(tok("a red circle on the left .", add_special_tokens=False)["input_ids"]) == "a red circle on the left ."
    assert len(tok("Yes", add_special_tokens=False)["input_ids"]) == 1


def test_answer_cross_entropy_counts_only_answer_tokens() -> None:
    logits = torch.zeros(1, 4, 5)
    logits[0, 2, 3] = 10.0  # position 2 predicts token 3 at position 3
    ids = torch.tensor([[0, 1, 2, 3]])
    mask = torch.tensor([[False, False, False, True]])
    loss = answer_cross_entropy(logits, ids, mask)
    want = -torch.log_softmax(logits[0, 2], -1)[3]
    assert torch.allclose(loss, want)
    mask_all = torch.tensor([[False, True, True, True]])
    assert answer_cross_entropy(logits, ids, mask_all) > loss


def test_warm_up_targets_name_image_words(annotations) -> None:
    tok = build_tokenizer(benchmark_vocabulary(annotations))
    words, ocr = image_word_targets(annotations, tok)
    rec = annotations[annotations["task"] == "ocr"].iloc[0]
    assert ocr[rec.image_id] == tok.convert_tokens_to_ids(rec.references[0])
    assert tok.convert_tokens_to_ids(rec.references[0]) in words[rec.image_id]


def test_train_save_and_load_back(benchmark_dir, tmp_path) -> None:
    spec = replace(tiny_model_spec(), steps=3, batch_size=4, vision_warmup_steps=2, warmup_steps=1)
    out = tmp_path / "m"
    summary = train_default_model(spec, benchmark_dir, out, name="m")
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert summary["language_model"]["ffn_width"] == spec.text_ffn
    assert not (tmp_path / "m.tmp").exists()
    adapter = ModelAdapter.load(str(out))
    assert adapter.family == "llava" and adapter.num_layers == spec.text_layers
    items = read_annotations(benchmark_dir / "annotations.parquet", splits=("test",), tasks=("vqa",)).head(2)
    from pipeline.tasks.items import ImageTable

    images = ImageTable(benchmark_dir / "images.parquet")
    inputs = adapter.build_inputs([images[i] for i in items["image_id"]], items["prompt"].tolist())
    with torch.no_grad():
        logits = adapter.model(**inputs.tensors).logits
    assert torch.isfinite(logits).all()


def test_second_family_trains_and_loads(benchmark_dir, tmp_path) -> None:
    spec = replace(tiny_model_spec(), family="idefics3", text_kv_heads=2, steps=2, batch_size=4,
                   vision_warmup_steps=2, warmup_steps=1)
    out = tmp_path / "idefics3"
    train_default_model(spec, benchmark_dir, out, name="idefics3")
    adapter = ModelAdapter.load(str(out))
    assert adapter.family == "idefics3"
    assert (adapter.num_layers, adapter.num_heads, adapter.num_kv_heads) == (2, 4, 2)
    assert type(adapter.model.model.text_model).__name__ == "Qwen2Model"
    from pipeline.tasks.items import ImageTable

    images = ImageTable(benchmark_dir / "images.parquet")
    items = read_annotations(benchmark_dir / "annotations.parquet", splits=("test",), tasks=("ocr",)).head(2)
    inputs = adapter.build_inputs([images[i] for i in items["image_id"]], items["prompt"].tolist())
    image_id = adapter.model.config.image_token_id
    assert int((inputs.tensors["input_ids"][0] == image_id).sum()) == (32 // 8) ** 2 // 4
    with torch.no_grad():
        assert torch.isfinite(adapter.model(**inputs.tensors).logits).all()


def test_training_is_byte_for_byte_reproducible(benchmark_dir, tmp_path) -> None:
    """Same spec, same data: every file of the saved folder is identical (no wall-clock time in
    training.json), so a retrain never invalidates what DVC cached downstream."""
    spec = replace(tiny_model_spec(), steps=3, batch_size=4, vision_warmup_steps=2, warmup_steps=1)
    folders = []
    for run in ("a", "b"):
        torch.manual_seed(123 if run == "a" else 456)  # the trainer seeds itself; outside state must not matter
        train_default_model(spec, benchmark_dir, tmp_path / run, name="m")
        folders.append({p.name: p.read_bytes() for p in sorted((tmp_path / run).iterdir())})
    assert folders[0].keys() == folders[1].keys() and "training.json" in folders[0]
    different = [name for name in folders[0] if folders[0][name] != folders[1][name]]
    assert not different, different
