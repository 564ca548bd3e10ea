"""Sharing activation stores through a DVC remote: a local directory, and S3 (a moto server on
127.0.0.1 with fake credentials).

In a throw-away git + DVC repository, a stage builds a small Zarr store with ``pipeline.method.store``
and a second store is ``dvc add``-ed; ``dvc push --run-cache`` sends both to the remote. Then
- a clone + ``dvc pull`` gets every file bitwise (md5 of each), ``dvc status`` is clean and
  ``dvc repro`` reruns nothing;
- a second clone + ``dvc repro --pull --allow-missing`` reruns nothing and downloads nothing;
  with its dvc.lock removed, ``dvc repro --pull`` restores the stage's output from the pushed
  run-cache without running the command, and writes back the same dvc.lock.
DVC runs in-process (``dvc.cli.main``) to spare a Python start-up per command.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import item_arrays_like

from pipeline.method.store import ActivationStore, StoreLayout

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MAKE_STORE = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import numpy as np
from pipeline.method.store import ActivationStore, StoreLayout
sys.path.insert(0, {repo!r} + "/tests")
from conftest import item_arrays_like

with open("ran.log", "a") as fh:  # untracked: shows whether the command ran in this checkout
    fh.write("ran\\n")
lay = StoreLayout.plan(3, 23, 2, 16, "float16", target_chunk_bytes=2 * 2 * 16 * 2, max_files=12)
assert lay.sharded
rng = np.random.default_rng(0)
conds = [(-1, -1, float("nan")), (0, 1, 0.5), (1, 0, 0.25)]
s = ActivationStore.create_or_resume(Path("store.zarr"), lay, conds, [f"i{{k}}" for k in range(23)], [[1, 2]] * 23,
                                     [[1.0, 0.5]] * 23, {{"model": "tiny"}}, "stagehash")
for k in s.pending_blocks():
    sl = lay.block(k)
    s.write_block(k, rng.normal(size=(3, sl.stop - sl.start, 2, 16)),
                  item_arrays_like(rng.normal(size=(sl.stop - sl.start, 2, 16))))
s.finalize()
"""


def file_md5s(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def git(cwd: Path, *args: str) -> str:
    cmd = [
        "git",
        "-c",
        "user.name=test",
        "-c",
        "user.email=test@example.invalid",
        "-c",
        "init.defaultBranch=main",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def dvc(cwd: Path, *args: str) -> None:
    import os

    from dvc.cli import main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        rc = main(list(args))
    finally:
        os.chdir(old)
    assert rc == 0, f"dvc {' '.join(args)} failed in {cwd}"


def dvc_status(repo: Path, **kw) -> dict:
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        return r.status(**kw)


def _added_store(path: Path) -> None:
    """A store made outside any stage (e.g. a dump run on a cluster), tracked with ``dvc add``."""
    lay = StoreLayout.plan(2, 7, 2, 8, "float32", target_chunk_bytes=2 * 8 * 4 * 3)
    s = ActivationStore.create_or_resume(
        path,
        lay,
        [(-1, -1, float("nan")), (1, 1, 0.1)],
        [f"a{k}" for k in range(7)],
        [[4]] * 7,
        [[1.0]] * 7,
        {"model": "x"},
        "addhash",
    )
    rng = np.random.default_rng(1)
    for k in s.pending_blocks():
        n = lay.block(k).stop - lay.block(k).start
        s.write_block(k, rng.normal(size=(2, n, 2, 8)), item_arrays_like(rng.normal(size=(n, 2, 8))))
    s.finalize()


@pytest.fixture
def s3_remote(monkeypatch):
    """A moto S3 server on a free loopback port with bucket 'lab'; fake credentials in the env."""
    pytest.importorskip("dvc_s3")
    boto3 = pytest.importorskip("boto3")
    ThreadedMotoServer = pytest.importorskip("moto.server").ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
        "NO_PROXY": "127.0.0.1",
    }.items():
        monkeypatch.setenv(k, v)
    for k in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
    ):
        monkeypatch.delenv(k, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lab")
        yield "s3://lab/hones", endpoint
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_push_clone_pull_and_run_cache(kind, tmp_path, monkeypatch, request):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "site-cache"))
    if kind == "s3":
        url, endpoint = request.getfixturevalue("s3_remote")
    else:
        url, endpoint = str(tmp_path / "remote"), None

    origin = tmp_path / "origin"
    origin.mkdir()
    git(origin, "init", "-q")
    dvc(origin, "init", "-q")
    dvc(origin, "config", "core.analytics", "false")
    dvc(origin, "config", "core.check_update", "false")
    dvc(origin, "remote", "add", "-d", "lab", url)
    if endpoint:
        dvc(origin, "remote", "modify", "lab", "endpointurl", endpoint)
    repo_root = str(Path(__file__).resolve().parent.parent)
    (origin / "make_store.py").write_text(MAKE_STORE.format(repo=repo_root))
    (origin / "dvc.yaml").write_text(
        f"stages:\n  build:\n    cmd: {sys.executable} make_store.py\n"
        "    deps: [make_store.py]\n    outs: [store.zarr]\n"
    )
    (origin / ".gitignore").write_text("ran.log\n")
    dvc(origin, "repro")
    _added_store(origin / "added.zarr")
    dvc(origin, "add", "added.zarr")
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "stores")
    dvc(origin, "push", "--run-cache")
    assert dvc_status(origin, cloud=True) == {}  # the remote holds every tracked object
    want = {name: file_md5s(origin / name) for name in ("store.zarr", "added.zarr")}
    assert len(want["store.zarr"]) > 10 and any("c/" in f for f in want["store.zarr"])

    # A colleague: clone + pull -> the same bytes, nothing to rerun.
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    assert not (clone / "store.zarr").exists()
    dvc(clone, "pull")
    assert {name: file_md5s(clone / name) for name in want} == want
    assert dvc_status(clone) == {}
    dvc(clone, "repro")
    assert not (clone / "ran.log").exists()
    a, b = ActivationStore.open(clone / "store.zarr"), ActivationStore.open(origin / "store.zarr")
    assert a.layout == b.layout and a.layout.sharded
    assert np.asarray(a.group["z"][...]).tobytes() == np.asarray(b.group["z"][...]).tobytes()

    # Another colleague checks that nothing would rerun, downloading nothing ...
    clone2 = tmp_path / "clone2"
    git(tmp_path, "clone", "-q", str(origin), str(clone2))
    dvc(clone2, "repro", "--pull", "--allow-missing")
    assert not (clone2 / "ran.log").exists() and not (clone2 / "store.zarr").exists()
    # ... and without the lock file, the run-cache pushed with --run-cache restores the output unrun.
    (clone2 / "dvc.lock").unlink()
    dvc(clone2, "repro", "--pull")
    assert not (clone2 / "ran.log").exists()
    assert file_md5s(clone2 / "store.zarr") == want["store.zarr"]
    assert git(clone2, "status", "--porcelain") == ""  # the regenerated dvc.lock is the committed one
    assert "build" not in dvc_status(clone2)
