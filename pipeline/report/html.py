"""One self-contained HTML report (no network needed): tables as HTML, figures inlined as PNG data URIs.

Map of this module:
- ``Section``: a title, one line saying what it shows, and a table (DataFrame) and/or PNG files.
- ``build_report(title, intro, sections, path)``: writes the page (atomically, ``pipeline.io.atomic_file``).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.io import atomic_file

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
p.what { color: #555; margin: 0.3em 0 0.8em; }
table { border-collapse: collapse; font-size: 0.85em; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } img { max-width: 100%; border: 1px solid #eee; }
.missing { color: #a00; }
"""


@dataclass
class Section:
    """One part of the report: ``table`` rendered as HTML, ``images`` inlined (missing ones flagged)."""

    title: str
    what: str
    table: pd.DataFrame | None = None
    images: list[Path] = field(default_factory=list)


def _img(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        return f'<p class="missing">missing figure: {html.escape(str(path))}</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def build_report(title: str, intro: str, sections: list[Section], path: Path) -> None:
    """Write the report to ``path`` (atomically)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>",
    ]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2><p class='what'>{html.escape(s.what)}</p>")
        if s.table is not None:
            parts.append(s.table.to_html(float_format=lambda v: f"{v:.4g}", na_rep="-", border=0))
        parts.extend(_img(p) for p in s.images)
    parts.append("</body></html>")
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(parts))
