"""Offsets for blocks with known lifetimes in one arena (offline dynamic storage allocation).

Every block has a size and an inclusive lifetime [start, end] in program
positions; two blocks whose lifetimes intersect must get disjoint byte ranges.
Finding the smallest arena is NP-hard, so two greedy orders are tried and the
smaller arena wins:

- by size: largest block first (ties: earlier start). Large blocks placed
  early leave gaps the many small ones fill (TFLite's "greedy by size").
- by time: in order of start (ties: larger first), as an allocator that
  sees requests in program order would, but with all lifetimes known.

Placement is best-fit in both: among the blocks already placed whose lifetimes
intersect the new one, the free gaps between their byte ranges are the
candidates; the smallest gap that holds the block wins (lowest offset on a
tie), and without one the block goes on top of the highest of them. Offsets
are multiples of ALIGN (every block is padded to ALIGN while placing, so BLAS
and SIMD kernels see aligned data); the arena's size is the highest end of a
block's unpadded bytes.

The lower bound no allocator can beat: the most bytes live at one position.
"""
from __future__ import annotations

import numpy as np

ALIGN = 64


def padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def lower_bound(blocks) -> int:
    """Largest total of bytes of blocks live at the same position (`blocks`: objects with
    nbytes, start, end)."""
    events = []
    for b in blocks:
        if b.nbytes:
            events.append((b.start, 0, b.nbytes))       # at a position: allocate before freeing
            events.append((b.end, 1, -b.nbytes))
    live = best = 0
    for _, _, delta in sorted(events):
        live += delta
        best = max(best, live)
    return best


def assign_offsets(blocks) -> int:
    """Set `offset` on every block (objects with nbytes, start, end, offset); return the arena size."""
    sized = [b for b in blocks if b.nbytes]
    for b in blocks:
        b.offset = 0
    if not sized:
        return 0
    orders = (sorted(sized, key=lambda b: (-b.nbytes, b.start, b.end)),
              sorted(sized, key=lambda b: (b.start, -b.nbytes, b.end)))
    best = None
    for order in orders:
        offsets = _place(order)
        size = max(offsets[id(b)] + b.nbytes for b in sized)
        if best is None or size < best[0]:
            best = (size, offsets)
    for b in sized:
        b.offset = best[1][id(b)]
    return best[0]


def _place(order) -> dict[int, int]:
    n = len(order)
    starts = np.array([b.start for b in order])
    ends = np.array([b.end for b in order])
    lows = np.zeros(n, dtype=np.int64)
    highs = np.zeros(n, dtype=np.int64)
    offsets: dict[int, int] = {}
    for k, b in enumerate(order):
        size = padded(b.nbytes)
        live = (starts[:k] <= b.end) & (b.start <= ends[:k])
        busy = sorted(zip(lows[:k][live].tolist(), highs[:k][live].tolist()))
        best_gap, offset, top = None, None, 0
        for lo, hi in busy:
            if lo - top >= size and (best_gap is None or lo - top < best_gap):
                best_gap, offset = lo - top, top
            top = max(top, hi)
        offset = top if offset is None else offset
        offsets[id(b)] = offset
        lows[k], highs[k] = offset, offset + size
    return offsets
