"""Stage `localisation_downstream@<model>`: what guided and screened head localisation would change
downstream of the exhaustive sweep, per task: the heads each keeps, and where they differ from the
sweep's, the HONES mask recomputed under them (Jaccard with the committed one) and its on-target
likelihood drop beside the committed mask's -> JSON. Nothing is measured (and the JSON says why)
when the heads stage did not run exhaustively."""

import tempfile
from pathlib import Path

import pandas as pd

from pipeline.io import write_json
from pipeline.method.heads import per_item_values
from pipeline.method.masks import headline_mask
from pipeline.outcomes.localisation_downstream import DumpSettings, alternative_heads, localisation_downstream
from stages._common import entry, parser
from stages._load import load_images, load_items, load_model
from stages.params import read_params

READS = (
    "heads.localisation",
    "heads.top_k",
    "heads.guided.candidates",
    "heads.screened",
    "dump.split",
    "dump.max_items",
    "dump.store_dtype",
    "dump.caption_idf",
    "dump.caption_target",
    "dump.gradient_batch_items",
    "dump.target_chunk_mib",
    "masks.rho",
    "evaluate.split",
    "evaluate.max_items",
    "statistics.bootstrap_resamples",
    "statistics.seed",
    "statistics.confidence",
    "tasks",
    "runtime.threads",
    "runtime.batch_sequences",
    "models.{model}",
)


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--heads", type=Path, required=True, help="the model's heads folder (<task>/scores.parquet, ...)")
    p.add_argument("--masks", type=Path, required=True, help="the model's masks Parquet")
    p.add_argument("--out", type=Path, required=True, help="JSON")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    heads_cfg, dump, st = params.heads, params.dump, params.statistics
    if heads_cfg.localisation != "exhaustive":
        reason = f"heads.localisation is {heads_cfg.localisation}: there is no exhaustive sweep to compare with"
        write_json({"measured": False, "reason": reason, "by_task": {}}, args.out)
        return
    adapter, images = load_model(params, args.model), load_images(args.benchmark)
    masks = pd.read_parquet(args.masks)
    settings = DumpSettings(
        dump.caption_idf,
        dump.caption_target,
        dump.store_dtype,
        int(dump.target_chunk_mib * 2**20),
        params.runtime.batch_sequences,
        dump.gradient_batch_items,
    )
    by_task = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(dir=args.out.parent, prefix=f".{args.out.stem}.")
    for task in params.tasks:
        scores = pd.read_parquet(args.heads / task / "scores.parquet")
        values, kind = per_item_values(pd.read_parquet(args.heads / task / "per_item.parquet"))
        heads = alternative_heads(
            scores,
            values,
            kind,
            heads_cfg.top_k,
            guided_candidates=heads_cfg.guided.candidates,
            screen=(heads_cfg.screened.items, heads_cfg.screened.candidates),
        )
        by_task[task] = localisation_downstream(
            adapter,
            task,
            heads,
            tuple(sorted(headline_mask(masks, "hones", task))),
            discovery=load_items(args.benchmark, (dump.split,), (task,), dump.max_items),
            held_out=load_items(args.benchmark, (params.evaluate.split,), (task,), params.evaluate.max_items),
            images=images,
            settings=settings,
            rho=params.masks.rho,
            n_resamples=st.bootstrap_resamples,
            seed=st.seed,
            confidence=st.confidence,
            scratch=Path(scratch.name) / task,
        )
    scratch.cleanup()
    write_json({"measured": True, "reason": None, "by_task": by_task}, args.out)


if __name__ == "__main__":
    main()
