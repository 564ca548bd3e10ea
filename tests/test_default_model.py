"""The embedded default model: tokenizer, training loop, and loading back like any hub model."""

from __future__ import annotations

import os
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_model_spec

from pipeline.errors import PipelineError
from pipeline.model.adapter import ModelAdapter
from pipeline.model.default import (
    benchmark_vocabulary,
    build_tokenizer,
    image_word_targets,
    train_default_model,
)
from pipeline.model.scoring import answer_cross_entropy
from pipeline.tasks.items import read_annotations


def test_tokenizer_covers_the_benchmark(annotations) -> None:
    tok = build_tokenizer(benchmark_vocabulary(annotations))
    unk = tok.unk_token_id
    for text in list(annotations["prompt"].str.replace("{candidate}", "")) + [
        r for refs in annotations["references"] for r in refs
    ]:
        assert unk not in tok(text, add_special_tokens=False)["input_ids"], text
    assert (
        tok.decode(tok("a red circle on the left .", add_special_tokens=False)["input_ids"])
        == "a red circle on the left ."
    )
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


def test_warm_up_targets_name_image_words_and_bound_pairs(annotations) -> None:
    tok = build_tokenizer(benchmark_vocabulary(annotations))
    targets = image_word_targets(annotations, tok)
    rec = annotations[annotations["task"] == "ocr"].iloc[0]
    assert targets.ocr[rec.image_id] == tok.convert_tokens_to_ids(rec.references[0])
    assert tok.convert_tokens_to_ids(rec.references[0]) in targets.words[rec.image_id]
    cap = annotations[annotations["task"] == "caption"].iloc[0]
    first = tok(cap.references[0], add_special_tokens=False)["input_ids"]
    # "a red circle ...": the colour bound to its shape is one pair of the image.
    assert (first[1], first[2]) in targets.pairs[cap.image_id]
    assert set(targets.pairs) == set(targets.words)


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
    spec = replace(
        tiny_model_spec(),
        family="idefics3",
        text_kv_heads=2,
        steps=2,
        batch_size=4,
        vision_warmup_steps=2,
        warmup_steps=1,
    )
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


_TRAIN_CHILD = """
import logging, os, signal, sys
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from dataclasses import replace
from pathlib import Path
from conftest import tiny_model_spec
from pipeline.model.default import train_default_model
spec = replace(tiny_model_spec(), steps=6, batch_size=4, vision_warmup_steps=4, warmup_steps=1,
               retrieval_negatives={negatives!r})
kill_at = {kill_at!r}

def on_checkpoint(phase, step):
    print("checkpoint", phase, step, flush=True)
    if (phase, step) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs

train_default_model(spec, Path({bench!r}), Path({out!r}), name="m", resume_key="k", checkpoint_every=2,
                    on_checkpoint=on_checkpoint)
print("finished", flush=True)
"""


