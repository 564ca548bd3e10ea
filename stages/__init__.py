"""The DVC stages: one thin entry point per stage (``python -m stages.<name>``).

Imported before any stage module, hence before torch: the one place to set how the OpenMP
runtime behind torch waits. Its threads spin for a while before sleeping; on a machine whose
cores other jobs share, a spinning thread holds the core its partner is waiting for
(``benchmarks/bench_shared_cpu.py``: 2 threads beside 4 busy processes on 2 cores trained at
0.66-1.0 steps/s against 12-14 alone). A short spin keeps nearly the speed alone and a slowdown
under load close to the CPU share the stage gets. The wait policy never changes a result's
bits. A value the user set is kept.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000")
