"""Stage `dump@<model>-<task>`: FFN activations under base + critical-head conditions -> Zarr store.

Multi-process: launch the same command under ``torchrun --nproc_per_node=N -m stages.dump ...``;
each rank writes its own whole blocks and rank 0 finalizes (see ``pipeline.method.distributed``).
"""

from pathlib import Path

import pandas as pd

from pipeline.io import write_parquet
from pipeline.method.distributed import barrier, dist_context, init_process_group
from pipeline.method.dump import DumpExecution, DumpRequest, DumpStorage, dump_activations
from pipeline.method.heads import top_heads
from pipeline.provenance import provenance
from stages._common import entry, parser
from stages._load import load_images, load_items, load_model, model_device, model_identity
from stages.params import StageParams, params_hash, read_params

READS = (
    "dump.split",
    "dump.max_items",
    "dump.store_dtype",
    "dump.caption_idf",
    "dump.caption_target",
    "dump.gradient_batch_items",
    "dump.target_chunk_mib",
    "heads.top_k",
    "runtime.threads",
    "runtime.batch_sequences",
    "models.{model}",
)


def dump_inputs(params: StageParams, args) -> tuple[pd.DataFrame, pd.DataFrame, DumpStorage]:
    """Items, critical heads, and how to store them (params hash, attributes): the same for every rank.

    The params hash names the scratch store a killed run resumes from: it covers what changes
    the arrays (the dump keys, the heads, the items, the model), not the batch size.
    """
    cfg = params.dump
    settings = cfg.as_dict()
    top_k = params.heads.top_k
    items = load_items(args.benchmark, (cfg.split,), (args.task,), cfg.max_items)
    heads = top_heads(pd.read_parquet(args.heads), top_k, name="heads.top_k")
    path, revision = model_identity(params, args.model)
    prov = provenance(path, None, revision, entry=__spec__.name)
    phash = params_hash(
        settings,
        {
            "top_k": top_k,
            "heads": heads[["layer", "head", "score"]].to_dict("list"),
            "items": items["item_id"].tolist(),
            "model": prov,
        },
    )
    prov["params_hash"] = phash
    storage = DumpStorage(
        dtype=cfg.store_dtype,
        params_hash=phash,
        attrs={**prov, "model_name": args.model, "params": {**settings, "heads.top_k": top_k}},
        target_chunk_bytes=int(cfg.target_chunk_mib * 2**20),
    )
    return items, heads, storage


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--heads", type=Path, required=True, help="scores.parquet of the heads stage")
    p.add_argument("--out", type=Path, required=True, help="the store, <dir>/<task>.zarr")
    p.add_argument("--critical-heads", type=Path, required=True, help="Parquet of the K_h heads used")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model, task=args.task)
    items, heads, storage = dump_inputs(params, args)
    rank, world = dist_context()
    device = init_process_group("auto", model_device(params, args.model)) if world > 1 else None
    adapter = load_model(params, args.model, device=device)
    store = dump_activations(
        adapter,
        DumpRequest(items, load_images(args.benchmark), heads, params.dump.caption_idf, params.dump.caption_target),
        args.out,
        storage,
        DumpExecution(
            params.runtime.batch_sequences,
            params.dump.gradient_batch_items,
            rank=rank,
            world_size=world,
            barrier=barrier,
        ),
    )
    if store is not None:
        write_parquet(heads, args.critical_heads)


if __name__ == "__main__":
    main()
