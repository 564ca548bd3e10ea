"""Stage `sampled_ground_truth@<model>`: per task, the exact effect of zeroing each neuron of a
stratified sample (every evaluated method's top neurons at ``masks.rho``, random draws near and
beyond them) -> one Parquet row per neuron (task, layer, neuron, stratum, sampled, effect, se);
the ground truth that scales to models whose every neuron cannot be ablated (docs/methods.md
"A ground truth that scales"). The report estimates each method's faithfulness from it."""

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.io import write_parquet
from pipeline.method.ablation import ablation_effects_per_task
from pipeline.method.masks import mask_size
from pipeline.method.store import read_importance
from pipeline.outcomes.sampled_faithfulness import census_methods, draw_sample, sample_table
from stages._common import entry, parser
from stages._load import load_items, load_model_and_images, worker_plan
from stages.params import ConfigError, read_params

READS = (
    "ablation.split",
    "ablation.max_items",
    "ablation.sample",
    "masks.rho",
    "evaluate.methods",
    "tasks",
    "runtime.threads",
    "runtime.workers",
    "runtime.batch_sequences",
    "models.{model}",
)

COLUMNS = ("task", "layer", "neuron", "stratum", "sampled", "effect", "se")


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--attribution", type=Path, required=True, help="the model's importance store (attribute stage)")
    p.add_argument("--out", type=Path, required=True, help="Parquet, one row per task and neuron")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    cfg = params.ablation
    if not cfg.sample.enabled:
        write_parquet(pd.DataFrame({c: [] for c in COLUMNS}), args.out)
        return
    stored, tasks, importance, _ = read_importance(args.attribution)
    methods = census_methods(params.evaluate.methods, stored)
    missing = [t for t in params.tasks if t not in tasks]
    if missing:
        raise ConfigError(f"tasks: {missing} not in {args.attribution} (tasks {tasks}); rerun attribute@{args.model}")
    k = mask_size(*importance.shape[2:], params.masks.rho)
    workers, threads = worker_plan(params, args.model)
    samples, neurons, items = {}, {}, {}
    for index, task in enumerate(params.tasks):
        scores = {m: importance[stored.index(m), tasks.index(task)] for m in methods}
        samples[task] = draw_sample(
            scores, k, near=cfg.sample.near, far=cfg.sample.far, seed=cfg.sample.seed, index=index
        )
        neurons[task] = [(int(l), int(i)) for l, i in zip(*np.nonzero(samples[task].sampled))]
        items[task] = load_items(args.benchmark, (cfg.split,), (task,), cfg.max_items)
    effects = ablation_effects_per_task(
        items,
        neurons,
        load=partial(load_model_and_images, params, args.model, args.benchmark),
        batch_size=params.runtime.batch_sequences,
        workers=workers,
        threads=threads,
        what=f"sampled ground truth ({sum(map(len, neurons.values()))} neurons)",
    )
    frames = []
    for task in params.tasks:
        effect, se = effects[task]
        frames.append(sample_table(samples[task], effect, se).assign(task=task))
    write_parquet(pd.concat(frames, ignore_index=True)[list(COLUMNS)], args.out)


if __name__ == "__main__":
    main()
