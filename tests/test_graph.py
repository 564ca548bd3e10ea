"""The stage graph says exactly what each stage reads.

For every stage of ``dvc.yaml`` (matrix stages expanded, as DVC itself resolves them):
- its code deps equal the project files its stage script imports, transitively (read from the
  source with ``ast``, never executed): a missing one leaves stale results, an extra one
  reruns too much;
- its params equal the stage's declaration (``READS`` in the stage module, with the matrix
  names and ``{benchmark.source}``-style params values filled in).

``python tests/test_graph.py`` prints the expected code deps of each stage module, to paste
into dvc.yaml after an import changes.
"""

from __future__ import annotations

import ast
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.provenance import PROJECT_PACKAGES as PACKAGES  # noqa: E402, I001
from pipeline.provenance import imported_modules as _imported_modules, module_file, source_files  # noqa: E402


def import_closure(root: Path, module: str) -> set[str]:
    """The project files importing ``module`` executes (``pipeline.provenance.source_files``)."""
    return source_files(module, root)


def _reads(root: Path, module: str) -> tuple[str, ...]:
    """The stage module's ``READS`` declaration, read from its source."""
    path = module_file(root, module)
    assert path is not None, f"stage module {module} not found"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "READS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"{path} declares no READS")


def _argument(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def _fill(reads: tuple[str, ...], params: dict, names: dict[str, str]) -> set[str]:
    sys.path.insert(0, str(ROOT))
    from stages.params import declared_keys

    return set(declared_keys(reads, params, **names))


@dataclass
class StageCheck:
    name: str
    problems: list[str] = field(default_factory=list)


def check_graph(root: Path, stages: dict[str, dict], params: dict) -> list[str]:
    """Every mismatch between resolved stages and the code, one line each (empty when exact).

    ``stages``: name -> {"cmd": str, "deps": [paths], "params": [keys]}, as DVC resolves them.
    """
    problems: list[str] = []
    closures: dict[str, set[str]] = {}  # a matrix's stages share their module's closure
    for name, stage in sorted(stages.items()):
        argv = shlex.split(stage["cmd"])
        if argv[:2] != ["python", "-m"]:
            problems.append(f"{name}: cmd does not run a stage module: {stage['cmd']!r}")
            continue
        module = argv[2]
        code = {d for d in stage["deps"] if d.endswith(".py") or d.split("/")[0] in PACKAGES}
        if module not in closures:
            closures[module] = import_closure(root, module)
        expected = closures[module]
        problems += [f"{name}: missing code dep {d}" for d in sorted(expected - code)]
        problems += [f"{name}: extra code dep {d}" for d in sorted(code - expected)]
        flags = (("model", "--model"), ("task", "--task"), ("ood_benchmark", "--name"))
        names = {k: v for k, flag in flags if (v := _argument(argv, flag))}
        reads = _fill(_reads(root, module), params, names)
        declared = set(stage["params"])
        problems += [f"{name}: missing param {k}" for k in sorted(reads - declared)]
        problems += [f"{name}: extra param {k}" for k in sorted(declared - reads)]
    return problems


def _scratch_repo(root: Path, params: dict) -> Path:
    """``root`` made a DVC repository (no git) holding this project's dvc.yaml and ``params``."""
    from dvc.repo import Repo

    (root / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    Repo.init(str(root), no_scm=True).close()
    return root


def resolved_stages(root: Path) -> dict[str, dict]:
    """The stages as DVC resolves dvc.yaml (matrix expanded, ``${...}`` filled)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        out = {}
        for stage in repo.index.stages:
            deps, keys = [], []
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    keys.extend(dep.params)
                else:
                    deps.append(dep.def_path)
            out[stage.name] = {"cmd": stage.cmd, "deps": deps, "params": keys}
        return out


@pytest.fixture(scope="module")
def params() -> dict:
    """params.yaml with one model of each producer: tiny-llava trained here (profiles/train.yaml),
    tiny-idefics3 from its shipped weights, and a brought model resolved (not studied); and an
    out-of-distribution set, so that its import and transfer stages resolve."""
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    values["trained_models"], values["shipped_models"] = ["tiny-llava"], ["tiny-idefics3"]
    values["pretrained_models"] = ["brought"]
    values["models"]["brought"] = {"source": "pretrained", "path": "elsewhere/brought"}
    values["ood_benchmarks"] = {
        "gqa": {"format": "gqa", "records": "data/inputs/gqa/q.json", "images": "data/inputs/gqa/images"}
    }
    return values


@pytest.fixture(scope="module")
def stages(params, tmp_path_factory) -> dict[str, dict]:
    """The stages DVC resolves from dvc.yaml under ``params``, in a scratch DVC repository."""
    root = _scratch_repo(tmp_path_factory.mktemp("graph"), params)
    out = resolved_stages(root)
    assert {"train_default_model@tiny-llava", "ship_model@tiny-idefics3", "resolve_model@brought"} <= set(out)
    assert {"ood_benchmark@gqa", "transfer_ood@tiny-llava-gqa"} <= set(out)
    return out


@pytest.mark.slow
def test_graph_is_exact(stages, params) -> None:
    assert len(stages) > 10
    problems = check_graph(ROOT, stages, params)
    assert not problems, "dvc.yaml does not match the code:\n" + "\n".join(problems)


@pytest.mark.slow
def test_graph_check_names_each_broken_entry(stages, params) -> None:
    """The check is not vacuous: a dep lost, a dep gained, a param lost and one gained are each named."""
    broken = {k: {"cmd": v["cmd"], "deps": list(v["deps"]), "params": list(v["params"])} for k, v in stages.items()}
    broken["heads@tiny-llava-vqa"]["deps"].remove("pipeline/model/hooks/primitives.py")
    broken["masks@tiny-llava"]["deps"].append("pipeline/outcomes/steering.py")
    broken["dump@tiny-llava-ocr"]["params"].remove("heads.top_k")
    broken["train_default_model@tiny-llava"]["params"].append("runtime.max_new_tokens")
    problems = check_graph(ROOT, broken, params)
    assert sorted(problems) == sorted(
        [
            "heads@tiny-llava-vqa: missing code dep pipeline/model/hooks/primitives.py",
            "masks@tiny-llava: extra code dep pipeline/outcomes/steering.py",
            "dump@tiny-llava-ocr: missing param heads.top_k",
            "train_default_model@tiny-llava: extra param runtime.max_new_tokens",
        ]
    )


def test_closure_follows_lazy_and_from_imports(tmp_path) -> None:
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline" / "sub").mkdir(parents=True)
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "__init__.py").write_text('"""Only a docstring."""\n')
    (tmp_path / "pipeline" / "sub" / "__init__.py").write_text("X = 1\n")
    (tmp_path / "pipeline" / "sub" / "a.py").write_text("def f():\n    from pipeline.sub import b\n")
    (tmp_path / "pipeline" / "sub" / "b.py").write_text("import os\n")
    (tmp_path / "pipeline" / "unused.py").write_text("")
    (tmp_path / "stages" / "s.py").write_text("from pipeline.sub.a import f\n")
    assert import_closure(tmp_path, "stages.s") == {
        "stages/s.py",
        "pipeline/sub/__init__.py",
        "pipeline/sub/a.py",
        "pipeline/sub/b.py",
    }


def test_model_reads_only_its_own_entry(stages) -> None:
    """A model's stages declare its ``models.<m>`` entry, never another model's."""
    for name, stage in stages.items():
        if "@" not in name:
            continue
        for key in stage["params"]:
            if key.startswith("models."):
                assert key.split(".")[1] in name, f"{name} declares {key}"


def rewrite_code_deps(text: str, root: Path = ROOT) -> str:
    """``dvc.yaml`` text with each stage's code deps (the ``.py`` lines of its ``deps``) replaced
    by the import closure of its stage module, after its data deps; comments kept."""
    raw = yaml.safe_load(text)["stages"]
    lines = text.splitlines()
    out: list[str] = []
    stage = None
    in_deps = False
    item = ""  # the indentation of a deps entry: deeper under a foreach stage's ``do:``
    for line in lines:
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        if in_deps and not line.startswith(item):
            body = raw[stage].get("do", raw[stage])
            module = shlex.split(" ".join(str(body["cmd"]).split()))[2]
            out.extend(f"{item}{d}" for d in sorted(import_closure(root, module)))
            in_deps = False
        if line in ("    deps:", "      deps:"):
            in_deps, item = True, " " * (len(line) - len("deps:") + 2) + "- "
        if in_deps and line.startswith(item) and line.endswith(".py"):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        (ROOT / "dvc.yaml").write_text(rewrite_code_deps((ROOT / "dvc.yaml").read_text()))
    else:
        seen: dict[str, list[str]] = {}
        for name, stage in resolved_stages(ROOT).items():
            module = shlex.split(stage["cmd"])[2]
            if module not in seen:
                seen[module] = sorted(import_closure(ROOT, module))
                print(f"{module}:\n" + "\n".join(f"      - {d}" for d in seen[module]))


# Layers of the library, lowest first: a module imports only from its own layer or lower ones.
LAYERS = {
    "errors": 0,
    "io": 0,
    "provenance": 0,
    "timings": 0,
    "tasks": 1,
    "model": 2,
    "method": 3,
    "outcomes": 4,
    "report": 5,
    "tools": 6,
}


@pytest.mark.slow
def test_library_imports_flow_one_way() -> None:
    problems = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = path.relative_to(ROOT / "pipeline").with_suffix("")
        own = LAYERS.get(rel.parts[0]) if rel.parts[0] != "__init__" else 0
        assert own is not None, f"{path}: a module outside the known layers {sorted(LAYERS)}"
        for module in _imported_modules(path):
            parts = module.split(".")
            if parts[0] == "stages":
                problems.append(f"{path.relative_to(ROOT)} imports {module}: the library never imports stages")
            elif len(parts) > 1 and LAYERS.get(parts[1], -1) > own:
                problems.append(f"{path.relative_to(ROOT)} imports {module} from a higher layer")
    assert not problems, "\n".join(problems)


def test_dvc_reads_the_lock_with_the_c_parser() -> None:
    """DVC reads dvc.lock with ruamel.yaml's safe loader several times for every stage it runs;
    the pure-Python parser takes seconds per read on the default's lock (docs/benchmarks.md
    "DVC's own time"), so the install must bring the C one (ruamel.yaml.clib)."""
    from dvc.utils.serialize._yaml import parse_yaml
    from ruamel.yaml import YAML

    parser = YAML(typ="safe").Parser
    assert not parser.__module__.startswith("ruamel.yaml.parser"), f"pure-Python YAML parser: {parser}"
    text = "stages:\n  a:\n    cmd: echo\n    deps:\n    - path: x\n      md5: 0\n"
    assert parse_yaml(text, "dvc.lock") == yaml.safe_load(text)


@pytest.mark.slow
def test_the_committed_lock_holds_the_graphs_stages_and_no_others() -> None:
    """DVC never prunes the lock entry of a stage that dvc.yaml no longer has (renamed, or a
    matrix item whose model left the params); the committed lock holds the graph's stages only."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        graph = {stage.name for stage in repo.index.stages if stage.path_in_repo == "dvc.yaml"}
    lock = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    assert not lock - graph, f"dvc.lock holds stages dvc.yaml does not: {sorted(lock - graph)}"
    assert not graph - lock, f"stages never run into dvc.lock: {sorted(graph - lock)}"


def _cached_outputs(params: dict, root: Path) -> dict[str, str]:
    """{output path: stage} of every output DVC caches (``cache: false`` ones are git's) in the
    graph dvc.yaml resolves under ``params``, in a scratch DVC repository at ``root``."""
    from dvc.repo import Repo

    with Repo(str(_scratch_repo(root, params))) as repo:
        return {out.def_path: stage.name for stage in repo.index.stages for out in stage.outs if out.use_cache}


@pytest.mark.slow
@pytest.mark.parametrize(
    "profile", [None, *sorted((ROOT / "profiles").glob("*.yaml"))], ids=lambda p: getattr(p, "stem", "default")
)
def test_git_tracks_no_file_inside_an_output_dvc_caches(profile: Path | None, tmp_path: Path) -> None:
    """DVC refuses to run a stage whose cached output holds a file git tracks ("already tracked
    by SCM"): a .gitignore that DVC wrote for an output at a path that is now inside another
    (a per-task output become a per-model folder) stops a fresh clone's run at that stage."""
    import subprocess

    from stages.profile import _expand_same_as, merged

    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    if profile is not None:
        values = merged(values, _expand_same_as(yaml.safe_load(profile.read_text()), values))
    outputs = _cached_outputs(values, tmp_path)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    inside = sorted(
        (path, outputs[out])
        for path in tracked
        for out in outputs
        if path == out or path.startswith(out.rstrip("/") + "/")
    )
    assert not inside, f"git tracks files inside outputs DVC caches (file, stage): {inside}"
