"""Shared helpers of the model benchmarks: polite skipping, loading, Markdown tables."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def model_folder(model: Path) -> Path:
    """The folder holding the model's files: ``model`` itself, or, for a pipeline model folder
    that holds only its ship or resolve stage's ``source.json`` (the default's: its weights are in
    ``data/shipped/<model>``), the local folder that record pins."""
    model = Path(model)
    if (model / "config.json").is_file() or not (model / "source.json").is_file():
        return model
    from pipeline.model.source import read_source

    source = read_source(model, model.name)
    if source.kind != "folder":
        return model
    location = Path(source.location)
    return location if location.is_absolute() else REPO / location


def require(model: Path, benchmark: Path) -> bool:
    """True if both folders exist; otherwise say how to make them and return False."""
    model = model_folder(model)
    missing = [str(p) for p, f in ((model, "config.json"), (benchmark, "annotations.parquet")) if not (p / f).is_file()]
    if missing:
        print(
            f"skipped: {', '.join(missing)} not found. Build them with `dvc repro train_default_model` "
            "(or pass --model / --benchmark)."
        )
        return False
    return True


def table(head: tuple[str, ...], rows: list[tuple]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def model_task_parser(doc: str, *, items: int, threads: int, repeats: int, repeats_help: str):
    """The arguments every model benchmark takes: --model, --benchmark, --task, --split, --items,
    --batch-size, --threads, --device, --dtype, --repeats (add the benchmark's own after)."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("data/models/tiny-llava"))
    p.add_argument("--benchmark", type=Path, default=Path("data/benchmark"))
    p.add_argument("--task", default="vqa")
    p.add_argument("--split", default="discovery")
    p.add_argument("--items", type=int, default=items)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    return p


def load_model_and_items(args):
    """(adapter, images, items): the model in ``args.dtype`` on ``args.device`` with
    ``args.threads`` torch threads, and the first ``args.items`` items of ``args.task`` in
    ``args.split``."""
    from pipeline.tasks.items import read_annotations

    adapter, images = load_model_and_images(args.model, args.benchmark, args.threads, args.dtype, args.device)
    items = read_annotations(args.benchmark / "annotations.parquet", splits=(args.split,), tasks=(args.task,))
    return adapter, images, items.head(args.items).reset_index(drop=True)


def load_model_and_images(model: Path, benchmark: Path, threads: int, dtype: str = "float32", device: str = "cpu"):
    """(adapter, images): the model with ``threads`` torch threads, and the benchmark's images
    (module-level, so a ``functools.partial`` of it can load a worker's state)."""
    import torch

    from pipeline.model.adapter import ModelAdapter
    from pipeline.tasks.items import ImageTable

    torch.set_num_threads(threads)
    adapter = ModelAdapter.load(str(model_folder(model)), dtype=dtype, device=device)
    return adapter, ImageTable(Path(benchmark) / "images.parquet")
