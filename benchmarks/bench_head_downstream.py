"""What a cheaper head localisation changes downstream: the HONES mask and its on-target drop.

For each task of one studied model whose heads stage ran exhaustively (``data/heads/<m>/<task>``),
the top K_h heads that guided localisation (the gradient estimate's top ``--candidates``) and
screened localisation (every head on the first ``--screen-items`` items, then the best
``--candidates`` on all) would keep are read from that stage's own scores and per-item values
(``pipeline.outcomes.head_stability``). Where a localisation keeps other heads than the
exhaustive sweep, the task's activations are dumped again under its heads (the dump's settings in
params.yaml), the HONES importance and its mask at ``masks.rho`` recomputed, and printed: the
mask's Jaccard with the committed ``hones`` mask, and both masks' on-target relative drop of the
likelihood on the evaluate split (``evaluate.max_items`` items, paired bootstrap, 95% interval)
with their difference. Where the heads are the same, so is everything downstream: nothing runs.

First the committed heads go through the same path: the mask must equal the committed one, and
its drop the evaluate stage's; the benchmark recomputes what the pipeline computes, or it stops.

    python benchmarks/bench_head_downstream.py --model-name tiny-llava [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import REPO, load_model_and_images, table


def _labels(heads) -> list[str]:
    return [f"{int(l)}.{int(h)}" for l, h in zip(heads["layer"], heads["head"])]


def hones_mask(adapter, items, images, heads, dump, rho: float, workdir: Path):
    """The HONES mask at ``rho`` of one task's ``items`` dumped under ``heads`` (layer, head, score)."""
    from pipeline.method.attribution import hones_importance, task_statistics
    from pipeline.method.dump import DumpExecution, DumpRequest, DumpStorage, dump_activations
    from pipeline.method.masks import mask_topk

    store = dump_activations(
        adapter,
        DumpRequest(items, images, heads, dump["caption_idf"], dump["caption_target"]),
        workdir / "store.zarr",
        DumpStorage(dump["store_dtype"], "bench", {}, int(dump["target_chunk_mib"] * 2**20)),
        DumpExecution(64, dump["gradient_batch_items"]),
    )
    stats = task_statistics(store)
    # float32, as the attribute stage stores the importance the masks stage ranks.
    return mask_topk(hones_importance(stats.mean_contribution, stats.head_scores).astype("float32"), rho)


