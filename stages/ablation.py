"""Stage `ablation@<model>`: ground-truth effect of zeroing each FFN neuron, per task -> a folder
of Parquet tables (`<task>.parquet`).

One stage per model, not per task: only models small enough run it (`ablation.enabled`), and on
them a stage per task costs more in DVC's bookkeeping and process start than the task's work."""

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.io import atomic_directory, write_parquet
from pipeline.method.ablation import ablation_effects_per_task
from stages._common import entry, parser
from stages._load import load_items, load_model_and_images, worker_plan
from stages.params import read_params

READS = (
    "tasks",
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
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="folder: <task>.parquet (layer, neuron, effect, se)")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    cfg = params.ablation
    if not cfg.enabled:
        tables = {task: effect_table(np.zeros((0, 0)), np.zeros((0, 0))) for task in params.tasks}
    else:
        items = {task: load_items(args.benchmark, (cfg.split,), (task,), cfg.max_items) for task in params.tasks}
        workers, threads = worker_plan(params, args.model)
        effects = ablation_effects_per_task(
            items,
            None,
            load=partial(load_model_and_images, params, args.model, args.benchmark),
            batch_size=params.runtime.batch_sequences,
            workers=workers,
            threads=threads,
        )
        tables = {task: effect_table(*effects[task]) for task in params.tasks}
    with atomic_directory(args.out) as tmp:
        for task, table in tables.items():
            write_parquet(table, tmp / f"{task}.parquet")


if __name__ == "__main__":
    main()
