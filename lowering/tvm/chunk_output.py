"""Every chunk's output (the fused op `chunk_output`, dnir/fused.py) as one GPU kernel.

    o[n] = q_decayed[n] starts[n] + aqk[n] v_new[n]

Inside the loop over chunks (chunk_scan.py) these two products sit on the
sequential path: each chunk waits for them. Split off (chunk_states computes
only each chunk's starting state and v_new), they are independent per chunk
and head, so this kernel runs them all at once: a thread block per (chunk,
head, BV value columns), the chunk's C output rows. The two products are one
sum over K + C terms, in slices of KT: per slice the block stages q_decayed's
C x KT columns and the state's KT x BV rows (then aqk's and v_new's) into
shared memory with coalesced loads, and each thread accumulates a 4 x 4 tile
of outputs in registers (rows ty + TR r, columns tx + TC j: a warp reads one
or two rows of the staged left operand, a broadcast, and consecutive words of
the right one). With token_major the block writes its rows where the layer's
output has them ([R, n C, HV, V]: row i of chunk n of head h at token n C + i),
so no transpose follows (each row's BV columns are still one contiguous run).
With a `dtype` attribute (bf16/fp16: passes/fold_narrowing_casts.py) the block
rounds each float32 sum once as it stores it, with TVM's cast (round to nearest
even), which is what the separate cast kernel it replaces did.
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from dnir.fused import OUTPUT_ROLES, compute_dtype
from dnir.errors import AttrError
from dnir.graph import Node

from . import mma
from .fused_signatures import chunk_output_function
from .kernels import converted, itemsize, narrow_loads, shared_address, unravel_index

TILE = 4            # outputs per thread along rows and along columns
KT = 16             # terms of the sum staged at once
MAX_BV = 64         # value columns per block


def sizes(node: Node):
    """(steps, batch, C, K, V) of a chunk_output node."""
    qd, starts, *_ = node.inputs
    steps, *batch, K, V = starts.shape
    return steps, tuple(batch), qd.shape[-2], K, V


def layout(C: int, K: int, V: int):
    """BV, the value columns of a block, or None when the sizes do not split into blocks of
    4 x 4 tiles, 32 threads or more and slices of KT."""
    bv = max((d for d in range(TILE, MAX_BV + 1, TILE) if V % d == 0), default=0)
    threads = (C // TILE) * (bv // TILE)
    if bv == 0 or C % TILE or C % KT or K % KT or not 32 <= threads <= 1024:
        return None
    return bv


def rejects(node: Node, target) -> str | None:
    """None when this kernel runs the chunk_output `node` on `target`, else why not."""
    _, _, C, K, V = sizes(node)
    dtype = compute_dtype([x.type for x in node.inputs])
    if target.dtypes is not None and dtype not in target.dtypes:
        return f"the kernel is written for {', '.join(sorted(target.dtypes))}, not {dtype}"
    bv = layout(C, K, V)
    if node.attrs["dtype"] not in ("", "bf16", "f16"):
        return f"the kernel stores o in {dtype}, bf16 or f16, not {node.attrs['dtype']}"
    why = narrow_loads(node, OUTPUT_ROLES, dtype, wide=("aqk",))
    if why:
        return why
    if node.attrs["token_major"] and len(node.inputs[1].shape) != 5:
        return "token_major needs the batch axes (R, HV)"
    if bv is None:
        return (f"C={C}, K={K}, V={V} do not split into {TILE} x {TILE} tiles of 32 to 1024 threads a block "
                f"and sums in slices of {KT}")
    need = 4 * KT * (C + bv)
    if target.shared_bytes is not None and need > target.shared_bytes:
        return f"a thread block needs {need} B of shared memory, the target has {target.shared_bytes} B"
    return None


def chunk_output_kernel(steps: int, batch: tuple, C: int, K: int, V: int, bv: int, dtype: str,
                        token_major: bool = False, tile: tuple = (TILE, TILE), kt: int = KT, out_dtype: str = "",
                        narrow: dict | None = None):
    """chunk_output's function (fused_signatures.chunk_output_function) with this kernel's loop nest.
    tile: outputs per thread along rows and columns; kt: terms staged at once (benchmarks/gpu_sweep.py
    times other choices than the defaults); out_dtype: o's dtype when narrower than `dtype`; narrow:
    operands narrower than `dtype`, role -> dtype, widened as they are staged."""
    out_dtype = out_dtype or dtype
    heads = math.prod(batch)
    tiles = V // bv
    TR, TC = tile
    tr, tc = C // TR, bv // TC             # threads along rows and along columns
    threads = tr * tc

    def at(bx, row, col):                  # element (row, col) of block bx's chunk and head
        return (bx // (heads * tiles),) + unravel_index(bx // tiles % heads, batch) + (row, col)

    def out_at(bx, row, col):              # the output's element: chunk-major, or token-major
        chunk, (r, h) = bx // (heads * tiles), unravel_index(bx // tiles % heads, batch) + (0,) * (2 - len(batch))
        return (r, chunk * C + row, h, col) if token_major else at(bx, row, col)

    def rounds(count):
        return -(-count // threads)

    @T.macro
    def stage(X, Y, left, right, k0, bx, tx):
        """X = left[:, k0 : k0 + kt] (C x kt), Y = right[k0 : k0 + kt, the block's columns]."""
        for e in T.unroll(rounds(C * kt)):
            if e * threads + tx < C * kt:
                X[(e * threads + tx) // kt, (e * threads + tx) % kt] = converted(left[at(
                    bx, (e * threads + tx) // kt, k0 + (e * threads + tx) % kt)], left.dtype, dtype)
        for e in T.unroll(rounds(kt * bv)):
            if e * threads + tx < kt * bv:
                Y[(e * threads + tx) // bv, (e * threads + tx) % bv] = converted(right[at(
                    bx, k0 + (e * threads + tx) // bv, bx % tiles * bv + (e * threads + tx) % bv)], right.dtype, dtype)
        T.tvm_storage_sync("shared")

    @T.macro
    def add_product(acc, X, Y, left, right, length, bx, tx):
        """acc += left[rows, :length] right[:length, columns], kt terms at a time."""
        for k0 in range(length // kt):
            stage(X, Y, left, right, k0 * kt, bx, tx)
            for kk in T.unroll(kt):
                for r in T.unroll(TR):
                    for j in T.unroll(TC):
                        acc[r * TC + j] = acc[r * TC + j] + X[tx // tc + tr * r, kk] * Y[kk, tx % tc + tc * j]
            T.tvm_storage_sync("shared")     # every read of X and Y is done before the next slice

    @T.macro
    def body(Qd, St, A, N, O):
        for bx in T.thread_binding(steps * heads * tiles, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                X = T.alloc_shared((C, kt), dtype)
                Y = T.alloc_shared((kt, bv), dtype)
                acc = T.alloc_local((TR * TC,), dtype)
                for i in T.unroll(TR * TC):
                    acc[i] = T.float32(0)
                add_product(acc, X, Y, Qd, St, K, bx, tx)
                add_product(acc, X, Y, A, N, C, bx, tx)
                for r in T.unroll(TR):
                    for j in T.unroll(TC):
                        O[out_at(bx, tx // tc + tr * r, bx % tiles * bv + tx % tc + tc * j)] = T.Cast(
                            out_dtype, acc[r * TC + j])
    return chunk_output_function(steps, batch, C, K, V, dtype, body, token_major, out_dtype, narrow)



# The tensor-core kernel's choices (benchmarks/gpu_sweep.py times others): value columns of a
# block, terms staged at once, 3xTF32 (float32's accuracy) rather than TF32.
MMA_BV, MMA_KT, MMA_SPLIT = 64, 32, True
STAGING = ("slices", "async")         # how a block's operands reach shared memory (chunk_output_mma_kernel)


def mma_layout(C: int, K: int, V: int, bv: int = MMA_BV, kt: int = MMA_KT) -> bool:
    """Whether the tensor-core kernel takes these sizes: whole 16-row warps, 8-column tiles and
    kt-term slices of the two sums."""
    return C % mma.M == 0 and V % bv == 0 and bv % mma.N == 0 and K % kt == 0 and C % kt == 0 \
        and kt % mma.K8 == 0 and 32 <= 32 * (C // mma.M) <= 1024


def chunk_output_mma_kernel(steps: int, batch: tuple, C: int, K: int, V: int, dtype: str,
                            token_major: bool = False, bv: int = MMA_BV, kt: int = MMA_KT, split: bool = MMA_SPLIT,
                            out_dtype: str = "", narrow: dict | None = None, staging: str = "slices"):
    """chunk_output on tensor cores (mma.py: TF32, or 3xTF32 with split).

    A block takes one chunk, head and bv value columns as the CUDA-core kernel does; warp w owns
    output rows 16 w .. 16 w + 15 and all bv columns (bv / 8 accumulator tiles), and loads its
    fragments from shared memory, where each operand's rows are padded (by 4 words for the left
    operands, read by rows, 8 for the right ones, read by columns) so that a warp's loads hit 32
    different banks. staging "slices": per slice of kt terms the block loads the left operand's
    C x kt and the right's kt x bv into shared memory, widened to `dtype`, then multiplies. The
    cuda target's translator takes it for float32: on an H200 at (1, 8192, 32, 128) it matched
    chunk_output_kernel within 1.3e-6 and ran 0.46 -> 0.29 ms (benchmarks/results/gpu_sweep.md).
    staging "async": the block copies its four operands whole, as stored (bf16 8 values a 16-byte
    cp.async, float32 4), q_decayed and starts in one group, aqk and v_new in a second that is in
    flight while the first product runs; fragments are widened as they are loaded (no slice loop:
    one barrier a product; 65 KiB of dynamic shared memory at bv = 64 for a bf16 layer, 106 KiB in
    float32). out_dtype, narrow: as chunk_output_kernel's."""
    if staging not in STAGING:
        raise AttrError(f"staging={staging!r}; expected one of {', '.join(STAGING)}")
    out_dtype = out_dtype or dtype
    of = {role: (narrow or {}).get(role, dtype) for role in OUTPUT_ROLES}
    heads = math.prod(batch)
    tiles = V // bv
    threads = 32 * (C // mma.M)
    nt = bv // mma.N                       # accumulator tiles of a warp

    def at(bx, row, col):
        return (bx // (heads * tiles),) + unravel_index(bx // tiles % heads, batch) + (row, col)

    def out_at(bx, row, col):
        chunk, (r, h) = bx // (heads * tiles), unravel_index(bx // tiles % heads, batch) + (0,) * (2 - len(batch))
        return (r, chunk * C + row, h, col) if token_major else at(bx, row, col)

    def rounds(count):
        return -(-count // threads)

    def padded(width, words, stored):      # a staged row's stride: `words` 4-byte words past its width
        return width + words * 4 // itemsize(stored)

    px, py = padded(kt, 4, dtype), padded(bv, 8, dtype)     # "slices": the staged operands' row strides
    pq, ps = padded(K, 4, of["q_decayed"]), padded(bv, 8, of["starts"])    # "async": each operand's
    pa, pn = padded(C, 4, of["aqk"]), padded(bv, 8, of["v_new"])

    @T.macro
    def products(acc, fa, fb, X, px, Y, py, length, tx):
        """acc += X[warp's rows, :length] Y[:length, :bv] from shared memory (row strides px and py)."""
        for k8 in T.unroll(length // mma.K8):
            for i in T.unroll(4):
                fa[i] = converted(X[(tx // 32 * mma.M + mma.a_at(tx % 32, i)[0]) * px + k8 * mma.K8
                                    + mma.a_at(tx % 32, i)[1]], X.dtype, dtype)
                fa[4 + i] = mma.low_part(fa[i])
            for j in T.unroll(nt):
                for i in T.unroll(2):
                    fb[i] = converted(Y[(k8 * mma.K8 + mma.b_at(tx % 32, i)[0]) * py + j * mma.N
                                        + mma.b_at(tx % 32, i)[1]], Y.dtype, dtype)
                    fb[2 + i] = mma.low_part(fb[i])
                mma.mma(acc, 4 * j, fa, fb, split)

    @T.macro
    def add_sliced(acc, X, Y, fa, fb, left, right, length, bx, tx):
        """acc += left[rows, :length] right[:length, columns], kt terms at a time."""
        for k0 in range(length // kt):
            for e in T.unroll(rounds(C * kt)):
                if e * threads + tx < C * kt:
                    X[(e * threads + tx) // kt * px + (e * threads + tx) % kt] = converted(left[at(
                        bx, (e * threads + tx) // kt, k0 * kt + (e * threads + tx) % kt)], left.dtype, dtype)
            for e in T.unroll(rounds(kt * bv)):
                if e * threads + tx < kt * bv:
                    Y[(e * threads + tx) // bv * py + (e * threads + tx) % bv] = converted(right[at(
                        bx, k0 * kt + (e * threads + tx) // bv, bx % tiles * bv + (e * threads + tx) % bv)], right.dtype, dtype)
            T.tvm_storage_sync("shared")
            products(acc, fa, fb, X, px, Y, py, kt, tx)
            T.tvm_storage_sync("shared")

    def span(src):                         # values in a 16-byte copy
        return 16 // itemsize(src.dtype)

    @T.macro
    def copy(X, src, rows, width, stride, col0, bx, tx):
        """cp.async of src's rows x width block at (0, col0) of the block's chunk and head into X (row
        stride `stride`), 16 bytes a copy, spread over the threads."""
        for e in T.unroll(rounds(rows * width // span(src))):
            if e * threads + tx < rows * width // span(src):
                T.ptx.cp.async_.cg.shared.global_(
                    shared_address(X, (e * threads + tx) // (width // span(src)) * stride
                                   + (e * threads + tx) % (width // span(src)) * span(src), src.dtype),
                    T.address_of(src[at(bx, (e * threads + tx) // (width // span(src)),
                                        col0 + (e * threads + tx) % (width // span(src)) * span(src))]), 16)

    @T.macro
    def store(O, acc, bx, tx):
        for j in T.unroll(nt):
            for i in T.unroll(4):
                O[out_at(bx, tx // 32 * mma.M + mma.d_at(tx % 32, i)[0],
                         bx % tiles * bv + j * mma.N + mma.d_at(tx % 32, i)[1])] = T.Cast(out_dtype, acc[4 * j + i])

    @T.macro
    def body_sliced(Qd, St, A, N, O):
        T.reads()                              # the tensor-core calls read registers TVM cannot see
        T.writes()
        for bx in T.thread_binding(steps * heads * tiles, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                X = T.alloc_shared((C * px,), dtype)
                Y = T.alloc_shared((kt * py,), dtype)
                acc = T.alloc_local((4 * nt,), dtype)
                fa = T.alloc_local((8,), dtype)
                fb = T.alloc_local((4,), dtype)
                for i in T.unroll(4 * nt):
                    acc[i] = T.float32(0)
                add_sliced(acc, X, Y, fa, fb, Qd, St, K, bx, tx)
                add_sliced(acc, X, Y, fa, fb, A, N, C, bx, tx)
                store(O, acc, bx, tx)

    @T.macro
    def body_async(Qd, St, A, N, O):
        T.reads()
        T.writes()
        for bx in T.thread_binding(steps * heads * tiles, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                Xq = T.alloc_buffer((C * pq,), of["q_decayed"], scope="shared.dyn")
                Ys = T.alloc_buffer((K * ps,), of["starts"], scope="shared.dyn")
                Xa = T.alloc_buffer((C * pa,), of["aqk"], scope="shared.dyn")
                Yn = T.alloc_buffer((C * pn,), of["v_new"], scope="shared.dyn")
                acc = T.alloc_local((4 * nt,), dtype)
                fa = T.alloc_local((8,), dtype)
                fb = T.alloc_local((4,), dtype)
                copy(Xq, Qd, C, K, pq, 0, bx, tx)
                copy(Ys, St, K, bv, ps, bx % tiles * bv, bx, tx)
                T.ptx.cp.async_.commit_group()
                copy(Xa, A, C, C, pa, 0, bx, tx)
                copy(Yn, N, C, bv, pn, bx % tiles * bv, bx, tx)
                T.ptx.cp.async_.commit_group()
                for i in T.unroll(4 * nt):
                    acc[i] = T.float32(0)
                T.ptx.cp.async_.wait_group(1)      # this thread's copies of q_decayed and starts landed,
                T.tvm_storage_sync("shared")       # and every other thread's
                products(acc, fa, fb, Xq, pq, Ys, ps, K, tx)
                T.ptx.cp.async_.wait_group(0)
                T.tvm_storage_sync("shared")
                products(acc, fa, fb, Xa, pa, Yn, pn, C, tx)
                store(O, acc, bx, tx)

    body = body_async if staging == "async" else body_sliced
    return chunk_output_function(steps, batch, C, K, V, dtype, body, token_major, out_dtype, narrow)

