"""Hand-written TIR for the ops Relax and TOPI lack or lower badly.

Each kernel is a loop over independent "lanes" with a serial loop inside:
  - solve_tri: a lane is one batch matrix (CPU) or one column of it (GPU);
    rows are solved in order (forward or backward substitution).
  - cumsum:    a lane is one line along the scanned axis.
  - put_row:   writes one step's value into row t of a scan's stacked output,
    in place (t is a scalar argument, so one kernel serves every step).

On CPU the lane loop is `parallel`; on GPU it is bound to blockIdx/threadIdx:
each kernel declares its function once and takes one of its two loop nests
(`T.macro`s over the function's buffers).
The functions carry `tirx.is_scheduled` so that dlight leaves them alone.
"""
from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

THREADS_PER_BLOCK = 64
OPAQUE = 8  # Relax op pattern kOpaque: FuseOps leaves these calls alone
ATTRS = {"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE}


def unravel_index(e, shape) -> tuple:
    """Flat row-major index -> index tuple of `shape`. Kernels index their buffers in the
    callers' own shapes: no buffer views (the vulkan runner binds by name), and no reshape
    in Relax that could become a copy."""
    idx = []
    for d in reversed(shape):
        idx.append(e % d)
        e = e // d
    return tuple(reversed(idx))


def converted(x, have: str, want: str):
    """x, a value of dtype `have`, in `want`: as it is where the two are one, else through a cast (a
    bf16/fp16 operand widened as it is loaded, or a result rounded once as it is stored)."""
    return x if str(have) == str(want) else T.Cast(str(want), x)


def itemsize(dtype) -> int:
    """Bytes of one value of `dtype` (a name or a TVM dtype)."""
    return tvm.DataType(str(dtype)).bits // 8


def shared_address(buf, offset, dtype):
    """buf[offset]'s shared-memory address, for a PTX store or copy into buf. Through tvm_access_ptr with
    no read/write mask: TVM then keeps buf at its declared size (CompactBufferAllocation would shrink it to
    the elements it sees used, short of a 16-byte copy's last 12 bytes) and places no barrier for the
    store (ThreadSync compares accesses element by element: it would add barriers between a ring's
    different slots, or between a lane's reads and writes of its own elements)."""
    return T.cuda.cvta_generic_to_shared(T.tvm_access_ptr(T.type_annotation(dtype), buf.data, offset, 1, 0))


def narrow_loads(node, roles, dtype: str, wide=()) -> str | None:
    """Why a kernel computing in `dtype` cannot load `node`'s operands (the last len(roles), named by
    `roles`), or None: each is in `dtype`, or bf16/fp16 (widened as it is loaded) unless its role is
    in `wide`."""
    for role, x in zip(roles, node.inputs[len(node.inputs) - len(roles):]):
        if x.dtype != dtype and (role in wide or x.dtype not in ("bf16", "f16")):
            return f"the kernel loads {role} in {dtype}" + ("" if role in wide else ", bf16 or f16") + \
                f", not {x.dtype}"
    return None


def _grid(lanes: int) -> tuple[int, int]:
    threads = min(THREADS_PER_BLOCK, max(lanes, 1))
    return -(-lanes // threads), threads


def solve_tri(batch: int, n: int, m: int, dtype: str, lower: bool, unit_diagonal: bool, gpu: bool):
    """X [batch, n, m] with A X = B, A [batch, n, n] triangular."""
    # Row r of the solve is matrix row i = r (lower) or n-1-r (upper); the
    # already-solved rows are j' = j (lower) or n-1-j (upper) for j < r.
    sign, base = (1, 0) if lower else (-1, n - 1)
    blocks, threads = _grid(batch * m)

    @T.macro
    def on_gpu(A, B, X):                   # a lane: one column of one matrix
        for bx in T.thread_binding(blocks, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                if bx * threads + tx < batch * m:
                    for r in range(n):
                        X[(bx * threads + tx) // m, base + sign * r, (bx * threads + tx) % m] = B[
                            (bx * threads + tx) // m, base + sign * r, (bx * threads + tx) % m]
                        for j in range(r):
                            X[(bx * threads + tx) // m, base + sign * r, (bx * threads + tx) % m] = (
                                X[(bx * threads + tx) // m, base + sign * r, (bx * threads + tx) % m]
                                - A[(bx * threads + tx) // m, base + sign * r, base + sign * j]
                                * X[(bx * threads + tx) // m, base + sign * j, (bx * threads + tx) % m])
                        if not unit_diagonal:
                            X[(bx * threads + tx) // m, base + sign * r, (bx * threads + tx) % m] = (
                                X[(bx * threads + tx) // m, base + sign * r, (bx * threads + tx) % m]
                                / A[(bx * threads + tx) // m, base + sign * r, base + sign * r])

    @T.macro
    def on_cpu(A, B, X):                   # a lane: one matrix
        for p in T.parallel(batch):
            for r in range(n):
                for c in range(m):
                    X[p, base + sign * r, c] = B[p, base + sign * r, c]
                for j in range(r):
                    for c in range(m):
                        X[p, base + sign * r, c] = (X[p, base + sign * r, c]
                                                    - A[p, base + sign * r, base + sign * j] * X[p, base + sign * j, c])
                if not unit_diagonal:
                    for c in range(m):
                        X[p, base + sign * r, c] = X[p, base + sign * r, c] / A[p, base + sign * r, base + sign * r]

    body = on_gpu if gpu else on_cpu

    @T.prim_func(private=True, s_tir=True)
    def kernel(a: T.handle, b: T.handle, x: T.handle):
        T.func_attr(ATTRS)
        A = T.match_buffer(a, (batch, n, n), dtype)
        B = T.match_buffer(b, (batch, n, m), dtype)
        X = T.match_buffer(x, (batch, n, m), dtype)
        with T.sblock("root"):
            body(A, B, X)
    return kernel


def cumsum(outer: int, length: int, inner: int, dtype: str, gpu: bool):
    """Y [outer, length, inner] = running sum of X along the middle axis."""
    lanes = outer * inner
    blocks, threads = _grid(lanes)

    @T.macro
    def on_gpu(X, Y):                      # a lane: one line
        for bx in T.thread_binding(blocks, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                if bx * threads + tx < lanes:
                    Y[(bx * threads + tx) // inner, 0, (bx * threads + tx) % inner] = X[
                        (bx * threads + tx) // inner, 0, (bx * threads + tx) % inner]
                    for t in range(1, length):
                        Y[(bx * threads + tx) // inner, t, (bx * threads + tx) % inner] = (
                            Y[(bx * threads + tx) // inner, t - 1, (bx * threads + tx) % inner]
                            + X[(bx * threads + tx) // inner, t, (bx * threads + tx) % inner])

    @T.macro
    def on_cpu(X, Y):                      # a lane: the lines of one outer index
        for o in T.parallel(outer):
            for i in range(inner):
                Y[o, 0, i] = X[o, 0, i]
            for t in range(1, length):
                for i in range(inner):
                    Y[o, t, i] = Y[o, t - 1, i] + X[o, t, i]

    body = on_gpu if gpu else on_cpu

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.handle, y: T.handle):
        T.func_attr(ATTRS)
        X = T.match_buffer(x, (outer, length, inner), dtype)
        Y = T.match_buffer(y, (outer, length, inner), dtype)
        with T.sblock("root"):
            body(X, Y)
    return kernel


def put_row(stacked_shape, dtype: str, gpu: bool):
    """ys[t] = y in place, t a scalar argument (the scan loop's step index)."""
    row_shape = tuple(stacked_shape[1:])
    row = math.prod(row_shape)
    blocks, threads = _grid(row)

    def unravel(e):
        return unravel_index(e, row_shape)

    @T.macro
    def on_gpu(Ys, Yr, t):                 # a lane: one element
        for bx in T.thread_binding(blocks, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                if bx * threads + tx < row:
                    Ys[(t,) + unravel(bx * threads + tx)] = Yr[unravel(bx * threads + tx)]

    @T.macro
    def on_cpu(Ys, Yr, t):
        for e in range(row):
            Ys[(t,) + unravel(e)] = Yr[unravel(e)]

    body = on_gpu if gpu else on_cpu

    @T.prim_func(private=True, s_tir=True)
    def kernel(ys: T.handle, y: T.handle, t: T.int64):
        T.func_attr(ATTRS)
        Ys = T.match_buffer(ys, stacked_shape, dtype)
        Yr = T.match_buffer(y, row_shape, dtype)
        with T.sblock("root"):
            body(Ys, Yr, t)
    return kernel
