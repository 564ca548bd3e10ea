"""Stage `train_default_model@<model>`: train an embedded default VLM on the benchmark."""

from pathlib import Path

import torch

from pipeline.model.default_model import train_default_model
from stages._common import entry, parser
from stages._device import model_device
from stages.params import ConfigError, PretrainedModelConfig, read_params

READS = ("models.{model}", "runtime.threads")


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="name under 'models' in params.yaml")
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    params = read_params(args.params, READS, model=args.model)
    cfg = params.models[args.model]
    if isinstance(cfg, PretrainedModelConfig):
        raise ConfigError(f"models.{args.model} has source 'pretrained': there is nothing to train")
    torch.set_num_threads(params.runtime.threads)
    train_default_model(cfg.spec, args.benchmark, args.out, name=args.model, device=model_device(params, args.model))


if __name__ == "__main__":
    main()
