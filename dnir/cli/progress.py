"""Progress bars for slow steps (TVM compiles, benchmarks, pass validation).

Bars go to stderr, vanish when done (so tables on stdout stay clean) and are
off when stderr is not a terminal (pipes, tests, CI logs).
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "step"):
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False, disable=None,
                bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {elapsed}")
