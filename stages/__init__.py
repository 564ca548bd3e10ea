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
"""

import os
import time

SHORT_SPIN = "1000"


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
