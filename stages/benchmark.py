"""Stage `benchmark`: render the synthetic multi-task benchmark into data/benchmark."""

from pathlib import Path

from pipeline.benchmark import BenchmarkSpec, build_benchmark
from pipeline.config import BenchmarkConfig
from stages._common import entry, load_params, parser, section


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    cfg = section(load_params(args.params), "benchmark", BenchmarkConfig)
    build_benchmark(BenchmarkSpec(**cfg.model_dump()), args.out)


if __name__ == "__main__":
    main()
