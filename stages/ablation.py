"""Stage `ablation@<model>-<task>`: ground-truth effect of zeroing each FFN neuron -> Parquet."""

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.io import write_parquet
from pipeline.method.ablation import neuron_ablation_effects
from stages._common import entry, parser
from stages._load import load_images, load_items, load_model
from stages.params import read_params

READS = (
    "ablation.enabled", "ablation.split", "ablation.max_items",
    "runtime.threads", "runtime.batch_sequences",
    "models.{model}",
)


def effect_table(effect: np.ndarray, se: np.ndarray) -> pd.DataFrame:
    """[layer, neuron] effects and their standard errors as rows (layer, neuron, effect, se), nats;
    empty when ablation is off."""
    layers, neurons = np.indices(effect.shape)
    return pd.DataFrame({"layer": layers.ravel().astype(np.int32), "neuron": neurons.ravel().astype(np.int32),
                         "effect": effect.ravel().astype(np.float64), "se": se.ravel().astype(np.float64)})


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
    adapter = load_model(params, args.model)
    effect, se = neuron_ablation_effects(adapter, items, load_images(args.benchmark),
                                         batch_size=params.runtime.batch_sequences)
    write_parquet(effect_table(effect, se), args.out)


if __name__ == "__main__":
    main()
