"""Stage `dump@<model>-<task>`: FFN activations under base + critical-head conditions -> Zarr store.

Multi-process: launch the same command under ``torchrun --nproc_per_node=N -m stages.dump ...``;
each rank writes its own whole blocks and rank 0 finalizes (see ``pipeline.method.distributed``).
"""

from pathlib import Path

import pandas as pd

from stages.params import DumpConfig, HeadsConfig, params_hash
from pipeline.method.distributed import barrier, dist_context, init_process_group
from pipeline.method.dump import dump_activations
from pipeline.method.heads import top_heads
from pipeline.io import write_parquet
from pipeline.provenance import provenance
from stages._common import entry, load_images, load_items, load_model, load_params, model_location, parser, runtime, section


def dump_inputs(params: dict, args) -> dict:
    """Items, critical heads, params hash and attributes of this stage: the same for every rank."""
    cfg = section(params, "dump", DumpConfig)
    heads_cfg = section(params, "heads", HeadsConfig)
    items = load_items(args.benchmark, (cfg.split,), (args.task,), cfg.max_items)
    heads = top_heads(pd.read_parquet(args.heads), heads_cfg.top_k)
    path, revision, _, _ = model_location(params, args.model)
    prov = provenance(path, None, revision)
    phash = params_hash(cfg, {"top_k": heads_cfg.top_k, "heads": heads[["layer", "head", "score"]].to_dict("list"),
                              "items": items["item_id"].tolist(), "model": prov})
    prov["params_hash"] = phash
    return dict(
        items=items, heads=heads, params_hash=phash, dtype=cfg.dtype, caption_idf=cfg.caption_idf,
        target_chunk_bytes=int(cfg.target_chunk_mib * 2**20),
        attrs={**prov, "model_name": args.model, "params": cfg.model_dump()},
    )


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
    params = load_params(args.params)
    inputs = dump_inputs(params, args)
    rank, world = dist_context()
    device = model_location(params, args.model)[3]
    adapter = load_model(params, args.model, device=init_process_group("auto", device) if world > 1 else None)
    heads = inputs.pop("heads")
    store = dump_activations(
        adapter, inputs.pop("items"), load_images(args.benchmark), heads, args.out,
        batch_size=runtime(params).batch_size, rank=rank, world_size=world, barrier=barrier, **inputs,
    )
    if store is not None:
        write_parquet(heads, args.critical_heads)


if __name__ == "__main__":
    main()
