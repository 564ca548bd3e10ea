"""Stage `steer@<model>`: learned task steering scales on dev, compared with baselines on test."""

from pathlib import Path

import pandas as pd

from stages.params import ConfigError, SteerConfig
from pipeline.io import write_json, write_parquet
from pipeline.outcomes.steering import scales_table, steer_task, steering_summary, steering_table
from stages._common import entry, load_images, load_items, load_model, load_params, parser, runtime, section, study_tasks

MASK_METHOD = "hones"
RANDOM_METHOD = "random"


def _neurons(masks: pd.DataFrame, method: str, task: str) -> list[tuple[int, int]]:
    sel = masks[(masks["method"] == method) & (masks["task"] == task)]
    return [(int(l), int(n)) for l, n in zip(sel["layer"], sel["neuron"])]


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True, help="masks Parquet of this model")
    p.add_argument("--out", type=Path, required=True, help="folder: scales.parquet, steering.parquet, steering.json")
    args = p.parse_args()
    params = load_params(args.params)
    cfg = section(params, "steer", SteerConfig)
    rt = runtime(params)
    tasks = study_tasks(params)
    if not args.masks.is_file():
        raise ConfigError(f"masks table not found: {args.masks}")
    masks = pd.read_parquet(args.masks)
    missing = [t for t in tasks if not _neurons(masks, MASK_METHOD, t)]
    if missing:
        raise ConfigError(f"{args.masks} has no {MASK_METHOD!r} mask for task(s) {missing}")
    items = load_items(args.benchmark, (cfg.train_split, cfg.eval_split), tuple(tasks))
    images = load_images(args.benchmark)
    adapter = load_model(params, args.model)

    runs = []
    for task in tasks:
        def split_items(split: str) -> pd.DataFrame:
            sel = items[(items["task"] == task) & (items["split"] == split)]
            if sel.empty:
                raise ConfigError(f"no {task!r} items in split {split!r} of {args.benchmark}")
            return sel.head(cfg.max_items) if cfg.max_items is not None else sel

        runs.append(steer_task(
            adapter, task, split_items(cfg.train_split), split_items(cfg.eval_split), images,
            _neurons(masks, MASK_METHOD, task), _neurons(masks, RANDOM_METHOD, task), cfg,
            batch_size=rt.batch_size, train_batch_size=cfg.train_batch_size, max_new_tokens=rt.max_new_tokens,
        ))
    table = steering_table(runs)
    write_parquet(scales_table(runs), args.out / "scales.parquet")
    write_parquet(table, args.out / "steering.parquet")
    write_json(steering_summary(table), args.out / "steering.json")


if __name__ == "__main__":
    main()
