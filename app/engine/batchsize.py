"""The batch size a model runs fastest at on this worker, measured at warm-up
(``IMGCLS_MAX_BATCH_SIZE=auto``).

The best size depends on the model, the device and the CPU (a 2-core AMD EPYC without AMX runs
resnet50 fastest at batch 4 to 16 by run and build, not at the old default of 32), so it is
measured, not configured.
Powers of two from 1 up to a cap are timed; the search stops once throughput falls below the
best so far, or when the time budget is spent. A larger size must beat a smaller one by
``MIN_GAIN`` to be chosen: within noise, the smaller batch wins (lower latency, same throughput).
The first pass at each size is not timed and does not count against the budget: on the CPU it
compiles that size's graph (worker.Bucketed), and no size beyond the first one past the peak
is compiled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

MIN_GAIN = 1.03
ROUND_S = 0.3  # time each size for at least this long (and at least two passes)
BUDGET_S = 4.0  # per model


@dataclass
class Measured:
    best: int
    images_per_s: dict[int, float] = field(default_factory=dict)


def candidates(cap: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 <= cap:
        sizes.append(sizes[-1] * 2)
    return sizes


def pick(
    run: Callable[[int], object],
    cap: int,
    budget_s: float = BUDGET_S,
    round_s: float = ROUND_S,
    clock: Callable[[], float] = time.perf_counter,
) -> Measured:
    """Time ``run(batch_size)`` for 1, 2, 4, ... up to ``cap``; the fastest in images/s."""
    deadline = clock() + budget_s
    result = Measured(best=1)
    best_rate = 0.0
    for size in candidates(cap):
        first = clock()
        run(size)  # the first pass at a new size allocates, picks kernels, may compile a graph:
        deadline += clock() - first  # not counted against the budget
        start = clock()
        passes = 0
        while passes < 2 or clock() - start < round_s:
            run(size)
            passes += 1
        rate = size * passes / max(clock() - start, 1e-9)
        result.images_per_s[size] = round(rate, 2)
        if rate > best_rate * MIN_GAIN:
            result.best, best_rate = size, rate
        elif rate < best_rate:
            break  # past the peak
        if clock() > deadline:
            break
    return result
