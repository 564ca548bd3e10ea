"""DVC's own time per stage it runs: reading and rewriting ``dvc.lock``.

    python benchmarks/bench_dvc_lock.py [--lock dvc.lock] [--repeat 3]

``dvc repro`` reads the lock file with ruamel.yaml's safe loader several times per stage, and
after each stage rewrites it: a round-trip parse (comments kept) and a dump of the whole file.
This times each of those on ``--lock`` (the repository's, by default): the safe load with the C
parser (ruamel.yaml.clib, a dependency of this project) and with the pure-Python one, and the
round-trip parse and dump, which have no C implementation. Fastest of --repeat. Not run by CI.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path


def fastest(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lock", type=Path, default=Path("dvc.lock"))
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    from ruamel.yaml import YAML

    text = args.lock.read_text()
    c_parser = YAML(typ="safe").Parser
    stages = len(YAML(typ="safe").load(text).get("stages", {}))
    print(f"{args.lock}: {text.count(chr(10)):,} lines, {stages} stages")
    if c_parser.__module__.startswith("ruamel.yaml.parser"):
        print("safe load, C parser:   not installed (pip install ruamel.yaml.clib)")
    else:
        print(f"safe load, C parser:   {fastest(lambda: YAML(typ='safe').load(text), args.repeat):6.2f} s")
    print(f"safe load, pure:       {fastest(lambda: YAML(typ='safe', pure=True).load(text), args.repeat):6.2f} s")
    rt = YAML()
    rt.default_flow_style = False
    print(f"round-trip parse:      {fastest(lambda: rt.load(text), args.repeat):6.2f} s")
    data = rt.load(text)
    print(f"round-trip dump:       {fastest(lambda: rt.dump(data, io.StringIO()), args.repeat):6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
