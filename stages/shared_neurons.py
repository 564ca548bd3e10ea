"""Stage `shared_neurons@<model>`: for every pair of tasks, the neurons both tasks' HONES masks
hold (at the largest mask size of the masks table) zeroed alone, against as many other neurons
of each mask, on the held-out items of every task -> per-item scores and shared.json."""

from functools import partial
from pathlib import Path

import pandas as pd

from pipeline.io import write_parquet
from pipeline.outcomes.records import write_record
from pipeline.outcomes.shared_neurons import no_shared_neurons, shared_conditions, shared_neuron_statistics, shared_sets
from pipeline.outcomes.suppression import conditions_table, score_suppression, scores_table
from stages._common import entry, parser
from stages._load import load_items, load_model_and_images, worker_plan
from stages.params import ConfigError, read_params

READS = (
    "evaluate.split",
    "evaluate.max_items",
    "shared_neurons.draws",
    "statistics.bootstrap_resamples",
    "statistics.seed",
    "statistics.confidence",
    "statistics.equivalence_margin",
    "runtime.threads",
    "runtime.workers",
    "runtime.batch_sequences",
    "tasks",
    "models.{model}",
)


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True, help="masks Parquet of this model")
    p.add_argument("--out", type=Path, required=True, help="folder: per-item scores, conditions, shared.json")
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    rt, st, tasks = params.runtime, params.statistics, params.tasks
    if not args.masks.is_file():
        raise ConfigError(f"masks table not found: {args.masks}")
    masks = pd.read_parquet(args.masks)
    # The largest mask of the deletion curve: at the headline size (1%) two tasks' masks share
    # only a few neurons, too few for their effect to be measured.
    rho = float(masks["rho"].max())
    sets = shared_sets(masks, tasks, rho, params.shared_neurons.draws, st.seed)
    conditions = shared_conditions(sets, rho)
    args.out.mkdir(parents=True, exist_ok=True)
    if not conditions:
        write_record(no_shared_neurons(rho), args.out / "shared.json")
        return
    items = load_items(args.benchmark, (params.evaluate.split,), tuple(tasks), params.evaluate.max_items)
    workers, threads = worker_plan(params, args.model)
    # The statistics read the likelihood alone: nothing is generated.
    scores = score_suppression(
        items,
        conditions,
        partial(load_model_and_images, params, args.model, args.benchmark),
        batch_size=rt.batch_sequences,
        max_new_tokens=None,
        workers=workers,
        threads=threads,
        generative=False,
        what="shared neurons",
    )
    record = shared_neuron_statistics(
        scores,
        conditions,
        sets,
        mask_size=rho,
        n_resamples=st.bootstrap_resamples,
        seed=st.seed,
        confidence=st.confidence,
        equivalence_margin=st.equivalence_margin,
    )
    write_parquet(scores_table(scores, items), args.out / "scores.parquet")
    write_parquet(conditions_table(conditions), args.out / "conditions.parquet")
    write_record(record, args.out / "shared.json")


if __name__ == "__main__":
    main()
