"""Wall-clock timing: a warm-up call, then as many timed calls as fit a budget.

Slow cases get fewer runs, and a case whose first call alone exceeds the
budget is reported from that one call; the record says which, so a table never
passes one cold run off as a median of many.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    runs: int             # timed calls behind median/min/max
    warmup: bool          # False: the only call was the first one (it took longer than the budget)
    first_s: float        # the first (warm-up) call
    sys_share: float      # share of the timed calls' CPU time spent in the kernel (page faults of fresh memory)

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def note(self) -> str:
        if not self.warmup:
            return f"1 run, no warm-up (one call takes {self.first_s:.0f} s)"
        return f"warm-up + {self.runs} run{'s' if self.runs > 1 else ''}"


# A call shorter than this (a decode step at B = 1: ~0.1 ms) is timed up to MANY_RUNS times: the
# median of a handful of such calls moves with every interrupt and cache miss around them.
SHORT_S, MANY_RUNS = 1e-3, 500


def measure(fn, budget_s: float, max_runs: int) -> tuple[Timing, object]:
    """Time `fn()`; returns the timing and the first call's result."""
    cpu_before = os.times()
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    if first > budget_s:
        return Timing(first, first, first, 1, False, first, _sys_share(cpu_before)), result
    times = []
    cpu_before = os.times()
    if first < 100 * SHORT_S:      # a first call may start threads (ggml's): a second says how short a call is
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    typical = min([first] + times)
    runs = max(1, min(MANY_RUNS if typical < SHORT_S else max_runs, int(budget_s / max(typical, 1e-9)))) - len(times)
    for _ in range(max(runs, 0)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), len(times), True, first, _sys_share(cpu_before)), result


def _sys_share(before) -> float:
    after = os.times()
    user, system = after.user - before.user, after.system - before.system
    return system / (user + system) if user + system > 0 else 0.0
