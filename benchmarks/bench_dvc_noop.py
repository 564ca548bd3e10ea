"""Time of a no-op ``dvc repro`` (and ``dvc status``) in a tiny repository, by output file count.

    python benchmarks/bench_dvc_noop.py [--files 10 500 2000] [--repeat 3]

For each count, a throw-away git + DVC repo whose one stage writes a directory of that many
small files (a stand-in for a store's chunk files) is reproduced once; then ``dvc repro`` (which
has nothing to do) and ``dvc status`` are timed as a user runs them: a fresh ``dvc`` process
each time (Python start-up included). Median of --repeat runs. Not run by CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAKE = """
import os, sys
n = int(sys.argv[1])
os.makedirs("out", exist_ok=True)
for k in range(n):
    with open(f"out/{k:06d}", "wb") as fh:
        fh.write(k.to_bytes(8, "little") * 128)
"""


def run(cmd: list[str], cwd: Path, env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, nargs="+", default=[10, 500, 2000])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
    if dvc is None:
        print("dvc is not installed in this environment; skipping")
        return 0
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_dvc_") as tmp:
        env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(Path(tmp) / "site")}
        for n in args.files:
            repo = Path(tmp) / f"repo{n}"
            repo.mkdir()
            subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
            run([dvc, "init", "-q"], repo, env)
            run([dvc, "config", "core.analytics", "false"], repo, env)
            (repo / "make.py").write_text(MAKE)
            (repo / "dvc.yaml").write_text(
                f"stages:\n  make:\n    cmd: {sys.executable} make.py {n}\n    deps: [make.py]\n    outs: [out]\n"
            )
            first = run([dvc, "repro"], repo, env)
            subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
            subprocess.run([*git, "commit", "-qm", "x"], cwd=repo, check=True)
            noop = statistics.median(run([dvc, "repro"], repo, env) for _ in range(args.repeat))
            status = statistics.median(run([dvc, "status"], repo, env) for _ in range(args.repeat))
            rows.append((n, first, noop, status))
    start = run([sys.executable, "-c", "pass"], Path.cwd(), os.environ.copy())
    print(f"fresh process each time; bare Python start-up here: {start:.2f} s")
    print("| output files | first repro (s) | no-op repro (s) | status (s) |")
    print("|---|---|---|---|")
    for n, first, noop, status in rows:
        print(f"| {n} | {first:.2f} | {noop:.2f} | {status:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