def _train_child(tmp_path, benchmark_dir, out, kill_at, negatives=0):
    import subprocess
    import sys

    from conftest import TESTS_DIR

    script = _TRAIN_CHILD.format(
        tests=str(TESTS_DIR), bench=str(benchmark_dir), out=str(out), kill_at=kill_at, negatives=negatives
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
@pytest.mark.parametrize(("kill_at", "negatives"), [(("warmup", 2), 0), (("language", 2), 0), (("language", 2), 2)])
def test_killed_training_resumes_to_bitwise_the_same_weights(benchmark_dir, tmp_path, kill_at, negatives) -> None:
    """SIGKILL right after a checkpoint (in the vision warm-up, or in the language training, with
    pointwise or ranking retrieval examples in the pool), run again: it resumes from that
    checkpoint, not from step 0, and every tensor of the saved model equals that of an
    uninterrupted run bitwise; the scratch directory is gone afterwards."""
    from safetensors.torch import load_file

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    ref = _train_child(tmp_path, benchmark_dir, reference, None, negatives)
    assert ref.returncode == 0 and "finished" in ref.stdout, ref.stderr[-3000:]
    assert ref.stdout.count("checkpoint") == 3  # warm-up step 2 (not 4: the last), language 2 and 4

    first = _train_child(tmp_path, benchmark_dir, killed, kill_at, negatives)
    assert first.returncode == -signal.SIGKILL and "finished" not in first.stdout
    assert (killed / ".partial-k" / "checkpoint.pt").is_file() and not (killed / "model.safetensors").exists()
    second = _train_child(tmp_path, benchmark_dir, killed, None, negatives)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming training from {killed / '.partial-k' / 'checkpoint.pt'}: {kill_at[0]} step 2" in second.stderr
    # Only the checkpoints after the resumed one were written again.
    assert second.stdout.count("checkpoint") == (2 if kill_at[0] == "warmup" else 1)

    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert not list(tmp_path.glob("**/.partial-*")) and not list(tmp_path.glob("*.tmp"))
    want, got = load_file(reference / "model.safetensors"), load_file(killed / "model.safetensors")
    assert want.keys() == got.keys() and len(want) > 10
    unequal = [k for k in want if not torch.equal(want[k], got[k])]
    assert not unequal, unequal
    assert (killed / "training.json").read_bytes() == (reference / "training.json").read_bytes()


def test_checkpoint_of_other_training_is_not_resumed(benchmark_dir, tmp_path) -> None:
    """A scratch directory made under another resume key (other spec, data, code or threads) and
    any older output in the folder are removed before training starts."""
    spec = replace(tiny_model_spec(), steps=2, batch_size=4, vision_warmup_steps=2, warmup_steps=1)
    out = tmp_path / "m"
    (out / ".partial-old").mkdir(parents=True)
    (out / ".partial-old" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (out / "stale.txt").write_text("from an older run")
    (tmp_path / "m.tmp").mkdir()
    train_default_model(spec, benchmark_dir, out, name="m", resume_key="new", checkpoint_every=1)
    assert {"config.json", "model.safetensors", "training.json"} <= {p.name for p in out.iterdir()}
    assert not (out / ".partial-old").exists() and not (out / ".partial-new").exists()
    assert not (out / "stale.txt").exists() and not (tmp_path / "m.tmp").exists()


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_frozen_tower_cache_gives_the_real_towers_inputs_and_logits(benchmark_dir, family) -> None:
    """The language phase's cache (each image processed once, the frozen tower's outputs computed
    once) feeds the model exactly what the real image processor and tower would, and leaves
    the real ones in place when uninstalled."""
    from pipeline.model import default as dm
    from pipeline.tasks.items import ImageTable

    spec = replace(
        tiny_model_spec(), family=family, text_kv_heads=2, image_size=32, patch_size=4 if family == "idefics3" else 8
    )
    annotations = read_annotations(benchmark_dir / "annotations.parquet")
    model, processor = dm._build_untrained(spec, annotations, "cpu")
    model.eval()
    adapter = ModelAdapter.from_model(model, processor)
    rows = annotations[annotations["split"] == "train"].head(6)
    table = ImageTable(benchmark_dir / "images.parquet")
    decoded = {i: table[i] for i in sorted(rows["image_id"].unique())}
    args = (
        [decoded[i] for i in rows["image_id"]],
        rows["prompt"].str.replace("{candidate}", "x").tolist(),
        [refs[0] for refs in rows["references"]],
    )
    real = adapter.build_inputs(*args)
    with torch.no_grad():
        want = model(**real.tensors).logits
    cache = dm.FrozenVisionCache(model, processor, decoded, chunk=2)
    tower, image_processor = dm.vision_tower(model), processor.image_processor
    with cache.installed():
        for _ in range(2):  # the second call reads only stored image outputs
            cached = adapter.build_inputs(*args)
            assert cached.tensors.keys() == real.tensors.keys()
            for key, value in real.tensors.items():
                assert torch.equal(cached.tensors[key], value), key
            with torch.no_grad():
                got = model(**cached.tensors).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        with pytest.raises(PipelineError, match="were not cached"):
            adapter.build_inputs([table[annotations["image_id"].iloc[-1]]], ["what ?"])
    assert processor.image_processor is image_processor and "forward" not in vars(tower)
    with torch.no_grad():
        torch.testing.assert_close(model(**real.tensors).logits, want, rtol=0, atol=0)


def test_ranking_examples_hold_the_positive_first_and_distinct_negatives(annotations) -> None:
    from pipeline.tasks.items import RankingExample, candidate_prompt, item_prompt, training_examples

    items = annotations[annotations["task"] == "retrieval"].head(5).reset_index(drop=True)
    groups = training_examples(items, np.random.default_rng(0), retrieval_negatives=2)
    assert len(groups) == len(items) and all(isinstance(g, RankingExample) for g in groups)
    for g, rec in zip(groups, items.itertuples()):
        assert g.prompts[0] == item_prompt(rec) and g.answers == ("Yes", "No", "No")
        negatives = {candidate_prompt(rec.prompt, c) for k, c in enumerate(rec.candidates) if k != rec.positive_index}
        assert len(set(g.prompts[1:])) == 2 and set(g.prompts[1:]) <= negatives
    # More negatives asked for than an item has (3 in the fixture): all of them, once each.
    every = training_examples(items, np.random.default_rng(0), retrieval_negatives=50)
    assert all(len(set(g.prompts)) == len(rec.candidates) for g, rec in zip(every, items.itertuples()))
    pointwise = training_examples(items, np.random.default_rng(0))
    assert len(pointwise) == 2 * len(items) and [e.answer for e in pointwise[:2]] == ["Yes", "No"]


def test_ranking_step_adds_softmax_over_the_evaluations_margins(benchmark_dir, annotations, images) -> None:
    """A ranking group's loss is its rows' mean answer cross-entropy plus the softmax
    cross-entropy of the margins ``yes_no_margin`` (the retrieval evaluation) computes."""
    from conftest import build_tiny_adapter

    from pipeline.model.default import _training_step, ranking_loss
    from pipeline.model.evaluation import yes_no_margin
    from pipeline.tasks.items import RankingExample, TrainingExample, training_examples

    adapter = build_tiny_adapter(benchmark_dir)
    items = annotations[annotations["task"] == "retrieval"].head(2).reset_index(drop=True)
    vqa = annotations[annotations["task"] == "vqa"].iloc[0]
    batch = training_examples(items, np.random.default_rng(1), retrieval_negatives=3)
    batch.insert(1, TrainingExample("vqa", vqa.image_id, vqa.prompt, vqa.references[0]))
    decoded = {e.image_id: images[e.image_id] for e in batch}

    want = []
    for e in batch:
        prompts, answers = (e.prompts, e.answers) if isinstance(e, RankingExample) else ([e.prompt], [e.answer])
        inputs = adapter.build_inputs([decoded[e.image_id]] * len(prompts), list(prompts), list(answers))
        with torch.no_grad():
            ce = answer_cross_entropy(
                adapter.model(**inputs.tensors).logits, inputs.input_ids, inputs.answer_mask, per_row=True
            ).mean()
        if isinstance(e, RankingExample):
            margins = yes_no_margin(adapter, [decoded[e.image_id]] * len(prompts), list(prompts))
            ce = ce + ranking_loss(torch.tensor(margins))
        want.append(float(ce))

    for p in adapter.model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(adapter.model.parameters(), lr=0.0)
    loss, per_example = _training_step(adapter, optimizer, batch, decoded, lr=0.0)
    np.testing.assert_allclose(per_example, want, rtol=1e-4, atol=1e-5)
    assert loss == pytest.approx(np.mean(want), rel=1e-4)
    assert ranking_loss(torch.tensor([2.0, 0.0])) == pytest.approx(float(np.log1p(np.exp(-2.0))))


def test_language_step_clips_only_what_it_trains(benchmark_dir, annotations, images) -> None:
    """The frozen tower's gradients are dropped when it freezes, and a gradient left on a frozen
    parameter does not enter the clipping norm: the step is the same with or without it."""
    from conftest import build_tiny_adapter

    from pipeline.model.default import _language_optimizer, _training_step, vision_tower
    from pipeline.tasks.items import TrainingExample

    rows = annotations[annotations["task"] == "vqa"].head(4)
    batch = [TrainingExample("vqa", r.image_id, r.prompt, r.references[0]) for r in rows.itertuples()]
    decoded = {e.image_id: images[e.image_id] for e in batch}
    spec = tiny_model_spec()

    def one_step(stale_after_freeze: bool) -> dict[str, torch.Tensor]:
        adapter = build_tiny_adapter(benchmark_dir)
        adapter.model.requires_grad_(True)
        tower = vision_tower(adapter.model)
        for p in tower.parameters():
            p.grad = torch.full_like(p, 100.0)  # as the warm-up's last step leaves it, only larger
        optimizer = _language_optimizer(adapter.model, spec)
        assert all(p.grad is None for p in tower.parameters())
        if stale_after_freeze:
            for p in tower.parameters():
                p.grad = torch.full_like(p, 100.0)
        _training_step(adapter, optimizer, batch, decoded, lr=1e-2)
        return {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}

    clean, stale = one_step(False), one_step(True)
    assert clean.keys() == stale.keys()
    assert all(torch.equal(clean[k], stale[k]) for k in clean)


def test_warm_up_uses_its_own_learning_rate(benchmark_dir, tmp_path, monkeypatch) -> None:
    from pipeline.model.default import training

    seen = {}

    def fake_warm_up(*args, lr, **kwargs):
        seen["lr"] = lr
        return [0.0]

    monkeypatch.setattr(training, "warm_up_vision", fake_warm_up)
    spec = replace(tiny_model_spec(), steps=1, batch_size=4, lr=3e-4, vision_warmup_lr=2e-3, warmup_steps=1)
    train_default_model(spec, benchmark_dir, tmp_path / "m", name="m")
    assert seen == {"lr": 2e-3}


def test_reusing_a_warm_tower_trains_the_full_trainings_bytes(benchmark_dir, tmp_path) -> None:
    """A training that takes its tower from a finished one with the same warm-up writes every
    file a full training writes, byte for byte, also when the language phase's recipe changed;
    a folder warmed up otherwise is refused, naming the field."""
    spec = replace(tiny_model_spec(), steps=3, batch_size=4, vision_warmup_steps=2, warmup_steps=1)
    other = replace(spec, lr=3e-4)
    for name, s in (("full", spec), ("full-other", other)):
        train_default_model(s, benchmark_dir, tmp_path / name, name="m")
    train_default_model(other, benchmark_dir, tmp_path / "reused", name="m", warm_tower_from=tmp_path / "full")
    want = {p.name: p.read_bytes() for p in sorted((tmp_path / "full-other").iterdir())}
    got = {p.name: p.read_bytes() for p in sorted((tmp_path / "reused").iterdir())}
    assert want.keys() == got.keys() and "model.safetensors" in want
    assert [n for n in want if want[n] != got[n]] == []
    with pytest.raises(PipelineError, match="vision_warmup_lr: trained 0.001, params 0.002"):
        train_default_model(
            replace(spec, vision_warmup_lr=2e-3),
            benchmark_dir,
            tmp_path / "refused",
            name="m",
            warm_tower_from=tmp_path / "full",
        )
    assert not (tmp_path / "refused").exists()
