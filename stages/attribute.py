"""Stage `attribute@<model>`: importance [method, task, layer, neuron] from the activation stores,
and the same from only the items the ablation ground truth was measured on (when they are in
the stores), so that faithfulness can be read on matched items."""

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.method.attribution import BaselineSettings, attribute, attribute_on_items
from pipeline.method.store import ActivationStore, write_importance
from pipeline.provenance import provenance
from stages._common import entry, parser, report_rows
from stages._load import load_items
from stages.params import params_hash, read_params

READS = (
    "attribute.engine",
    "attribute.dask_scheduler",
    "attribute.dask_workers",
    "attribute.seed",
    "attribute.ape_min_probability",
    "attribute.lape_filter_quantile",
    "attribute.lape_bar_quantile",
    "attribute.items_per_block",
    "ablation.split",
    "ablation.max_items",
    "tasks",
)


def ablation_matrix(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The [layer, neuron] ground truth of one task, or None when ablation was off (empty table)."""
    if not Path(path).is_file():
        raise PipelineError(f"no ablation table at {path}; run the ablation stage for this task")
    table = pd.read_parquet(path)
    if table.empty:
        return None
    out = np.full(shape, np.nan)
    out[table["layer"].to_numpy(), table["neuron"].to_numpy()] = table["effect"].to_numpy()
    return out


def run_dask(scheduler: str | None, workers: int, stores, truth, **kwargs):
    """The same reductions on dask: a running scheduler, or a LocalCluster of ``workers`` processes."""
    from dask.distributed import Client, LocalCluster

    from pipeline.method.distributed import importance_dask

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        return importance_dask(stores, truth, client=client, **kwargs)
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
    p.add_argument("--benchmark", type=Path, required=True, help="the benchmark (which items the ablation used)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    settings = params.as_dict()
    cfg = params.attribute
    stores = {t: ActivationStore.open(args.activations / f"{t}.zarr") for t in params.tasks}
    lay = next(iter(stores.values())).layout
    truth = {t: ablation_matrix(args.ablation / f"{t}.parquet", (lay.n_layers, lay.n_neurons)) for t in stores}
    baselines = BaselineSettings(cfg.ape_min_probability, cfg.lape_filter_quantile, cfg.lape_bar_quantile)
    if cfg.engine == "dask":
        methods, tasks, importance = run_dask(
            cfg.dask_scheduler,
            cfg.dask_workers,
            stores,
            truth,
            seed=cfg.seed,
            baselines=baselines,
            items_per_chunk=cfg.items_per_block,
        )
    else:
        methods, tasks, importance = attribute(
            stores, truth, seed=cfg.seed, baselines=baselines, items_per_block=cfg.items_per_block
        )
    on_items = None
    if all(truth[t] is not None for t in stores):
        ablation_ids = {
            t: load_items(args.benchmark, (params.ablation.split,), (t,), params.ablation.max_items)["item_id"].tolist()
            for t in stores
        }
        if all(set(ids) <= set(stores[t].item_ids) for t, ids in ablation_ids.items()):
            on_items = attribute_on_items(stores, ablation_ids, seed=cfg.seed, baselines=baselines).scores
            on_items = np.concatenate([on_items, importance[[methods.index("ablation")]]])
    first = next(iter(stores.values())).attrs
    prov = provenance(
        None, params_hash(settings, {t: s.attrs.get("params_hash") for t, s in stores.items()}), entry=__spec__.name
    )
    prov.update({k: first.get(k) for k in ("model", "model_name", "model_revision", "model_weights_sha256")})
    write_importance(args.out, methods, tasks, importance, {**prov, "params": settings}, on_ablation_items=on_items)
    report_rows(sum(len(s.item_ids) for s in stores.values()), "items")


if __name__ == "__main__":
    main()
