"""Stage `dump@<model>-<task>`: FFN activations under base + critical-head conditions -> Zarr store."""

from pathlib import Path

import pandas as pd

from pipeline.config import DumpConfig, HeadsConfig, params_hash
from pipeline.dump import dump_activations
from pipeline.heads import top_heads
from pipeline.io import write_parquet
from pipeline.provenance import provenance
from stages._common import model_location, entry, load_images, load_items, load_model, load_params, parser, runtime, section


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
    cfg = section(params, "dump", DumpConfig)
    heads_cfg = section(params, "heads", HeadsConfig)
    rt = runtime(params)
    items = load_items(args.benchmark, (cfg.split,), (args.task,), cfg.max_items)
    heads = top_heads(pd.read_parquet(args.heads), heads_cfg.top_k)
    path, revision, _, _ = model_location(params, args.model)
    prov = provenance(path, None, revision)
    phash = params_hash(cfg, {"top_k": heads_cfg.top_k, "heads": heads[["layer", "head", "score"]].to_dict("list"),
                              "items": items["item_id"].tolist(), "model": prov})
    prov["params_hash"] = phash
    adapter = load_model(params, args.model)
    images = load_images(args.benchmark)
    dump_activations(
        adapter, items, images, heads, args.out, batch_size=rt.batch_size, dtype=cfg.dtype,
        caption_idf=cfg.caption_idf, attrs={**prov, "model_name": args.model, "params": cfg.model_dump()},
        params_hash=phash, target_chunk_bytes=int(cfg.target_chunk_mib * 2**20),
    )
    write_parquet(heads, args.critical_heads)


if __name__ == "__main__":
    main()
