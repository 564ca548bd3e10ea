"""The stages' kernels run the AVX2 code paths on any x86-64-v3 CPU (``stages/__init__.py``), so
an AVX-512 machine and an AVX2-only one compute the same bits.

``test_pinned_training_gives_the_recorded_weights`` is the cross-machine check: a short training
of the tiny fixture model in a stage's environment must give the weights recorded below, whatever
the CPU. CI runs on machines of either kind; a mismatch on one of them means the pin no longer
covers some kernel (or the trainer, the fixture benchmark, torch or transformers changed: then
re-record the hash, after checking the new one is the same on an AVX2-only and an AVX-512 CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import stages

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
HAS_AVX2 = "avx2" in stages.cpu_flags()
HAS_AVX512 = "avx512f" in stages.cpu_flags()
KEYS = (*stages.CPU_ISA_PIN, "HONES_CPU_ISA")

# sha256[:16] of model.safetensors after _CHILD's training under the pin (torch 2.14.1,
# transformers as constraints.txt pins them); recorded on an AVX-512 CPU.
PINNED_WEIGHTS = "6fd694157f1b70cd"

_CHILD = """
import hashlib, sys
sys.path.insert(0, {tests!r})
if {pinned!r}:
    import stages  # noqa: F401  (sets the pin before torch is imported)
import torch
torch.set_num_threads(1)
from dataclasses import replace
from pathlib import Path
from conftest import tiny_model_spec
from pipeline.model.default import train_default_model
spec = replace(tiny_model_spec(), steps=3, batch_size=4, vision_warmup_steps=2, warmup_steps=1)
out = Path({out!r})
train_default_model(spec, Path({bench!r}), out, name="m")
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()[:16])
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**env, **extra}


def _train(benchmark_dir: Path, out: Path, *, pinned: bool) -> list[str]:
    script = _CHILD.format(tests=str(TESTS), bench=str(benchmark_dir), out=str(out), pinned=pinned)
    done = subprocess.run(
        [sys.executable, "-c", script], env=_clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_pin_sets_what_is_unset_and_keeps_what_the_user_set() -> None:
    env = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    added = stages.pin_cpu_isa(env, flags={"avx2", "fma"})
    assert env["HONES_CPU_ISA"] == "avx2" and env["ATEN_CPU_CAPABILITY"] == "avx2" and env["MKL_CBWR"] == "AVX2"
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE" and "ONEDNN_MAX_CPU_ISA" not in added


def test_native_and_cpus_without_avx2_are_left_alone() -> None:
    env = {"HONES_CPU_ISA": "native"}
    assert stages.pin_cpu_isa(env, flags={"avx2"}) == {} and env == {"HONES_CPU_ISA": "native"}
    env = {}
    assert stages.pin_cpu_isa(env, flags={"sse4_2"}) == {} and env == {"HONES_CPU_ISA": "native"}


def test_an_unknown_setting_stops_with_its_name() -> None:
    with pytest.raises(SystemExit, match="HONES_CPU_ISA='avx512'"):
        stages.pin_cpu_isa({"HONES_CPU_ISA": "avx512"}, flags={"avx2"})


@pytest.mark.slow
@pytest.mark.skipif(not HAS_AVX2, reason="the pin applies to x86-64 CPUs with AVX2")
def test_a_stage_process_runs_the_avx2_kernels() -> None:
    probe = "import stages, torch, os; print(torch.backends.cpu.get_cpu_capability(), os.environ['HONES_CPU_ISA'])"

    def run(**env: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", probe], env=_clean_env(**env), cwd=ROOT, capture_output=True, text=True, check=True
        )
        return done.stdout.split()

    assert run() == ["AVX2", "avx2"]
    assert run(HONES_CPU_ISA="native") == ["AVX512" if HAS_AVX512 else "AVX2", "native"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_AVX2, reason="the pin applies to x86-64 CPUs with AVX2")
def test_pinned_training_gives_the_recorded_weights(benchmark_dir, tmp_path) -> None:
    capability, digest = _train(benchmark_dir, tmp_path / "pinned", pinned=True)
    assert capability == "AVX2"
    assert digest == PINNED_WEIGHTS, (
        f"pinned training gave weights {digest}, recorded {PINNED_WEIGHTS} (CPU flags avx512f: {HAS_AVX512}); "
        "see this module's docstring"
    )


@pytest.mark.skipif(not HAS_AVX512, reason="shows the pin matters, which needs an AVX-512 CPU")
def test_without_the_pin_an_avx512_cpu_trains_other_weights(benchmark_dir, tmp_path) -> None:
    """The recorded weights are not what any CPU computes anyway: without the pin, AVX-512 kernels
    round differently (the reason the pin exists, and proof the training above exercises them)."""
    pinned = _train(benchmark_dir, tmp_path / "pinned", pinned=True)
    native = _train(benchmark_dir, tmp_path / "native", pinned=False)
    assert native[0] == "AVX512" and native[1] != pinned[1]
