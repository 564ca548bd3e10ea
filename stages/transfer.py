"""Stage `transfer@<model>`: the in-domain HONES masks and steering scales applied zero-shot to
out-of-distribution items (``transfer.split``) -> suppression and steering with paired
intervals, as the evaluate and steer stages report them in distribution."""

import logging
from functools import partial
from pathlib import Path

import pandas as pd

from pipeline.io import write_json, write_parquet
from pipeline.method.masks import headline_mask
from pipeline.outcomes.records import write_record
from pipeline.outcomes.steering import load_scales, steering_statistics, steering_summary, steering_table
from pipeline.outcomes.suppression import conditions_table, mask_conditions, scores_table, suppression_statistics
from pipeline.outcomes.transfer import TransferSteeringJob, chosen_grid_scales, transfer_outcomes, transfer_variants
from stages._common import entry, parser
from stages._load import load_items, load_model_and_images, worker_plan
from stages.evaluate import selected_masks
from stages.params import ConfigError, StageParams, read_params

READS = (
    "transfer.split",
    "transfer.max_items",
    "transfer.methods",
    "steer.train_split",
    "steer.utility",
    "statistics.bootstrap_resamples",
    "statistics.seed",
    "statistics.confidence",
    "statistics.equivalence_margin",
    "runtime.threads",
    "runtime.workers",
    "runtime.batch_sequences",
    "runtime.max_new_tokens",
    "tasks",
    "models.{model}",
)
STEERED_METHOD = "hones"

log = logging.getLogger(__name__)


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True, help="masks Parquet of this model")
    p.add_argument("--steer", type=Path, required=True, help="the steer stage's folder of this model")
    p.add_argument("--out", type=Path, required=True, help="folder: per-item scores, statistics JSON")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    if params.transfer.split is None:
        log.info("transfer.split is null: no out-of-distribution items, nothing measured")
        for name in ("suppression.json", "steering_intervals.json"):
            write_json({}, args.out / name)
        return
    measure_transfer(
        params, args.model, args.benchmark, params.transfer.split, params.tasks, args.masks, args.steer, args.out
    )


def measure_transfer(
    params: StageParams,
    model: str,
    benchmark: Path,
    split: str,
    tasks: list[str],
    masks_path: Path,
    steer: Path,
    out: Path,
) -> None:
    """The headline masks of ``transfer.methods`` and the steer stage's scales (folder ``steer``)
    of ``model``, for ``tasks``, on the first ``transfer.max_items`` items per task of ``split``
    of the benchmark folder ``benchmark`` -> ``out``: per-item scores and conditions (Parquet),
    suppression and steering statistics (JSON), as the evaluate and steer stages write them."""
    cfg, rt, st = params.transfer, params.runtime, params.statistics
    if not masks_path.is_file():
        raise ConfigError(f"masks table not found: {masks_path}")
    masks = pd.read_parquet(masks_path)
    headline = selected_masks(masks[masks["headline"]], cfg.methods, tasks, masks_path, "transfer.methods")
    conditions = mask_conditions(headline)
    variants = transfer_variants(
        {t: headline_mask(masks, STEERED_METHOD, t) for t in tasks},
        load_scales(steer / "scales.parquet"),
        chosen_grid_scales(pd.read_parquet(steer / "steering.parquet"), str(steer / "steering.parquet")),
        tasks,
    )
    items = load_items(benchmark, (split,), tuple(tasks), cfg.max_items)
    workers, threads = worker_plan(params, model)
    steering_jobs = [
        TransferSteeringJob(
            task,
            items[items["task"] == task],
            tuple(variants[task].items()),
            params.steer.train_split,
            params.steer.utility,
            rt.batch_sequences,
            rt.max_new_tokens,
        )
        for task in tasks
    ]
    scores, runs = transfer_outcomes(
        items,
        conditions,
        steering_jobs,
        partial(load_model_and_images, params, model, benchmark),
        batch_size=rt.batch_sequences,
        max_new_tokens=rt.max_new_tokens,
        workers=workers,
        threads=threads,
    )
    write_parquet(scores_table(scores, items), out / "scores.parquet")
    write_parquet(conditions_table(conditions), out / "conditions.parquet")
    write_record(
        suppression_statistics(
            scores,
            conditions,
            n_resamples=st.bootstrap_resamples,
            seed=st.seed,
            confidence=st.confidence,
            equivalence_margin=st.equivalence_margin,
        ),
        out / "suppression.json",
    )
    table = steering_table(runs)
    write_parquet(table, out / "steering.parquet")
    write_json(steering_summary(table), out / "steering.json")
    write_record(
        steering_statistics(
            runs, params.steer.utility, n_resamples=st.bootstrap_resamples, seed=st.seed, confidence=st.confidence
        ),
        out / "steering_intervals.json",
    )


if __name__ == "__main__":
    main()
