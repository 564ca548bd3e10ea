"""Stage `ablation@<model>-<task>`: ground-truth effect of zeroing each FFN neuron -> Parquet."""

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.method.ablation import neuron_ablation_effects
from stages.params import AblationConfig
from pipeline.io import write_parquet
from stages._common import entry, load_images, load_items, load_model, load_params, parser, runtime, section


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="Parquet (layer, neuron, effect)")
    args = p.parse_args()
    params = load_params(args.params)
    cfg = section(params, "ablation", AblationConfig)
    rt = runtime(params)
    if not cfg.enabled:
        write_parquet(pd.DataFrame({"layer": np.array([], np.int32), "neuron": np.array([], np.int32),
                                    "effect": np.array([], np.float64)}), args.out)
        return
    items = load_items(args.benchmark, (cfg.split,), (args.task,), cfg.max_items)
    adapter = load_model(params, args.model)
    effect = neuron_ablation_effects(adapter, items, load_images(args.benchmark),
                                     batch_size=rt.batch_size)
    layers, neurons = np.indices(effect.shape)
    write_parquet(pd.DataFrame({"layer": layers.ravel().astype(np.int32), "neuron": neurons.ravel().astype(np.int32),
                                "effect": effect.ravel()}), args.out)


if __name__ == "__main__":
    main()
