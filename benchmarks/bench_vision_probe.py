"""What the default model's vision tower knows: linear probes of each object's shape and colour.

    python benchmarks/bench_vision_probe.py --trained data/models/tiny-llava [data/models/tiny-idefics3 ...]
    python benchmarks/bench_vision_probe.py --warm-up tiny-llava [--steps 1500] [--set vision_layers=6 ...]

The synthetic benchmark's captions name each object's colour, shape and slot ("a red circle on
the left and ..."). A probe reads, for each of the three slots, the shape (or "empty") and the
colour from the tower's patch features of the image (all patches, flattened; standardised),
with one linear layer trained on 4,000 train images (Adam, 300 full-batch epochs) and scored on
the 200 test images: the share of occupied slots whose shape / colour it names. ``--trained``
probes saved models; ``--warm-up`` builds the model params.yaml describes (with ``--set``
overrides), runs only the vision warm-up for ``--steps`` steps and probes that tower, which is
how the warm-up's design was chosen (README, "The default models"). Needs ``data/benchmark``
(synthetic source). Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from _common import REPO, table

from pipeline.model import default as dm  # noqa: E402
from pipeline.tasks.items import ImageTable, read_annotations  # noqa: E402
from stages.params import load_params_file  # noqa: E402

SLOTS = {"on the left": 0, "in the middle": 1, "on the right": 2}
OBJECT = re.compile(r"(?:a|an) (\w+) (\w+) (on the left|in the middle|on the right)")


def slot_labels(captions: pd.DataFrame, shapes: list[str], colours: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[image, slot] class of each slot's shape and colour (0: empty) from the first reference."""
    shape_y, colour_y = [], []
    for refs in captions["references"]:
        s, c = [0, 0, 0], [0, 0, 0]
        for colour, shape, slot in OBJECT.findall(refs[0]):
            s[SLOTS[slot]], c[SLOTS[slot]] = 1 + shapes.index(shape), 1 + colours.index(colour)
        shape_y.append(s)
        colour_y.append(c)
    return torch.tensor(shape_y), torch.tensor(colour_y)


def tower_features(model, processor, images: list) -> torch.Tensor:
    tower = dm.vision_tower(model).eval()
    with torch.no_grad():
        return torch.cat(
            [
                dm.patch_features(tower, dm.image_pixels(processor, images[s : s + 256])).flatten(1)
                for s in range(0, len(images), 256)
            ]
        )


def probe_accuracy(x_train, y_train, x_test, y_test, classes: int) -> float:
    """Share of the test's occupied slots a linear probe (one layer, all slots) classifies right."""
    torch.manual_seed(0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    probe = torch.nn.Linear(x_train.shape[1], 3 * classes)
    opt = torch.optim.Adam(probe.parameters(), 1e-3, weight_decay=1e-4)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(probe(x_train).view(-1, 3, classes).transpose(1, 2), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = probe(x_test).view(-1, 3, classes).argmax(-1)
    return float((pred == y_test)[y_test > 0].float().mean())


def probe(model, processor, benchmark: Path) -> tuple[float, float]:
    """(shape accuracy, colour accuracy) of the probes on ``model``'s tower."""
    annotations = read_annotations(benchmark / "annotations.parquet")
    images = ImageTable(benchmark / "images.parquet")
    captions = annotations[annotations["task"] == "caption"]
    found = [m for refs in captions["references"] for m in OBJECT.findall(refs[0])]
    if not found:
        raise SystemExit(f"{benchmark}: no caption names an object's slot; the probe needs the synthetic benchmark")
    colours, shapes = sorted({c for c, _, _ in found}), sorted({s for _, s, _ in found})
    parts = {}
    for split, n in (("train", 4000), ("test", 200)):
        rows = captions[captions["split"] == split].head(n)
        parts[split] = (
            tower_features(model, processor, [images[i] for i in rows["image_id"]]),
            *slot_labels(rows, shapes, colours),
        )
    (xtr, str_, ctr), (xte, ste, cte) = parts["train"], parts["test"]
    return (probe_accuracy(xtr, str_, xte, ste, len(shapes) + 1), probe_accuracy(xtr, ctr, xte, cte, len(colours) + 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trained", nargs="*", type=Path, default=[], help="saved default models to probe")
    p.add_argument("--warm-up", dest="warm_up", help="a params.yaml model: run only its vision warm-up, then probe")
    p.add_argument("--steps", type=int, help="warm-up steps (default: the model's vision_warmup_steps)")
    p.add_argument("--set", nargs="*", default=[], help="spec overrides, key=value (JSON values)")
    p.add_argument("--benchmark", type=Path, default=REPO / "data" / "benchmark")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = []
    for folder in args.trained:
        from pipeline.model.adapter import ModelAdapter

        adapter = ModelAdapter.load(str(folder))
        rows.append((str(folder), "trained", "", *probe(adapter.model, adapter.processor, args.benchmark)))
    if args.warm_up:
        overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
        spec = replace(load_params_file(REPO / "params.yaml").models[args.warm_up].spec, **overrides)
        data = dm._read_train_split(args.benchmark)
        spec = replace(spec, image_size=dm._image_size(data))
        steps = args.steps if args.steps is not None else spec.vision_warmup_steps
        model, processor = dm._build_untrained(spec, data.annotations, "cpu")
        decoded = dm._decode_images(data.images, data.train["image_id"])
        t0 = time.perf_counter()
        dm.warm_up_vision(
            model,
            processor,
            decoded,
            dm.image_word_targets(data.train, processor.tokenizer),
            steps=steps,
            batch_size=spec.batch_size * 2,
            lr=spec.lr,
            seed=spec.seed,
        )
        label = f"{args.warm_up} {' '.join(args.set)}".strip()
        rows.append(
            (
                label,
                f"warm-up only, {steps} steps",
                f"{time.perf_counter() - t0:.0f}",
                *probe(model, processor, args.benchmark),
            )
        )
    print(table(("model", "tower", "warm-up (s)", "shape probe (test)", "colour probe (test)"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
