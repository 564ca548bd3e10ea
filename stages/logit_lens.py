"""Stage `logit_lens@<model>`: the answer's log-probability decoded from each layer's residual
stream, attention output and FFN output, per item of every task -> lens.parquet, the means per
(task, layer, component) -> summary.parquet and lens.png, and those means as metrics JSON."""

from pathlib import Path

import pandas as pd

from pipeline.io import write_json, write_parquet
from pipeline.method.logit_lens import lens_summary, logit_lens
from pipeline.report.plots import plot_logit_lens
from stages._common import entry, parser
from stages._load import load_images, load_items, load_model
from stages.params import read_params

READS = (
    "tasks",
    "logit_lens.split",
    "logit_lens.max_items",
    "runtime.threads",
    "runtime.batch_sequences",
    "models.{model}",
)


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    cfg, rt = params.logit_lens, params.runtime
    items = load_items(args.benchmark, (cfg.split,), tuple(params.tasks), cfg.max_items)
    adapter = load_model(params, args.model)
    table, utility = logit_lens(adapter, items, load_images(args.benchmark), batch_size=rt.batch_sequences)
    summary = lens_summary(table)
    model_utility = pd.Series(utility).groupby(items["task"].to_numpy()).mean()
    args.out.mkdir(parents=True, exist_ok=True)
    write_parquet(table, args.out / "lens.parquet")
    write_parquet(summary, args.out / "summary.parquet")
    plot_logit_lens(summary, args.out / "lens.png", f"{args.model}: logit lens ({cfg.split} items)")
    write_json(
        {
            "split": cfg.split,
            "unit": "mean answer log-probability, nats per token",
            "tasks": {
                task: {
                    "items": int(sub["items"].iloc[0]),
                    "model_logprob": float(model_utility[task]),
                    **{
                        c: [float(v) for v in sub[sub["component"] == c].sort_values("layer")["mean_logprob"]]
                        for c in ("residual", "attention", "ffn")
                    },
                }
                for task in params.tasks
                for sub in [summary[summary["task"] == task]]
            },
        },
        args.metrics,
    )


if __name__ == "__main__":
    main()
