"""Shared helpers of the model benchmarks: polite skipping, loading, Markdown tables."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def require(model: Path, benchmark: Path) -> bool:
    """True if both folders exist; otherwise say how to make them and return False."""
    missing = [str(p) for p, f in ((model, "config.json"), (benchmark, "annotations.parquet")) if not (p / f).is_file()]
    if missing:
        print(f"skipped: {', '.join(missing)} not found. Build them with `dvc repro train_default_model` "
              "(or pass --model / --benchmark).")
        return False
    return True


def table(head: tuple[str, ...], rows: list[tuple]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
