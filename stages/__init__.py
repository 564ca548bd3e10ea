"""The DVC stages: one thin entry point per stage (``python -m stages.<name>``).

Imported before any stage module, hence before torch: the one place to set how the OpenMP
runtime behind torch waits. Its threads spin for a while before they sleep. On a machine whose
cores other jobs share, a spinning thread holds the core its partner is waiting for, and a
stage slows far beyond its share of the CPU; alone, the spinning is what makes it fast
(``docs/scale.md``, "Shared machines": 2 threads beside 4 busy processes on 2 cores trained
at 0.66-1.0 steps/s against 12-15 alone; a short spin, 2.4-2.6 loaded but 20-40% slower
alone). So when other processes are running as the stage starts, its threads spin briefly
(``GOMP_SPINCOUNT=1000``); on an idle machine OpenMP keeps its default. The wait policy
never changes a result's bits. A ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` the user set is
kept, and worker processes inherit the parent's choice (``HONES_CPU_SHARED``).

It is also where the kernels' instruction set is pinned. torch, oneDNN and numpy pick their
kernels by the CPU they run on, and an AVX-512 kernel rounds differently from an AVX2 one: the
same training on two machines of the same kind gave other weights and other verdicts
(``docs/reproducibility.md``). So on an x86-64 CPU with AVX2, every stage runs the AVX2 kernels
(``CPU_ISA_PIN``): AVX2-only and AVX-512 machines then compute the same bits, at a cost in speed
that ``benchmarks/bench_cpu_isa.py`` measures (none we could see on the default models).
``HONES_CPU_ISA=native`` lets each library choose by the CPU (results then follow the machine);
a variable of the pin the user set is kept. Worker processes inherit the environment.
"""

import os
import time

SHORT_SPIN = "1000"

# The AVX2 code paths of every library behind the stages' floating point: ATen's vectorised
# kernels (SLEEF math included), oneDNN's (convolutions, matmuls), MKL's conditional numerical
# reproducibility branch, and numpy's dispatched loops above x86-64-v3.
CPU_ISA_PIN = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``), empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def pin_cpu_isa(environ: dict = os.environ, flags: set[str] | None = None) -> dict[str, str]:
    """Set ``CPU_ISA_PIN`` in ``environ`` (keeping any variable already set) unless
    ``HONES_CPU_ISA=native`` or the CPU lacks AVX2 (not x86-64-v3: nothing to pin to).
    Returns what it set; records the outcome in ``HONES_CPU_ISA`` (``avx2`` or ``native``)."""
    if environ.get("HONES_CPU_ISA", "avx2") == "native":
        environ["HONES_CPU_ISA"] = "native"
        return {}
    if "avx2" not in (cpu_flags() if flags is None else flags):
        environ["HONES_CPU_ISA"] = "native"
        return {}
    if environ.get("HONES_CPU_ISA") not in (None, "avx2"):
        raise SystemExit(f"HONES_CPU_ISA={environ['HONES_CPU_ISA']!r}: use avx2 (the default) or native")
    environ["HONES_CPU_ISA"] = "avx2"
    added = {k: v for k, v in CPU_ISA_PIN.items() if k not in environ}
    environ.update(added)
    return added


def _others_running(samples: int = 5, interval_s: float = 0.02) -> int:
    """Median number of runnable tasks besides this process (``procs_running`` of /proc/stat,
    which counts this one), over ``samples`` readings; 0 where /proc cannot tell."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/stat") as f:
                counts.append(next(int(line.split()[1]) for line in f if line.startswith("procs_running")))
        except (OSError, StopIteration, ValueError):
            return 0
        time.sleep(interval_s)
    return max(0, sorted(counts)[len(counts) // 2] - 1)


if not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "HONES_CPU_SHARED"} & set(os.environ):
    shared = _others_running() >= 1
    os.environ["HONES_CPU_SHARED"] = "1" if shared else "0"
    if shared:
        os.environ["GOMP_SPINCOUNT"] = SHORT_SPIN

pin_cpu_isa()
