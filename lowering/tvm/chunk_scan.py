"""The loop over chunks (the fused op `chunk_scan`, dnir/fused.py) as one GPU kernel.

Lowered step by step (translate.Translator.scan), a scan costs one VM call and
about ten kernel launches per step; for a prefill at T = 8192 that is 128
steps of 32 x 64 x 128 products, and the GPU waits on the launches. The GPU
pipelines recognise the delta rule's chunk step (passes/fuse_delta_steps.py),

    v_new = u - w S
    o     = q_decayed S + aqk v_new
    S'    = S * last_decay + k_to_end^T v_new

and this kernel runs the whole loop instead: a thread block owns one head's
state columns [K, VT] in shared memory for all chunks, so the state never
leaves the chip between steps (as flash-linear-attention's Triton kernels keep
it).

Per chunk each block computes its v_new columns (C x VT) into shared memory,
then its output columns, then updates its state columns in place; barriers
separate the three (the output reads the old state, the update writes it).
Each C x K (or C x C) operand of the step is first staged in shared memory by
the whole block with coalesced loads. `rejects` says when the kernel does not
take a chunk scan (the sizes do not split into blocks, a block would not fit
the target's shared memory, another dtype than float32): the op is then
expanded back into its scan and lowered step by step.
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from dnir.fused import CHUNK_ROLES, STATES_ROLES
from dnir.graph import Node

from .fused_signatures import chunk_scan_function, chunk_states_function
from .kernels import converted, narrow_loads, unravel_index

# A block owns VT state columns of one head; each thread computes TC of them (columns
# tx, tx + VT/TC, ..: neighbouring threads read neighbouring words) for every row it owns.
TILE = (16, 2)


def sizes(node: Node):
    """(steps, batch, C, K, V, Kg) of a chunk_scan or chunk_states node."""
    state, w, u, *_, last_decay = node.inputs
    *batch, K, V = state.shape
    return w.shape[0], tuple(batch), u.shape[-2], K, V, last_decay.shape[-2]


def _largest_divisor(n: int, limit: int = 16) -> int:
    return max(d for d in range(1, limit + 1) if n % d == 0 and d & (d - 1) == 0)


def layout(C: int, K: int, V: int):
    """(thread rows, block columns VT, columns per thread TC), or None when the sizes do not
    split into blocks of at least 32 threads."""
    vt, tc = TILE
    rows = min(_largest_divisor(C), _largest_divisor(K))
    vt = min(vt, _largest_divisor(V, vt))
    tc = min(tc, vt)
    return (rows, vt, tc) if rows * (vt // tc) >= 32 and vt % tc == 0 else None


def shared_bytes(C: int, K: int, V: int, layout, staged_width: int) -> int:
    """Shared memory of one block: its state columns, its v_new columns and one staged operand
    (C x staged_width)."""
    vt = layout[1]
    return 4 * (K * vt + C * vt + C * staged_width)


def rejects(node: Node, target) -> str | None:
    """None when this kernel runs the chunk scan (or chunk_states) `node` on `target`, else why not."""
    _, _, C, K, V, _ = sizes(node)
    dtype = node.inputs[0].dtype
    if target.dtypes is not None and dtype not in target.dtypes:
        return f"the kernel is written for {', '.join(sorted(target.dtypes))}, not {dtype}"
    if node.attrs.get("dtype") not in (None, "", "bf16", "f16"):
        return f"the kernel stores starts and v_new in {dtype}, bf16 or f16, not {node.attrs['dtype']}"
    roles = STATES_ROLES if node.op == "chunk_states" else CHUNK_ROLES
    why = narrow_loads(node, roles, dtype, wide=("last_decay",) if node.op == "chunk_states" else roles)
    if why:
        return why
    split = layout(C, K, V)
    if split is None:
        return f"C={C}, K={K}, V={V} do not split into thread blocks of 32 threads or more"
    need = shared_bytes(C, K, V, split, K if node.op == "chunk_states" else max(K, C))
    if target.shared_bytes is not None and need > target.shared_bytes:
        return f"a thread block needs {need} B of shared memory, the target has {target.shared_bytes} B"
    return None


def _kernel(steps: int, batch: tuple, C: int, K: int, V: int, Kg: int, layout: tuple, dtype: str,
            split: bool, stored: str = "", narrow: dict | None = None):
    """chunk_scan's function (split False) or chunk_states' (split True, fused_signatures) with
    this kernel's loop nest: the same loop, the same state update and v_new; chunk_scan computes
    each chunk's output inside it, chunk_states stores each chunk's starting state and v_new."""
    rows, vt, tc = layout
    ct = vt // tc                          # threads across the block's columns
    heads = math.prod(batch)
    tiles, threads = V // vt, rows * ct
    ra, rk = C // rows, K // rows          # rows per thread: of v_new and o, of the state
    uk, uc = _largest_divisor(K, 4), _largest_divisor(C, 4)   # unrolled steps of the K and C sums
    per_key = 1 if Kg == K else 0          # the decay row of state row k: k (per channel) or 0

    def head(bx):                          # the block's head, as an index into the batch axes
        return unravel_index(bx // tiles, batch)

    # X holds one staged C x K (or C x C) operand. Unpadded: padding its rows against bank
    # conflicts (a flat buffer, rows K + 1 apart) measured slower on the H200 (2.14 against
    # 1.94 ms), the index arithmetic costing more than the conflicts.
    width = K if split else max(K, C)

    def staged(count):                     # rounds for the block's threads to stage count elements
        return -(-count // threads)

    @T.macro
    def stage(X, src, n, bx, tx, cols):
        """X[:C, :cols] = the chunk's C x cols operand, loaded by the whole block (coalesced)."""
        for e in T.unroll(staged(C * cols)):
            if e * threads + tx < C * cols:
                X[(e * threads + tx) // cols, (e * threads + tx) % cols] = converted(src[(n,) + head(bx) + (
                    (e * threads + tx) // cols, (e * threads + tx) % cols)], src.dtype, dtype)
        T.tvm_storage_sync("shared")

    @T.macro
    def add_rows_times(acc, X, Y, tx, length, unroll):
        """acc[r, j] += sum_i X[row r, i] * Y[i, column j], over this thread's rows and columns."""
        for i0 in range(length // unroll):
            for i1 in T.unroll(unroll):
                for r in T.unroll(ra):
                    for j in T.unroll(tc):
                        acc[r * tc + j] = acc[r * tc + j] + X[tx // ct + rows * r, i0 * unroll + i1] * Y[
                            i0 * unroll + i1, tx % ct + ct * j]

    @T.macro
    def clear(acc):
        for r in T.unroll(ra):
            for j in T.unroll(tc):
                acc[r * tc + j] = T.float32(0)

    # Per chunk, each of the step's C x K (or C x C) operands is first staged into shared
    # memory by the whole block with coalesced loads, then read from there. Thread tx owns rows
    # tx // ct + rows * r and columns tx % ct + ct * j of its block's VT state columns; its
    # accumulators acc[r * tc + j] are registers (the r, j loops are unrolled).
    @T.macro
    def load_state(S, S0, bx, tx):
        for r in T.unroll(rk):
            for j in T.unroll(tc):
                S[tx // ct + rows * r, tx % ct + ct * j] = S0[head(bx) + (
                    tx // ct + rows * r, bx % tiles * vt + tx % ct + ct * j)]

    @T.macro
    def store_state(dst, S, prefix, bx, tx):
        """dst[prefix + head + (row, column)] = this thread's state elements."""
        for r in T.unroll(rk):
            for j in T.unroll(tc):
                dst[prefix + head(bx) + (tx // ct + rows * r, bx % tiles * vt + tx % ct + ct * j)] = converted(
                    S[tx // ct + rows * r, tx % ct + ct * j], dtype, dst.dtype)

    @T.macro
    def v_new(N, X, S, W, U, acc, n, bx, tx):
        """N = u - w S, this block's columns (X: w staged)."""
        stage(X, W, n, bx, tx, K)
        clear(acc)
        add_rows_times(acc, X, S, tx, K, uk)
        for r in T.unroll(ra):
            for j in T.unroll(tc):
                N[tx // ct + rows * r, tx % ct + ct * j] = converted(U[(n,) + head(bx) + (
                    tx // ct + rows * r, bx % tiles * vt + tx % ct + ct * j)], U.dtype, dtype) - acc[r * tc + j]
        T.tvm_storage_sync("shared")

    @T.macro
    def update(S, N, X, Kte, LD, acc, n, bx, tx):
        """S = S * last_decay + k_to_end^T v_new, in place (X: free to stage into)."""
        stage(X, Kte, n, bx, tx, K)
        for r in T.unroll(rk):
            for j in T.unroll(tc):
                acc[r * tc + j] = S[tx // ct + rows * r, tx % ct + ct * j] * LD[(n,) + head(bx) + (
                    (tx // ct + rows * r) * per_key, 0)]
        for i0 in range(C // uc):
            for i1 in T.unroll(uc):
                for r in T.unroll(rk):
                    for j in T.unroll(tc):
                        acc[r * tc + j] = acc[r * tc + j] + X[
                            i0 * uc + i1, tx // ct + rows * r] * N[i0 * uc + i1, tx % ct + ct * j]
        for r in T.unroll(rk):
            for j in T.unroll(tc):
                S[tx // ct + rows * r, tx % ct + ct * j] = acc[r * tc + j]
        T.tvm_storage_sync("shared")

    @T.macro
    def scan_body(S0, W, U, Qd, A, Kte, LD, S1, O):
        for bx in T.thread_binding(heads * tiles, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                S = T.alloc_shared((K, vt), dtype)
                N = T.alloc_shared((C, vt), dtype)
                X = T.alloc_shared((C, width), dtype)
                acc = T.alloc_local((max(ra, rk) * tc,), dtype)
                load_state(S, S0, bx, tx)
                for n in range(steps):
                    v_new(N, X, S, W, U, acc, n, bx, tx)
                    # o = q_decayed S + aqk v_new
                    stage(X, Qd, n, bx, tx, K)
                    clear(acc)
                    add_rows_times(acc, X, S, tx, K, uk)
                    T.tvm_storage_sync("shared")
                    stage(X, A, n, bx, tx, C)
                    add_rows_times(acc, X, N, tx, C, uc)
                    for r in T.unroll(ra):
                        for j in T.unroll(tc):
                            O[(n,) + head(bx) + (tx // ct + rows * r, bx % tiles * vt + tx % ct + ct * j)] = \
                                acc[r * tc + j]
                    T.tvm_storage_sync("shared")   # every read of the old state and of X is done
                    update(S, N, X, Kte, LD, acc, n, bx, tx)
                store_state(S1, S, (), bx, tx)

    @T.macro
    def states_body(S0, W, U, Kte, LD, S1, St, Vn):
        for bx in T.thread_binding(heads * tiles, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                S = T.alloc_shared((K, vt), dtype)
                N = T.alloc_shared((C, vt), dtype)
                X = T.alloc_shared((C, width), dtype)
                acc = T.alloc_local((max(ra, rk) * tc,), dtype)
                load_state(S, S0, bx, tx)
                for n in range(steps):
                    store_state(St, S, (n,), bx, tx)     # a thread's own elements: no barrier needed
                    v_new(N, X, S, W, U, acc, n, bx, tx)
                    for r in T.unroll(ra):
                        for j in T.unroll(tc):
                            Vn[(n,) + head(bx) + (tx // ct + rows * r, bx % tiles * vt + tx % ct + ct * j)] = \
                                converted(N[tx // ct + rows * r, tx % ct + ct * j], dtype, Vn.dtype)
                    update(S, N, X, Kte, LD, acc, n, bx, tx)
                store_state(S1, S, (), bx, tx)

    if split:
        return chunk_states_function(steps, batch, C, K, V, Kg, dtype, states_body, stored, narrow)
    return chunk_scan_function(steps, batch, C, K, V, Kg, dtype, scan_body)


def chunk_scan_kernel(steps: int, batch: tuple, C: int, K: int, V: int, Kg: int, layout: tuple, dtype: str):
    """The chunk scan's function (fused_signatures.chunk_scan_function) with this kernel's loop nest."""
    return _kernel(steps, batch, C, K, V, Kg, layout, dtype, split=False)


def chunk_states_kernel(steps: int, batch: tuple, C: int, K: int, V: int, Kg: int, layout: tuple, dtype: str,
                        stored: str = "", narrow: dict | None = None):
    """chunk_states' function (fused_signatures.chunk_states_function): chunk_scan's loop without
    the output's products, storing each chunk's starting state and v_new instead (stored: their dtype
    where narrower than `dtype`, rounded as they are stored; narrow: operands narrower than `dtype`,
    role -> dtype, widened as they are loaded)."""
    return _kernel(steps, batch, C, K, V, Kg, layout, dtype, split=True, stored=stored, narrow=narrow)
