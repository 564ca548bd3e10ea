"""Stage `train_default_model@<model>`: train an embedded default VLM on the benchmark.

Resumable: it checkpoints every ``runtime.checkpoint_every_steps`` steps inside its output
(``persist: true`` in dvc.yaml) and a killed run resumes, to bitwise the same weights.

Run by hand with ``--warm-tower-from FOLDER`` (a model this stage wrote with the same warm-up,
say ``data/shipped/<model>``), it reuses that model's vision tower instead of repeating the
warm-up: after a change to the language phase's recipe only, it writes the bytes a full
training would, in the language phase's time (``pipeline.model.default.reuse_warm_tower``).
"""

from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.model.default import train_default_model
from pipeline.provenance import code_version, files_hash
from stages._common import entry, parser, report_rows
from stages._device import model_device
from stages.params import ConfigError, PretrainedModelConfig, params_hash, read_params

READS = ("models.{model}", "runtime.threads", "runtime.checkpoint_every_steps")


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="name under 'models' in params.yaml")
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--warm-tower-from",
        type=Path,
        help="a trained folder with the same warm-up whose vision tower replaces the warm-up",
    )
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    cfg = params.models[args.model]
    if isinstance(cfg, PretrainedModelConfig):
        raise ConfigError(f"models.{args.model} has source 'pretrained': there is nothing to train")
    torch.set_num_threads(params.runtime.threads)
    device = model_device(params, args.model)
    # What a checkpoint may be resumed under: the same spec, data, code, threads and device
    # (the last two change floating-point reduction order, hence the weights' bits).
    resume_key = params_hash(
        asdict(cfg.spec),
        files_hash(args.benchmark / "annotations.parquet", args.benchmark / "images.parquet"),
        code_version(__spec__.name),
        params.runtime.threads,
        device,
    )
    train_default_model(
        cfg.spec,
        args.benchmark,
        args.out,
        name=args.model,
        device=device,
        resume_key=resume_key,
        checkpoint_every=params.runtime.checkpoint_every_steps,
        warm_tower_from=args.warm_tower_from,
    )
    report_rows(cfg.spec.steps * cfg.spec.batch_size, "training examples")


if __name__ == "__main__":
    main()
