"""How well the first-order head estimate finds the heads exact mean substitution finds, under
the utility it differentiates (teacher-forced) and under the generative one the default scores.

    python benchmarks/bench_head_estimate.py --model data/models/tiny-llava --benchmark data/benchmark \\
        [--tasks vqa ocr caption retrieval] [--items 40] [--top-k 4] [--candidates 8] [--path-steps 0 2 4]
        [--screen-items 25 50 100] [--heads data/heads/tiny-llava]

Per task, on the first ``--items`` discovery items: Spearman of the estimate
(``heads.estimate_head_scores``, mean over items) with the exact scores of every head, and the
recall of the exact top ``--top-k`` among the estimate's top ``--candidates`` (what guided
localisation then scores exactly), for exact scores under ``teacher_forced`` and under
``generative`` utility. Skips politely when the folders are absent. Not run by CI.

``--path-steps``: the estimates compared. 0 is the pipeline's (the gradient at no substitution);
S > 0 averages the gradient at S points along the path that substitutes every head at once
(alpha = (k + 1/2) / S, k < S; integrated gradients of the joint substitution, S forward and
backward passes per batch), to see whether the linear estimate's misses come from the size of the
intervention.

``--screen-items N``: another candidate ranking, not a gradient: every head's exact
teacher-forced substitution score (one forward row per head and item, no generation) on the
first N items, to see whether a cheap exact sweep finds the candidates the estimate misses.

``--heads DIR``: the exhaustive generative scores of a heads stage (``DIR/<task>/scores.parquet``,
the stage's ``heads.max_items`` items) instead of scoring again on ``--items``; the estimates then
use the same items. "tie-aware recall" counts a found head whose exact score equals the
exhaustive k-th score as found (a degenerate task's zeros tie every head).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from _common import load_model_and_images, model_task_parser, require, table


def _spearman(a, b) -> float:
    import numpy as np
    import pandas as pd

    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def path_estimate(adapter, items, images, *, steps: int, batch_size: int):
    """Mean over ``steps`` midpoints alpha of -dU/dalpha (every head substituted by alpha at once):
    float64 [items, layers, heads], nats; the pipeline's estimate at alpha = 0 when steps is 0."""
    import numpy as np
    import torch

    from pipeline.method.heads import estimate_head_scores
    from pipeline.model.batching import for_each_batch
    from pipeline.model.hooks import trace_head_substitution
    from pipeline.model.scoring import mean_answer_logprob, model_answer_logprobs
    from pipeline.tasks.items import item_prompts, teacher_forced_answers

    if steps == 0:
        return estimate_head_scores(adapter, items, images, batch_size=batch_size, progress=False)
    prompts, answers = item_prompts(items), teacher_forced_answers(items)
    imgs = [images[i] for i in items["image_id"]]
    layers = adapter.num_layers
    out = np.zeros((len(items), layers, adapter.num_heads), dtype=np.float64)

    def run(sl: slice) -> None:
        inputs = adapter.build_inputs(imgs[sl], prompts[sl], answers=answers[sl])
        for k in range(steps):
            with torch.enable_grad(), trace_head_substitution(adapter, inputs.batch_size) as alphas:
                with torch.no_grad():
                    for a in alphas.values():
                        a.fill_((k + 0.5) / steps)
                utility = mean_answer_logprob(*model_answer_logprobs(adapter, inputs))
                grads = torch.autograd.grad(utility.sum(), [alphas[layer] for layer in range(layers)])
            out[sl] -= torch.stack(grads, dim=1).double().cpu().numpy() / steps

    for_each_batch(len(items), batch_size, run, what="path estimate", progress=False)
    return out


def _recall(table_, ranking: str, k: int, candidates: int) -> tuple[float, float]:
    """(recall, tie-aware recall) of the exhaustive top ``k`` among the top ``k`` by exact score
    of the ``candidates`` heads ranked highest by the column ``ranking``."""
    from pipeline.method.heads import top_heads

    exhaustive = top_heads(table_, k)
    best = {(int(l), int(h)) for l, h in exhaustive[["layer", "head"]].to_numpy()}
    kth = float(exhaustive["score"].iloc[-1])
    order = table_.sort_values([ranking, "layer", "head"], ascending=[False, True, True], kind="stable")
    found = top_heads(order.head(candidates).drop(columns="exact", errors="ignore"), k)
    keys = {(int(l), int(h)) for l, h in found[["layer", "head"]].to_numpy()}
    return len(best & keys) / k, min(1.0, float((found["score"] >= kth).sum()) / k)


def main(argv=None) -> int:
    p = model_task_parser(__doc__, items=40, threads=1, repeats=1, repeats_help="unused")
    p.add_argument("--tasks", nargs="+", default=["vqa", "ocr", "caption", "retrieval"])
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--path-steps", type=int, nargs="+", default=[0])
    p.add_argument("--screen-items", type=int, nargs="*", default=[])
    p.add_argument("--heads", type=Path, default=None, help="a heads stage's folder of this model")
    args = p.parse_args(argv)
    if not require(args.model, args.benchmark):
        return 0

    import pandas as pd

    from pipeline.method.heads import score_heads, with_estimate
    from pipeline.tasks.items import read_annotations

    adapter, images = load_model_and_images(args.model, args.benchmark, args.threads, args.dtype, args.device)
    rows = []
    for task in args.tasks:
        items = read_annotations(args.benchmark / "annotations.parquet", splits=(args.split,), tasks=(task,))
        n_items = args.items
        if args.heads is not None:
            n_items = int(pd.read_parquet(args.heads / task / "per_item.parquet")["item"].max()) + 1
        items = items.head(n_items).reset_index(drop=True)
        rankings = {
            f"estimate, path steps {s}": path_estimate(adapter, items, images, steps=s, batch_size=args.batch_size)
            for s in args.path_steps
        }
        for n in args.screen_items:
            sweep = score_heads(
                adapter, task, items.head(n), images, batch_size=args.batch_size, utility="teacher_forced"
            )
            screen = np.zeros((1, adapter.num_layers, adapter.num_heads))
            screen[0, sweep["layer"], sweep["head"]] = sweep["score"]
            rankings[f"teacher-forced sweep, {min(n, len(items))} items"] = screen
        utilities = ("teacher_forced", "generative") if args.heads is None else ("generative",)
        for utility in utilities:
            if args.heads is None:
                exact = score_heads(
                    adapter,
                    task,
                    items,
                    images,
                    batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens,
                    utility=utility,
                )
            else:
                exact = pd.read_parquet(args.heads / task / "scores.parquet")[["layer", "head", "score"]]
            for name, ranking in rankings.items():
                table_ = with_estimate(exact, ranking)
                recall, tie_aware = _recall(table_, "estimate", args.top_k, args.candidates)
                rows.append(
                    (
                        task,
                        utility,
                        name,
                        _spearman(table_["estimate"], table_["score"]),
                        recall,
                        tie_aware,
                        float((table_["score"] != 0).mean()),
                    )
                )
    print(f"{args.model.name}, {len(items)} {args.split} items, top {args.top_k} among {args.candidates} candidates")
    print(
        table(
            (
                "task",
                "exact utility",
                "candidate ranking",
                "Spearman",
                "recall",
                "tie-aware recall",
                "heads with a non-zero score",
            ),
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