def _neurons(mask) -> tuple[tuple[int, int], ...]:
    return tuple(sorted((int(l), int(i)) for l, i in zip(mask["layer"], mask["neuron"])))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-name", default="tiny-llava", help="a studied model with committed outputs")
    p.add_argument("--data", type=Path, default=REPO / "data")
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--tasks", nargs="+", default=None, help="default: params.yaml tasks")
    p.add_argument("--candidates", type=int, default=None, help="default: heads.screened.candidates")
    p.add_argument("--screen-items", type=int, default=None, help="default: heads.screened.items")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)

    import numpy as np
    import pandas as pd
    import yaml

    from pipeline.method.heads import per_item_values, top_heads
    from pipeline.model.source import read_source
    from pipeline.outcomes.head_stability import guided_localisation, screened_localisation
    from pipeline.outcomes.statistics import interval
    from pipeline.outcomes.suppression import MaskCondition, relative_drops, score_suppression
    from pipeline.tasks.items import read_annotations

    params = yaml.safe_load(args.params.read_text())
    m, data = args.model_name, args.data
    heads_cfg, dump, rho = params["heads"], params["dump"], float(params["masks"]["rho"])
    k = int(heads_cfg["top_k"])
    candidates = args.candidates or int(heads_cfg["screened"]["candidates"])
    screen_items = args.screen_items or int(heads_cfg["screened"]["items"])
    tasks = args.tasks or params["tasks"]
    evaluate, st = params["evaluate"], params["statistics"]
    benchmark = data / "benchmark"
    missing = [
        str(f) for f in (data / "models" / m / "source.json", data / "masks" / f"{m}.parquet") if not f.is_file()
    ]
    if missing:
        print(f"skipped: {', '.join(missing)} not found; run `dvc repro` (or `dvc pull`) first.")
        return 0
    # The folder the model's resolve or ship stage pinned (data/shipped/<m> for the default's).
    source = read_source(data / "models" / m, m)
    folder = Path(source.location) if source.kind == "folder" else source.folder(None, m)
    adapter, images = load_model_and_images(folder if folder.is_absolute() else REPO / folder, benchmark, args.threads)
    annotations = benchmark / "annotations.parquet"
    committed = pd.read_parquet(data / "masks" / f"{m}.parquet")
    rows, records = [], []
    for task in tasks:
        folder = data / "heads" / m / task
        scores = pd.read_parquet(folder / "scores.parquet")
        values, kind = per_item_values(pd.read_parquet(folder / "per_item.parquet"))
        exhaustive = top_heads(scores, k, name="heads.top_k")
        kept = {
            "exhaustive": _labels(exhaustive),
            "guided": guided_localisation(scores, k, candidates)["guided_top_heads"],
            "screened": screened_localisation(scores, values, kind, k, candidates, (screen_items,))[str(screen_items)][
                "screened_top_heads"
            ],
        }
        items = read_annotations(annotations, splits=(dump["split"],), tasks=(task,)).head(dump["max_items"])
        reference = committed[(committed["method"] == "hones") & (committed["task"] == task) & committed["headline"]]
        masks = {}
        for name, labels in kept.items():
            if name != "exhaustive" and set(labels) == set(kept["exhaustive"]):
                continue
            chosen = scores[[label in labels for label in _labels(scores)]]
            with tempfile.TemporaryDirectory() as tmp:
                masks[name] = _neurons(hones_mask(adapter, items, images, top_heads(chosen, k), dump, rho, Path(tmp)))
        if masks["exhaustive"] != _neurons(reference):
            print(f"error: {m} {task}: the committed heads' mask differs from data/masks/{m}.parquet")
            return 1
        others = [name for name in ("guided", "screened") if name in masks]
        drops = {}
        if others:
            test = read_annotations(annotations, splits=(evaluate["split"],), tasks=(task,)).head(evaluate["max_items"])
            names = ["exhaustive", *others]
            conditions = [MaskCondition("hones", task, rho, 0, True, masks[n]) for n in names]
            by_task = score_suppression(
                test, conditions, lambda: (adapter, images), batch_size=64, max_new_tokens=None, generative=False
            )
            cells = relative_drops(
                {task: by_task[("likelihood", task)]}, int(st["bootstrap_resamples"]), int(st["seed"])
            ).cells
            drops = {n: cells[(j + 1, task)] for j, n in enumerate(names)}
            stage = json.loads((data / "evaluate" / m / "suppression.json").read_text())
            expected = stage["likelihood"]["relative_drop"]["hones"][task][task]["value"]
            if (
                stage["items_per_task"]["likelihood"][task] == len(test)
                and abs(drops["exhaustive"][0] - expected) > 1e-3
            ):
                print(f"error: {m} {task}: hones drops {drops['exhaustive'][0]:.4f}, the evaluate stage {expected}")
                return 1
        for name in ("guided", "screened"):
            same = name not in masks
            a, b = set(masks["exhaustive"]), set(masks.get(name, masks["exhaustive"]))
            record = {
                "model": m,
                "task": task,
                "localisation": name,
                "top_heads": kept[name],
                "exhaustive_top_heads": kept["exhaustive"],
                "same_heads": same,
                "mask_jaccard": len(a & b) / len(a | b),
            }
            if not same:
                (p0, r0), (p1, r1) = drops["exhaustive"], drops[name]
                record |= {
                    "on_target_drop": interval(p1, r1).as_dict(),
                    "exhaustive_on_target_drop": interval(p0, r0).as_dict(),
                    "difference": interval(p1 - p0, np.asarray(r1) - np.asarray(r0)).as_dict(),
                }
            records.append(record)
            fmt = lambda d: f"{d['value']:.2f} [{d['ci_low']:.2f}, {d['ci_high']:.2f}]"  # noqa: E731
            rows.append(
                (
                    task,
                    name,
                    " ".join(kept[name]),
                    record["mask_jaccard"],
                    "same heads" if same else fmt(record["on_target_drop"]),
                    "" if same else fmt(record["exhaustive_on_target_drop"]),
                    "" if same else fmt(record["difference"]),
                )
            )
    print(
        f"{m}: top {k} heads among {candidates} candidates (screen: first {screen_items} items); HONES masks at "
        f"rho {rho:g}; on-target relative drop (%) of the likelihood, {evaluate['split']} items, 95% intervals"
    )
    print(
        table(
            ("task", "localisation", "top heads", "mask Jaccard", "on-target drop", "exhaustive's", "difference"),
            rows,
        )
    )
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
