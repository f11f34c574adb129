"""chunk_states (dnir/fused.py) on tensor cores: the loop over chunks with its products as mma.

The same loop as chunk_scan.py's chunk_states kernel: a thread block owns vt state
columns of one head in shared memory for all chunks, and per chunk n

    starts[n] = S;   v_new = u[n] - w[n] S;   S = S * last_decay[n] + k_to_end[n]^T v_new

but both products run on tensor cores (mma.py: 3xTF32 with split, the default here: the
state carries each chunk's rounding into every later chunk), by four warps of 16 rows:

- v_new (C x vt): warp w owns rows 16 w .. 16 w + 15; the sum over K runs in two halves,
  each half of w[n] (C x K/2) staged in shared memory (rows padded by 4 words: the A
  fragments' loads hit 32 banks), S read in place as B;
- the update (K x vt): per half of the state's rows, k_to_end[n]'s half staged (rows
  padded by 8: its fragments are read transposed), warp w owns rows 16 w .. of that half
  (K/2 = 64 rows: four warps), its accumulators start at S * last_decay and go back to S.

Shared memory: S [K, vt + 8], v_new [C, vt + 8], one staged half [C, K/2 + 8]; 36 KiB at
C = 64, K = 128, vt = 16. Takes C = 64 and K = 128 (four warps of 16 rows either way) and
vt a multiple of 8.

The cuda target's translator takes it for float32 (Vulkan keeps chunk_scan.py's kernel). On an
H200 at (1, 8192, 32, 128) it matched the CUDA-core kernel within 8.5e-7 (relative) and ran
1.24 -> 0.89 ms (TF32 alone: 0.78 ms but 1.2e-3; benchmarks/results/gpu_sweep.md).
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from . import mma
from .fused_signatures import chunk_states_function
from .kernels import unravel_index

WARPS = 4
# state columns of a block; 3xTF32 unless the layer's precision is "tf32" (translate.py passes split)
VT, SPLIT = 16, True


def takes(C: int, K: int, V: int, vt: int = VT) -> bool:
    return C == WARPS * mma.M and K == 2 * WARPS * mma.M and vt % mma.N == 0 and V % vt == 0


def chunk_states_mma_kernel(steps: int, batch: tuple, C: int, K: int, V: int, Kg: int, dtype: str,
                            vt: int = VT, split: bool = SPLIT):
    """chunk_states' function (fused_signatures.chunk_states_function) with this kernel's loop nest."""
    heads = math.prod(batch)
    tiles = V // vt
    threads = 32 * WARPS
    nt = vt // mma.N
    half = K // 2
    ps = vt + 8                       # S's and v_new's row stride: B loads at (8t + g) mod 32, no conflict
    pw, pk = half + 4, half + 8       # the staged w (read by rows) and k_to_end (read by columns)
    per_key = 1 if Kg == K else 0

    def head(bx):
        return unravel_index(bx // tiles, batch)

    def col0(bx):
        return bx % tiles * vt

    @T.macro
    def stage(X, src, n, h, stride, bx, tx):
        """X[c, :half] = src[n, head, c, h half : (h + 1) half], every row of the chunk."""
        for e in T.unroll(C * half // threads):
            X[(e * threads + tx) // half * stride + (e * threads + tx) % half] = src[(n,) + head(bx) + (
                (e * threads + tx) // half, h * half + (e * threads + tx) % half)]
        T.tvm_storage_sync("shared")

    @T.macro
    def body(S0, W, U, Kte, LD, S1, St, Vn):
        T.reads()                              # the tensor-core calls read registers TVM cannot see
        T.writes()
        for bx in T.thread_binding(heads * tiles, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                S = T.alloc_shared((K * ps,), dtype)
                N = T.alloc_shared((C * ps,), dtype)
                X = T.alloc_shared((C * pk,), dtype)
                acc = T.alloc_local((4 * nt,), dtype)
                fa = T.alloc_local((8,), dtype)
                fb = T.alloc_local((4,), dtype)
                w, lane = tx // 32, tx % 32
                for e in T.unroll(K * vt // threads):
                    S[(e * threads + tx) // vt * ps + (e * threads + tx) % vt] = S0[head(bx) + (
                        (e * threads + tx) // vt, col0(bx) + (e * threads + tx) % vt)]
                T.tvm_storage_sync("shared")
                for n in range(steps):
                    for e in T.unroll(K * vt // threads):
                        St[(n,) + head(bx) + ((e * threads + tx) // vt, col0(bx) + (e * threads + tx) % vt)] = S[
                            (e * threads + tx) // vt * ps + (e * threads + tx) % vt]
                    # v_new = u - w S: rows 16 w.. of the chunk
                    for i in T.unroll(4 * nt):
                        acc[i] = T.float32(0)
                    for h in range(2):
                        stage(X, W, n, h, pw, bx, tx)
                        for k8 in T.unroll(half // mma.K8):
                            for i in T.unroll(4):
                                fa[i] = X[(w * mma.M + mma.a_at(lane, i)[0]) * pw + k8 * mma.K8 + mma.a_at(lane, i)[1]]
                                fa[4 + i] = mma.low_part(fa[i])
                            for j in T.unroll(nt):
                                for i in T.unroll(2):
                                    fb[i] = S[(h * half + k8 * mma.K8 + mma.b_at(lane, i)[0]) * ps + j * mma.N
                                              + mma.b_at(lane, i)[1]]
                                    fb[2 + i] = mma.low_part(fb[i])
                                mma.mma(acc, 4 * j, fa, fb, split)
                        T.tvm_storage_sync("shared")      # X is staged again next
                    for j in T.unroll(nt):
                        for i in T.unroll(4):
                            N[(w * mma.M + mma.d_at(lane, i)[0]) * ps + j * mma.N + mma.d_at(lane, i)[1]] = U[
                                (n,) + head(bx) + (w * mma.M + mma.d_at(lane, i)[0],
                                                   col0(bx) + j * mma.N + mma.d_at(lane, i)[1])] - acc[4 * j + i]
                            Vn[(n,) + head(bx) + (w * mma.M + mma.d_at(lane, i)[0],
                                                  col0(bx) + j * mma.N + mma.d_at(lane, i)[1])] = \
                                N[(w * mma.M + mma.d_at(lane, i)[0]) * ps + j * mma.N + mma.d_at(lane, i)[1]]
                    # S = S last_decay + k_to_end^T v_new, per half of the state's rows
                    for h in range(2):
                        stage(X, Kte, n, h, pk, bx, tx)    # also orders v_new's writes before its reads
                        for j in T.unroll(nt):
                            for i in T.unroll(4):
                                acc[4 * j + i] = S[(h * half + w * mma.M + mma.d_at(lane, i)[0]) * ps + j * mma.N
                                                   + mma.d_at(lane, i)[1]] * LD[(n,) + head(bx) + (
                                                       (h * half + w * mma.M + mma.d_at(lane, i)[0]) * per_key, 0)]
                        for k8 in T.unroll(C // mma.K8):
                            for i in T.unroll(4):      # A = k_to_end^T: element (row r, term c) at X[c, r]
                                fa[i] = X[(k8 * mma.K8 + mma.a_at(lane, i)[1]) * pk + w * mma.M + mma.a_at(lane, i)[0]]
                                fa[4 + i] = mma.low_part(fa[i])
                            for j in T.unroll(nt):
                                for i in T.unroll(2):
                                    fb[i] = N[(k8 * mma.K8 + mma.b_at(lane, i)[0]) * ps + j * mma.N
                                              + mma.b_at(lane, i)[1]]
                                    fb[2 + i] = mma.low_part(fb[i])
                                mma.mma(acc, 4 * j, fa, fb, split)
                        for j in T.unroll(nt):      # each lane writes back only what it read: no barrier
                            for i in T.unroll(4):
                                S[(h * half + w * mma.M + mma.d_at(lane, i)[0]) * ps + j * mma.N
                                  + mma.d_at(lane, i)[1]] = acc[4 * j + i]
                        T.tvm_storage_sync("shared")      # X is staged again next; S is read whole next
                for e in T.unroll(K * vt // threads):
                    S1[head(bx) + ((e * threads + tx) // vt, col0(bx) + (e * threads + tx) % vt)] = S[
                        (e * threads + tx) // vt * ps + (e * threads + tx) % vt]
    return chunk_states_function(steps, batch, C, K, V, Kg, dtype, body)
