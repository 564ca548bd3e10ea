"""The documentation points at things that exist: links, cited sections, profiles and the
parameters its commands set. (Its set-up and pipeline commands run in the end-to-end tests.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from stages.profile import set_param_arguments

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "data/inputs/README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_CITED_SECTION = re.compile(r"docs/method\.md(?:\s+|\n#\s*)sections?\s+(\d+)(?:-(\d+))?")


def _bash_lines(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    broken = [
        target
        for target in _LINK.findall(doc.read_text())
        if not re.match(r"[a-z]+://|#|mailto:", target) and not (doc.parent / target.split("#")[0]).exists()
    ]
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


def test_every_cited_method_section_exists() -> None:
    """Code cites docs/method.md by section number: each number is a heading of that file."""
    headings = {int(n) for n in re.findall(r"^## (\d+)\. ", (ROOT / "docs/method.md").read_text(), re.M)}
    assert headings == set(range(1, 9))
    cited = {}
    for path in [
        *(ROOT / "pipeline").rglob("*.py"),
        *(ROOT / "stages").rglob("*.py"),
        *(ROOT / "tests").rglob("*.py"),
        ROOT / "params.yaml",
    ]:
        for first, last in _CITED_SECTION.findall(path.read_text()):
            for n in range(int(first), int(last or first) + 1):
                cited.setdefault(n, path.relative_to(ROOT))
    assert cited, "no citation found: the pattern is stale"
    missing = {n: str(p) for n, p in cited.items() if n not in headings}
    assert not missing, f"cited sections that docs/method.md lacks: {missing}"


def test_no_file_cites_the_specification_outside_the_repository() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in [
            *ROOT.glob("*.md"),
            *ROOT.glob("*.yaml"),
            *(ROOT / "docs").glob("*.md"),
            *(ROOT / "pipeline").rglob("*.py"),
            *(ROOT / "stages").rglob("*.py"),
        ]
        if "HONES.md" in p.read_text()
    ]
    assert not offenders


def test_readme_profiles_and_sweeps_are_valid(tmp_path: Path) -> None:
    """Each `./run.sh profile NAME` names a profile that passes its check, and each
    `dvc exp run -S key=value` sets a key params.yaml has, to a value the schema accepts."""
    lines = _bash_lines((ROOT / "README.md").read_text())
    profiles = [m.group(1) for line in lines if (m := re.match(r"\./run\.sh profile (\w+)$", line))]
    sweeps = [kv for line in lines for kv in re.findall(r"-S\s+(\S+=\S+)", line)]
    assert profiles and sweeps, "the README's commands changed shape: update this test"
    for name in profiles:
        assert set_param_arguments(ROOT / "profiles" / f"{name}.yaml", ROOT / "params.yaml")
    for kv in sweeps:
        key, value = kv.split("=", 1)
        profile: dict = {}
        node = profile
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(profile))
        assert set_param_arguments(path, ROOT / "params.yaml") == [f"--set-param={key}={value}"]
