"""Progress bars for slow steps (TVM compiles, benchmarks, pass validation).

Bars go to stderr, vanish when done (so tables on stdout stay clean) and are
off when stderr is not a terminal (pipes, tests, CI logs).
"""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

from tqdm import tqdm


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "step"):
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False, disable=None,
                bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {elapsed}")


@contextmanager
def busy(desc: str):
    """A bar for one long call (a TVM compile): its clock ticks until the call returns."""
    with progress(total=1, desc=desc, unit="step") as bar:
        done = threading.Event()
        clock = threading.Thread(target=lambda: _tick(bar, done), daemon=True)
        clock.start()
        try:
            yield
        finally:
            done.set()
            clock.join()
            bar.update()


def _tick(bar, done: threading.Event):
    while not done.wait(0.5):
        bar.refresh()


def compile_for(graph, target: str):
    """Compile `graph` for llvm or vulkan ahead of its first run (cached by the backend),
    showing a bar; other targets compile (or not) when they run."""
    if target in ("llvm", "vulkan"):
        from dnir.lowering.registry import build     # the graph as the target's pipeline prepares it
        with busy(f"compiling for {target}"):
            build(graph, target)
