"""Interleaved wall-clock timing: median and interquartile range of repeated calls.

Why interleaved: on a shared, noisy machine the load drifts over minutes; running the
candidates in turns (A B B A A B ...) spreads that drift over all of them instead of charging
it to whichever ran last.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["Timing", "interleaved"]


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of each timed call (warm-up excluded)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def iqr(self) -> float:
        q1, q3 = np.percentile(self.samples, [25, 75])
        return float(q3 - q1)

    def to_dict(self) -> dict:
        return {
            "median_ms": self.median * 1e3,
            "iqr_ms": self.iqr * 1e3,
            "min_ms": min(self.samples) * 1e3,
            "repeats": len(self.samples),
            "samples_ms": [round(s * 1e3, 3) for s in self.samples],
        }


def interleaved(
    calls: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    pause: float = 0.0,
) -> dict[str, Timing]:
    """Run each call `warmup` times, then `repeats` rounds, reversing the order every round.

    `clock` is wall time by default; ``time.thread_time`` measures the CPU time of the
    calling thread instead, which other jobs on the machine cannot inflate (meaningful only
    when the work runs on that thread, e.g. ORT with ``intra_op_num_threads = 1``).
    `pause` seconds of sleep before each timed call let the previous session's thread pool
    stop spinning: each ORT session has its own pool, and on a 2-core machine a pool still
    spinning after its call steals a core from the next session's call.
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            if pause:
                time.sleep(pause)
            start = clock()
            calls[name]()
            samples[name].append(clock() - start)
    return {name: Timing(tuple(values)) for name, values in samples.items()}
