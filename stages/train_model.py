"""Stage `train_default_model@<model>`: train an embedded default VLM on the benchmark."""

from pathlib import Path

from stages.params import BenchmarkConfig, ConfigError, TrainedModelConfig
from pipeline.model.default_model import DefaultModelSpec, train_default_model
from stages._common import entry, load_params, model_config, parser, runtime, section


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="name under 'models' in params.yaml")
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    params = load_params(args.params)
    cfg = model_config(params, args.model)
    if not isinstance(cfg, TrainedModelConfig):
        raise ConfigError(f"models.{args.model} has source 'pretrained': there is nothing to train")
    bench = section(params, "benchmark", BenchmarkConfig)
    fields = cfg.model_dump(exclude={"source"})
    spec = DefaultModelSpec(name=args.model, image_size=bench.image_size, threads=runtime(params).threads, **fields)
    train_default_model(spec, args.benchmark, args.out)


if __name__ == "__main__":
    main()
