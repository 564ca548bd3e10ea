"""Stage `steer@<model>`: learned task steering scales on dev, compared with baselines on test."""

from functools import partial
from pathlib import Path

import pandas as pd

from pipeline.io import write_json, write_parquet
from pipeline.method.masks import headline_mask
from pipeline.model.workers import map_jobs
from pipeline.outcomes.records import write_record
from pipeline.outcomes.steering import (
    SteeringJob,
    SteeringSettings,
    run_steering_job,
    scales_table,
    steering_statistics,
    steering_summary,
    steering_table,
)
from stages._common import entry, parser
from stages._load import load_items, load_model_and_images, worker_plan
from stages.params import ConfigError, read_params

READS = (
    "steer.beta",
    "steer.l2",
    "steer.lr",
    "steer.epochs",
    "steer.grad_accum",
    "steer.train_batch_size",
    "steer.clamp",
    "steer.train_split",
    "steer.eval_split",
    "steer.max_items",
    "steer.seed",
    "steer.grid",
    "steer.utility",
    "statistics.bootstrap_resamples",
    "statistics.seed",
    "statistics.confidence",
    "runtime.threads",
    "runtime.workers",
    "runtime.batch_sequences",
    "runtime.max_new_tokens",
    "tasks",
    "models.{model}",
)

MASK_METHOD = "hones"
RANDOM_METHOD = "random"


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True, help="masks Parquet of this model")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder: scales.parquet, steering.parquet, steering.json, steering_intervals.json",
    )
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    cfg, rt, tasks = params.steer, params.runtime, params.tasks
    if not args.masks.is_file():
        raise ConfigError(f"masks table not found: {args.masks}")
    masks = pd.read_parquet(args.masks)
    missing = [t for t in tasks if not headline_mask(masks, MASK_METHOD, t)]
    if missing:
        raise ConfigError(f"{args.masks} has no {MASK_METHOD!r} mask for task(s) {missing}")
    items = load_items(args.benchmark, (cfg.train_split, cfg.eval_split), tuple(tasks))
    settings = SteeringSettings(
        beta=cfg.beta,
        l2=cfg.l2,
        lr=cfg.lr,
        epochs=cfg.epochs,
        grad_accum=cfg.grad_accum,
        train_batch_size=cfg.train_batch_size,
        clamp=cfg.clamp,
        seed=cfg.seed,
        grid=tuple(cfg.grid),
        utility=cfg.utility,
        train_split=cfg.train_split,
        eval_split=cfg.eval_split,
    )

    def split_items(task: str, split: str) -> pd.DataFrame:
        sel = items[(items["task"] == task) & (items["split"] == split)]
        if sel.empty:
            raise ConfigError(f"no {task!r} items in split {split!r} of {args.benchmark}")
        return sel.head(cfg.max_items) if cfg.max_items is not None else sel

    jobs = [
        SteeringJob(
            task,
            split_items(task, cfg.train_split),
            split_items(task, cfg.eval_split),
            tuple(headline_mask(masks, MASK_METHOD, task)),
            tuple(headline_mask(masks, RANDOM_METHOD, task)),
            settings,
            rt.batch_sequences,
            rt.max_new_tokens,
        )
        for task in tasks
    ]
    # Heaviest first (retrieval scores every candidate, caption every reference); results in task order.
    order = sorted(range(len(jobs)), key=lambda k: -jobs[k].cost)
    workers, threads = worker_plan(params, args.model)
    done = map_jobs(
        run_steering_job,
        [jobs[k] for k in order],
        partial(load_model_and_images, params, args.model, args.benchmark),
        workers=workers,
        threads=threads,
        what="steer",
    )
    runs = [run for _, run in sorted(zip(order, done))]
    table = steering_table(runs)
    write_parquet(scales_table(runs), args.out / "scales.parquet")
    write_parquet(table, args.out / "steering.parquet")
    write_json(steering_summary(table), args.out / "steering.json")
    st = params.statistics
    write_record(
        steering_statistics(
            runs, cfg.utility, n_resamples=st.bootstrap_resamples, seed=st.seed, confidence=st.confidence
        ),
        args.out / "steering_intervals.json",
    )


if __name__ == "__main__":
    main()
