"""Stage `ablation@<model>-<task>`: ground-truth effect of zeroing each FFN neuron -> Parquet."""

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.io import write_parquet
from pipeline.method.ablation import ablation_shard_job, merge_ablation_shards
from pipeline.model.workers import map_jobs
from stages._common import entry, parser
from stages._load import load_items, load_model_and_images, worker_plan
from stages.params import read_params

READS = (
    "ablation.enabled",
    "ablation.split",
    "ablation.max_items",
    "runtime.threads",
    "runtime.workers",
    "runtime.batch_sequences",
    "models.{model}",
)


def effect_table(effect: np.ndarray, se: np.ndarray) -> pd.DataFrame:
    """[layer, neuron] effects and their standard errors as rows (layer, neuron, effect, se), nats;
    empty when ablation is off."""
    layers, neurons = np.indices(effect.shape)
    return pd.DataFrame(
        {
            "layer": layers.ravel().astype(np.int32),
            "neuron": neurons.ravel().astype(np.int32),
            "effect": effect.ravel().astype(np.float64),
            "se": se.ravel().astype(np.float64),
        }
    )


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="Parquet (layer, neuron, effect, se)")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model, task=args.task)
    cfg = params.ablation
    if not cfg.enabled:
        write_parquet(effect_table(np.zeros((0, 0)), np.zeros((0, 0))), args.out)
        return
    items = load_items(args.benchmark, (cfg.split,), (args.task,), cfg.max_items)
    workers, threads = worker_plan(params, args.model)
    # Shard k of n holds layers k, k + n, ...; a layer's rows compute every layer from it up,
    # so the lowest are the heaviest and go first. One worker: one shard, all layers.
    n = 1 if workers == 1 else 2 * workers
    parts = map_jobs(
        partial(ablation_shard_job, items=items, batch_size=params.runtime.batch_sequences),
        [(k, n) for k in range(n)],
        partial(load_model_and_images, params, args.model, args.benchmark),
        workers=workers,
        threads=threads,
        describe=lambda sh: f"layers {sh[0]}::{sh[1]}",
        what=f"ablation {args.task}",
    )
    effect, se = merge_ablation_shards(parts)
    write_parquet(effect_table(effect, se), args.out)


if __name__ == "__main__":
    main()
