"""Stage `attribute@<model>`: importance [method, task, layer, neuron] from the activation stores."""

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.method.attribution import attribute
from stages.params import AttributeConfig, params_hash
from pipeline.provenance import provenance
from pipeline.method.store import ActivationStore, write_importance
from stages._common import entry, load_params, parser, section, study_tasks


def ablation_matrix(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    table = pd.read_parquet(path)
    if table.empty:
        return None
    out = np.full(shape, np.nan)
    out[table["layer"].to_numpy(), table["neuron"].to_numpy()] = table["effect"].to_numpy()
    return out


def run_dask(cfg: AttributeConfig, stores, truth):
    from dask.distributed import Client, LocalCluster

    from pipeline.method.distributed import importance_dask

    cluster = None
    if cfg.dask_scheduler:
        client = Client(cfg.dask_scheduler)
    else:
        cluster = LocalCluster(n_workers=cfg.dask_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        return importance_dask(stores, truth, seed=cfg.seed, ape_min_probability=cfg.ape_min_probability,
                               client=client, items_per_chunk=cfg.items_per_block)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--activations", type=Path, required=True, help="folder of <task>.zarr stores")
    p.add_argument("--ablation", type=Path, required=True, help="folder of <task>.parquet ground truth")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    params = load_params(args.params)
    cfg = section(params, "attribute", AttributeConfig)
    task_names = study_tasks(params)
    stores = {t: ActivationStore.open(args.activations / f"{t}.zarr") for t in task_names}
    lay = next(iter(stores.values())).layout
    truth = {t: ablation_matrix(args.ablation / f"{t}.parquet", (lay.n_layers, lay.n_neurons)) for t in task_names}
    if cfg.engine == "dask":
        methods, tasks, importance = run_dask(cfg, stores, truth)
    else:
        methods, tasks, importance = attribute(stores, truth, seed=cfg.seed, ape_min_probability=cfg.ape_min_probability,
                                               items_per_block=cfg.items_per_block)
    first = next(iter(stores.values())).attrs
    prov = provenance(None, params_hash(cfg, {t: s.attrs.get("params_hash") for t, s in stores.items()}))
    prov.update({k: first.get(k) for k in ("model", "model_name", "model_revision", "model_weights_sha256")})
    write_importance(args.out, methods, tasks, importance, {**prov, "params": cfg.model_dump()})


if __name__ == "__main__":
    main()
