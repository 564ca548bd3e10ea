"""Stage `ablation@<model>-<task>`: ground-truth effect of zeroing each FFN neuron -> Parquet."""

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.ablation import neuron_ablation_effects
from pipeline.adapter import ModelAdapter
from pipeline.benchmark import ImageTable, read_annotations
from pipeline.config import AblationConfig
from pipeline.io import write_parquet
from stages._common import entry, load_params, model_location, parser, runtime, section


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
    torch.set_num_threads(rt.threads)
    if not cfg.enabled:
        write_parquet(pd.DataFrame({"layer": np.array([], np.int32), "neuron": np.array([], np.int32),
                                    "effect": np.array([], np.float64)}), args.out)
        return
    items = read_annotations(args.benchmark / "annotations.parquet", splits=(cfg.split,), tasks=(args.task,))
    items = items.head(cfg.max_items)
    path, revision, dtype, device = model_location(params, args.model)
    adapter = ModelAdapter.load(path, dtype=dtype, device=device, revision=revision)
    effect = neuron_ablation_effects(adapter, items, ImageTable(args.benchmark / "images.parquet"),
                                     batch_size=rt.batch_size)
    layers, neurons = np.indices(effect.shape)
    write_parquet(pd.DataFrame({"layer": layers.ravel().astype(np.int32), "neuron": neurons.ravel().astype(np.int32),
                                "effect": effect.ravel()}), args.out)


if __name__ == "__main__":
    main()
