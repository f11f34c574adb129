"""The loop over chunks (the fused op `chunk_scan`, dnir/fused.py) as one CPU kernel.

Lowered step by step (translate.Translator.scan), the loop over chunks is a VM
call and about ten kernels per chunk, each a parallel region of its own, and
each chunk's state, v_new and products go through memory. This kernel runs the
whole loop instead, per chunk n,

    v_new = u[n] - w[n] S
    o[n]  = q_decayed[n] S + aqk[n] v_new
    S     = S * last_decay[n] + k_to_end[n]^T v_new

with the heads (batch x value heads) parallel and each head's loop over chunks
serial: the head's state (K x V: 64 KiB at K = V = 128) lives in the kernel's
final-state output from the first chunk to the last, and its v_new (C x V) in
a buffer of the head's own, so both stay in the core's L2 cache for the whole
loop. Each of the three products is a register tile of ROWS rows x COLUMNS
value columns (the vector lanes: rows of S and v_new are contiguous along V),
accumulated over the product's inner axis with one broadcast scalar per row and
one vector load per column group; the tile's accumulators are a small stack
buffer that LLVM keeps in vector registers.
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from .fused_signatures import chunk_scan_function
from .kernels import unravel_index

ROWS, COLUMNS = 4, 32      # a register tile: 4 x 2 AVX-512 vectors of float32 accumulators


def _divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, limit + 1) if n % d == 0)


def rejects(node, target) -> str | None:
    """None when this kernel runs the chunk scan `node` on `target`, else why not."""
    dtype = node.inputs[0].dtype
    if target.dtypes is not None and dtype not in target.dtypes:
        return f"the kernel is written for {', '.join(sorted(target.dtypes))}, not {dtype}"
    return None


def chunk_scan_kernel(steps: int, batch: tuple, C: int, K: int, V: int, Kg: int, dtype: str):
    """The chunk scan's function (fused_signatures.chunk_scan_function) with this kernel's loop nest."""
    heads = math.prod(batch)

    def at(n, h, *rest):                               # element of chunk n, head h
        return (n,) + unravel_index(h, batch) + rest

    def state(h, *rest):
        return unravel_index(h, batch) + rest

    step = step_macro(C, K, V, Kg, dtype, at, at, state)

    @T.macro
    def body(S0, W, U, Qd, A, Kte, LD, S, O):
        for h in T.parallel(heads):
            vnew = T.alloc_buffer((C, V), dtype)
            for kk, j in T.grid(K, V):
                S[state(h, kk, j)] = S0[state(h, kk, j)]
            for n in range(steps):
                step(S, W, U, Qd, A, Kte, LD, O, vnew, n, h)
    return chunk_scan_function(steps, batch, C, K, V, Kg, dtype, body)


def step_macro(C: int, K: int, V: int, Kg: int, dtype: str, at, out, state):
    """step(S, W, U, Qd, A, Kte, LD, O, vnew, n, h): chunk n of head h, S updated in place, o
    written; the chunk's operands at at(n, h, row, column), o at out(n, h, row, column), the
    state at state(h, row, column); vnew a (C, V) buffer of the head's own."""
    rc, rk = _divisor(C, ROWS), _divisor(K, ROWS)      # tile rows: of v_new and o, of the state
    vt = _divisor(V, COLUMNS)
    per_key = 1 if Kg == K else 0                      # the decay row of state row k: k or 0

    @T.macro
    def step(S, W, U, Qd, A, Kte, LD, O, vnew, n, h):
        # v_new = u - w S, and o = q_decayed S + aqk v_new, by tiles of rc rows; the row tiles
        # inside a column slab, whose K x vt values of S (16 KiB) stay in L1 across them: 3% of
        # the GDA layer at (1, 4096, 32, 128) on one thread, against the rows outside
        for j0, c0 in T.grid(V // vt, C // rc):
            acc = T.alloc_buffer((rc, vt), dtype)
            for r in T.unroll(rc):
                for j in T.vectorized(vt):
                    acc[r, j] = U[at(n, h, c0 * rc + r, j0 * vt + j)]
            for kk in range(K):
                for r in T.unroll(rc):
                    for j in T.vectorized(vt):
                        acc[r, j] = acc[r, j] - W[at(n, h, c0 * rc + r, kk)] * S[state(h, kk, j0 * vt + j)]
            for r in T.unroll(rc):
                for j in T.vectorized(vt):
                    vnew[c0 * rc + r, j0 * vt + j] = acc[r, j]
        for j0, c0 in T.grid(V // vt, C // rc):
            acc = T.alloc_buffer((rc, vt), dtype)
            for r in T.unroll(rc):
                for j in T.vectorized(vt):
                    acc[r, j] = T.cast(0, dtype)
            for kk in range(K):
                for r in T.unroll(rc):
                    for j in T.vectorized(vt):
                        acc[r, j] = acc[r, j] + Qd[at(n, h, c0 * rc + r, kk)] * S[state(h, kk, j0 * vt + j)]
            for cc in range(C):
                for r in T.unroll(rc):
                    for j in T.vectorized(vt):
                        acc[r, j] = acc[r, j] + A[at(n, h, c0 * rc + r, cc)] * vnew[cc, j0 * vt + j]
            for r in T.unroll(rc):
                for j in T.vectorized(vt):
                    O[out(n, h, c0 * rc + r, j0 * vt + j)] = acc[r, j]
        # S = S * last_decay + k_to_end^T v_new, by tiles of rk state rows
        for k0, j0 in T.grid(K // rk, V // vt):
            acc = T.alloc_buffer((rk, vt), dtype)
            for r in T.unroll(rk):
                for j in T.vectorized(vt):
                    acc[r, j] = S[state(h, k0 * rk + r, j0 * vt + j)] * LD[at(n, h, (k0 * rk + r) * per_key, 0)]
            for cc in range(C):
                for r in T.unroll(rk):
                    for j in T.vectorized(vt):
                        acc[r, j] = acc[r, j] + Kte[at(n, h, cc, k0 * rk + r)] * vnew[cc, j0 * vt + j]
            for r in T.unroll(rk):
                for j in T.vectorized(vt):
                    S[state(h, k0 * rk + r, j0 * vt + j)] = acc[r, j]
    return step
