"""What the end-to-end tests share: a temporary copy of the project as its own git + DVC
repository, random tiny models of the supported families saved as a lab would bring them, and
running git / dvc in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from tiny_models import FACTORIES, add_words  # noqa: E402


def benchmark_words(synthetic: dict, scratch: Path) -> list[str]:
    """Every word of the prompts, references and candidates of the synthetic benchmark that the
    params describe (built here once, as the benchmark stage will build it)."""
    from tokenizers.pre_tokenizers import Whitespace

    from pipeline.tasks.benchmark import BenchmarkSpec, build_benchmark
    from pipeline.tasks.items import RETRIEVAL_NO, RETRIEVAL_YES, read_annotations
    from stages.params import SyntheticBenchmarkConfig

    build_benchmark(BenchmarkSpec(**SyntheticBenchmarkConfig(**synthetic).model_dump()), scratch)
    texts = {RETRIEVAL_YES, RETRIEVAL_NO}
    for rec in read_annotations(scratch / "annotations.parquet").itertuples():
        texts.update([rec.prompt, *rec.references, *rec.candidates])
    return sorted({w for t in texts for w, _ in Whitespace().pre_tokenize_str(t)})


def save_model(folder: Path, family: str, seed: int, words: list[str]) -> None:
    """The random tiny model of ``family`` with its real processor, its tokenizer taught
    ``words``, as ``save_pretrained`` writes them."""
    model, processor = FACTORIES[family](seed=seed)
    add_words(model, processor, words)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def brought_entry(folder: Path, dtype: str) -> dict:
    """The README's snippet for a model you bring (params_pretrained.yaml) for ``folder`` in ``dtype``
    (its device ``auto``: the CPU here)."""
    snippet = yaml.safe_load((Path(__file__).parent / "params_pretrained.yaml").read_text())
    return {**snippet["models"]["my-vlm"], "path": str(folder), "dtype": dtype}


def _env(repo: Path) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        "HONES_PARAMS_AUDIT": str(repo.parent / f"{repo.name}-audit"),
    }


def run(repo: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=repo, env=_env(repo), capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run(repo, str(Path(sys.executable).parent / "dvc"), *args)


def ran_stages(proc: subprocess.CompletedProcess) -> set[str]:
    return {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}


def new_repo(repo: Path, params: dict) -> Path:
    """``repo`` (an empty folder) made a git + DVC repository holding the project's code, graph
    and ``data/inputs``, with ``params`` as its params.yaml."""
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "inputs", repo / "data" / "inputs")
    # The report depends on this folder, which only its README holds when no set is brought.
    (repo / "data" / "transfer_ood").mkdir()
    shutil.copy(ROOT / "data" / "transfer_ood" / "README.md", repo / "data" / "transfer_ood")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("__pycache__/\n")
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "e2e@example.invalid")
    run(repo, "git", "config", "user.name", "e2e")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    dvc(repo, "config", "core.check_update", "false")
    return repo
