"""The report's tables as Markdown (``reports/summary.md``): readable in a terminal, a diff and
on a forge, where the HTML report is not.

- ``markdown_table``: a DataFrame as a pipe table (index as the first column; floats to 3
  significant digits, missing values empty).
- ``markdown_document``: a title, an introduction and (heading, text, table) sections.
"""

from __future__ import annotations

import math

import pandas as pd


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, index: bool = True) -> str:
    """``frame`` as a Markdown pipe table; a MultiIndex is joined with " / "."""
    labels = [" / ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in frame.index]
    head = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label, (_, row) in zip(labels, frame.iterrows()):
        cells = ([label] if index else []) + [_cell(v) for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_document(title: str, intro: str, sections: list[tuple[str, str, pd.DataFrame | None]]) -> str:
    """A Markdown document: ``# title``, ``intro``, then per section ``## heading``, its text and
    its table (None: text only)."""
    parts = [f"# {title}", "", intro, ""]
    for heading, text, table in sections:
        parts += [f"## {heading}", "", text, ""]
        if table is not None and len(table):
            parts += [markdown_table(table), ""]
    return "\n".join(parts)
