"""DVC's own time per stage it runs: reading and rewriting ``dvc.lock``.

    python benchmarks/bench_dvc_lock.py [--lock dvc.lock] [--repeat 3] [--merge-tasks heads dump ablation]

``dvc repro`` reads the lock file with ruamel.yaml's safe loader several times per stage, and
after each stage rewrites it: a round-trip parse (comments kept) and a dump of the whole file.
This times each of those on ``--lock`` (the repository's, by default): the safe load with the C
parser (ruamel.yaml.clib, a dependency of this project) and with the pure-Python one, and the
round-trip parse and dump, which have no C implementation. Fastest of --repeat. Not run by CI.

``--merge-tasks KIND ...``: time instead the lock the graph would have with those stage kinds run
once per model over every task (``heads@<model>-<task>`` entries merged into ``heads@<model>``:
their dependencies joined, their outputs listed together), and print the lock rewrites of a
whole run (the round trip times the stage count) for both.
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


def merged_per_model(stages: dict, kinds: list[str]) -> dict:
    """``stages`` (a lock's) with the ``kinds``' per-task entries merged into one per model."""
    out: dict = {}
    for name, entry in stages.items():
        kind, _, rest = name.partition("@")
        if kind not in kinds:
            out[name] = entry
            continue
        merged = out.setdefault(f"{kind}@{rest.rsplit('-', 1)[0]}", {**entry, "deps": [], "outs": []})
        paths = {d["path"] for d in merged["deps"]}
        merged["deps"] += [d for d in entry.get("deps", []) if d["path"] not in paths]
        merged["outs"] += entry.get("outs", [])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lock", type=Path, default=Path("dvc.lock"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--merge-tasks", nargs="+", default=None, metavar="KIND")
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
    if args.merge_tasks:
        merged = {"schema": "2.0", "stages": merged_per_model(YAML(typ="safe").load(text)["stages"], args.merge_tasks)}
        buf = io.StringIO()
        rt.dump(merged, buf)
        docs = {"as it is": (text, stages), "merged per model": (buf.getvalue(), len(merged["stages"]))}
        for label, (doc, n) in docs.items():
            once = fastest(lambda d=doc: rt.dump(rt.load(d), io.StringIO()), args.repeat)
            print(
                f"{label}: {n} stages, {doc.count(chr(10)):,} lines, round trip {once:.2f} s, "
                f"x {n} stages = {once * n / 60:.1f} min of lock rewrites per run"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
