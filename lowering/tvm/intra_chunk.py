"""The work local to each chunk (the fused op `intra_chunk`, dnir/fused.py) as one GPU kernel.

Lowered op by op this is some forty small kernels over [.., C, C] tensors (and,
for a gate per key channel, reductions over [.., C, C, K] decays), plus
transposes of q, k, v into chunks and of the results into the loop's order.
Here a thread block of 256 threads takes one chunk of one head, reads q, k, v,
g and beta where the layer has them ([R, Tp, HV, X], token-major: no transposes)
and writes the loop's operands chunk-major. Per chunk, with gam the running sum
of the gates from the chunk start:

 1. a thread per key channel: gam and the sums from the end, each a running sum
    of gates, and from them q_decayed, k_to_end and last_decay.
 2. the scores kk_ij = sum_c k_i k_j exp(D_ij) and qk_ij = sum_c q_i k_j exp(D_ij),
    D_ij = sum_{j < l <= i} g_l, by 16 x 16 blocks of token pairs, a thread per pair:
    - a diagonal block: D_ij per channel summed over its own segment (the block's 16
      gates, those outside the segment masked to 0);
    - a block below it, r the first row of the row block: rows decayed to r
      (q_i, k_i times exp(sum_{r < l <= i} g)), columns from r (k_j exp(sum_{j < l <= r} g),
      a running sum down from r kept by the channel's thread across column blocks),
      then plain dot products of the staged rows and columns.
    Every exponent is a sum of gates of one sign over its own segment: exact to
    rounding however strong the gates (tests/models/test_strong_gates.py), and no
    [C, C, K] tensor. kk stays in shared memory; qk is Aqk, written out (0 above
    the diagonal).
 3. a thread per column of W and U (K + V of them): forward substitution
    x_i = rhs_i - beta_i sum_{j < i} kk_ij x_j with the column's C values in registers
    (the loops unrolled), its right-hand side beta k exp(gam) or beta v made by the
    thread itself, and kk read from shared memory four words a load (one word for
    the whole block).

CUDA cores, float32; Vulkan's kernel, and CUDA's where intra_chunk_mma.py's does not take
the sizes (intra_chunk_mma.chosen). On an H100 at (1, 8192, 32, 128) it took 0.94 ms of
the GDA layer's 1.81 though it holds a third of the FLOPs: the solve's column of C values a
thread caps it at 3 blocks an SM (80 registers, some spilled) to hide the serial phases'
latency, and KDA's diagonal blocks sum 16 masked gates per channel and pair (2.04 ms there).
The solve's right-hand sides loaded before the substitution and its four partial sums left
intra_chunk_mma's GDA kernel as it was (0.454 -> 0.453 ms in the bf16 layer of
benchmarks/results/gpu.md): neither the loads nor the chain of fused multiply-adds bounds it.
intra_chunk_mma's solve by blocks on tensor cores (one gate per head) took it to 0.358 ms.
"""
from __future__ import annotations

import math

from dnir.fused import intra_sizes

S = 16              # tokens per block of the scores: a thread per pair of a block
THREADS = S * S


def rejects(node, target) -> str | None:
    """None when this kernel runs the intra_chunk `node` on `target`, else why not."""
    dtype = node.inputs[0].dtype
    if target.dtypes is not None and dtype not in target.dtypes:
        return f"the kernel is written for {', '.join(sorted(target.dtypes))}, not {dtype}"
    if node.attrs["dtype"] not in ("", "bf16", "f16"):
        return f"the kernel stores w, u, q_decayed and k_to_end in {dtype}, bf16 or f16, not {node.attrs['dtype']}"
    R, NC, HV, C, K, V, Kg = intra_sizes([i.type for i in node.inputs], node.attrs)
    if C % S or K + V > THREADS or C > 64:
        return f"C={C}, K={K}, V={V}: the kernel takes chunks of whole {S}-token blocks up to 64 and K + V <= {THREADS}"
    need = shared_bytes(C, K)
    if target.shared_bytes is not None and need > target.shared_bytes:
        return f"a thread block needs {need} B of shared memory, the target has {target.shared_bytes} B"
    return None


def shared_bytes(C: int, K: int) -> int:
    """kk [C, C] and three 16-row stages of K channels (padded by one against bank conflicts)."""
    return 4 * (C * C + 3 * S * (K + 1) + S)


def loads(dtype: str, group: int = 1, scale: float | None = None):
    """(q_at, k_at, load): an operand's value at [b, t, h, c] in `dtype`. The translator may pass the
    layer's raw operands (translate._intra_reads): q and k before their GQA repeat (group: value
    heads per head; value head h reads head h // group), q before its constant scale (applied here)
    and, on cuda, a bf16/fp16 operand before its widening cast (widened here)."""
    from tvm.script import tirx as T

    def load(buf, b, t, h, c):
        return buf[b, t, h, c] if buf.dtype == dtype else T.cast(buf[b, t, h, c], dtype)

    def q_at(Q, b, t, h, c):
        x = load(Q, b, t, h // group, c)
        return x if scale is None else x * T.cast(scale, dtype)

    def k_at(Kx, b, t, h, c):
        return load(Kx, b, t, h // group, c)
    return q_at, k_at, load


def phases(C: int, K: int, V: int, Kg: int, dtype: str, group: int = 1, scale: float | None = None,
           scaled_kk: bool = False, stored: str = ""):
    """Macros of the kernel's steps that intra_chunk_mma.py shares: `operands` (step 1), `diagonal`
    (a row block's staged raw rows and its diagonal block of scores, step 2) and `solve` (step 3).
    `diagonal` stages into three 16-row stages of K channels: q at Xq[oq:], k at Xk[ok:], gates at Xc[oc:]
    (three buffers, or one at three offsets where nothing in a condition reads one stage and writes another).
    group, scale: as `loads` reads q and k. scaled_kk: `solve` finds beta_i kk_ij in KK, not kk_ij.
    stored: the dtype of W, U, Qd and Ke where narrower than `dtype` (the op's `dtype`: each value
    rounded as it is stored, the solve going on with the wide one)."""
    from tvm.script import tirx as T

    from .kernels import converted

    q_at, k_at, load = loads(dtype, group, scale)

    def put(x):                                # a value of W, U, Qd or Ke as it is stored
        return converted(x, dtype, stored or dtype)

    pk = 1 if Kg == K else 0                   # the gate of channel c: c or 0
    zero = T.cast(0, dtype)
    P = K + 1                                  # a staged row's stride
    NL = math.gcd(K, 4)                        # channels summed side by side (independent chains)
    blocks = C // S

    @T.macro
    def operands(Q, Kx, Vx, G, Bt, W, U, Qd, Ke, LD, run, n, b, h, tx):
        """A thread per key channel: the decays and the decayed q and k (W's and U's right-hand sides
        are `solve`'s own)."""
        t0 = n * C
        if tx < K:
            run[0] = zero
            for i in T.unroll(C):             # unrolled: the loads issue ahead of the sum
                run[0] = run[0] + load(G, b, t0 + i, h, tx * pk)
                Qd[n, b, h, i, tx] = put(q_at(Q, b, t0 + i, h, tx) * T.exp(run[0]))
            if tx < Kg:
                LD[n, b, h, tx, 0] = T.exp(run[0])
            run[0] = zero
            for i1 in T.unroll(C):
                Ke[n, b, h, C - 1 - i1, tx] = put(k_at(Kx, b, t0 + C - 1 - i1, h, tx) * T.exp(run[0]))
                run[0] = run[0] + load(G, b, t0 + C - 1 - i1, h, tx * pk)

    @T.macro
    def diagonal(Q, Kx, G, KK, A, Xq, oq, Xk, ok, Xc, oc, d, acc, a, n, b, h, tx):
        """Stage row block a's raw q, k rows and gates; its diagonal block of kk and qk, a thread per
        pair, D_ij per channel summed over the pair's own segment (one gate per head: once per pair, the
        dot products then scaled by exp(D_ij)); qk's zeros above it."""
        r = a * S
        t0 = n * C
        ii, jj = tx // S, tx % S               # the thread's pair in a 16 x 16 block
        T.tvm_storage_sync("shared")
        for e in T.unroll(-(-S * K // THREADS)):
            if e * THREADS + tx < S * K:
                Xq[oq + (e * THREADS + tx) // K * P + (e * THREADS + tx) % K] = q_at(
                    Q, b, t0 + r + (e * THREADS + tx) // K, h, (e * THREADS + tx) % K)
                Xk[ok + (e * THREADS + tx) // K * P + (e * THREADS + tx) % K] = k_at(
                    Kx, b, t0 + r + (e * THREADS + tx) // K, h, (e * THREADS + tx) % K)
        for e in T.unroll(-(-S * Kg // THREADS)):
            if e * THREADS + tx < S * Kg:
                Xc[oc + (e * THREADS + tx) // Kg * P + (e * THREADS + tx) % Kg] = load(
                    G, b, t0 + r + (e * THREADS + tx) // Kg, h, (e * THREADS + tx) % Kg)
        T.tvm_storage_sync("shared")
        acc[0] = zero
        acc[1] = zero
        if jj <= ii:
            if pk == 1:
                for c0 in range(K // NL):          # NL channels' sums side by side
                    for u in T.unroll(NL):
                        d[u] = zero
                    for l in T.unroll(S):
                        for u in T.unroll(NL):
                            d[u] = d[u] + T.Select(jj < l and l <= ii, Xc[oc + l * P + c0 * NL + u], zero)
                    for u in T.unroll(NL):
                        d[u] = T.exp(d[u]) * Xk[ok + jj * P + c0 * NL + u]
                        acc[0] = acc[0] + Xk[ok + ii * P + c0 * NL + u] * d[u]
                        acc[1] = acc[1] + Xq[oq + ii * P + c0 * NL + u] * d[u]
            else:                              # one gate per head: the pair's decay once, then dot products
                d[0] = zero
                for l in T.unroll(S):
                    d[0] = d[0] + T.Select(jj < l and l <= ii, Xc[oc + l * P], zero)
                for c0 in range(K // NL):
                    for u in T.unroll(NL):
                        acc[0] = acc[0] + Xk[ok + ii * P + c0 * NL + u] * Xk[ok + jj * P + c0 * NL + u]
                        acc[1] = acc[1] + Xq[oq + ii * P + c0 * NL + u] * Xk[ok + jj * P + c0 * NL + u]
                acc[0] = acc[0] * T.exp(d[0])
                acc[1] = acc[1] * T.exp(d[0])
        KK[(r + ii) * C + r + jj] = acc[0]
        A[n, b, h, r + ii, r + jj] = acc[1]
        for cb in range(a + 1, blocks):          # above the diagonal
            A[n, b, h, r + ii, cb * S + jj] = zero

    @T.macro
    def solve(Kx, Vx, G, Bt, W, U, KK, x, run, n, b, h, tx):
        """W and U by forward substitution, a thread per column, kk read from shared memory. Each
        thread makes its column's right-hand side itself, beta k exp(gam) (the same running sum as
        `operands`) or beta v: written and read back through device memory, W and U's right-hand
        sides were a third of the kernel's traffic. All C of them first, a k column loading k and the
        gates, a v column v alone (the module docstring has what that measured)."""
        t0 = n * C
        kv = T.alloc_local((4,), dtype)
        dot = T.alloc_local((4,), dtype)
        if tx < K:
            run[0] = zero
            for i in T.unroll(C):
                run[0] = run[0] + load(G, b, t0 + i, h, tx * pk)
                x[i] = load(Bt, b, t0 + i, h, 0) * k_at(Kx, b, t0 + i, h, tx) * T.exp(run[0])
        elif tx < K + V:
            for i in T.unroll(C):
                x[i] = load(Bt, b, t0 + i, h, 0) * load(Vx, b, t0 + i, h, tx - K)
        if tx < K + V:
            for i in T.unroll(C):
                # sum_{j < i} kk_ij x_j with kk read four words a load (one 16-byte shared load feeds
                # four products; one word a product, the loads bound the solve), into four partial
                # sums: four independent chains of fused multiply-adds, not one of i
                for u in T.unroll(4):
                    dot[u] = zero
                for j4 in T.unroll(C // 4):    # j < i: constant once unrolled
                    if 4 * j4 < i:
                        kv[T.ramp(0, 1, 4)] = KK[T.ramp(i * C + 4 * j4, 1, 4)]
                        for u in T.unroll(4):
                            if 4 * j4 + u < i:
                                dot[u] = dot[u] + kv[u] * x[4 * j4 + u]
                run[1] = (dot[0] + dot[1]) + (dot[2] + dot[3])
                x[i] = x[i] - (run[1] if scaled_kk else load(Bt, b, t0 + i, h, 0) * run[1])
                if tx < K:
                    W[n, b, h, i, tx] = put(x[i])
                else:
                    U[n, b, h, i, tx - K] = put(x[i])

    return operands, diagonal, solve


def intra_chunk_kernel(R: int, NC: int, HV: int, C: int, K: int, V: int, Kg: int, dtype: str, group: int = 1,
                       scale: float | None = None, narrow: dict | None = None, stored: str = ""):
    """The op's function (fused_signatures.intra_chunk_function) with this kernel's loop nest. group,
    scale: how q and k are read (`loads`); narrow: role -> the dtype of an operand read narrower than
    `dtype` (bf16/fp16 on cuda), widened as it is loaded; stored: as `phases` stores W, U, Qd, Ke."""
    # TVM's script front end here, not at import: `rejects` runs in O2 inside the cuda target's
    # context (passes/fuse_intra_chunk.py), also where only TVM's runtime is installed
    from tvm.script import tirx as T

    from .fused_signatures import intra_chunk_function
    tasks = NC * R * HV
    blocks = C // S
    pk = 1 if Kg == K else 0                   # the gate of channel c: c or 0
    zero = T.cast(0, dtype)
    P = K + 1                                  # a staged row's stride
    NL = math.gcd(K, 4)
    operands, diagonal, solve = phases(C, K, V, Kg, dtype, group, scale, stored=stored)
    q_at, k_at, load = loads(dtype, group, scale)

    def task(t):                               # (chunk, row, head) of block t
        return t // (R * HV), (t // HV) % R, t % HV

    @T.macro
    def body(Q, Kx, Vx, G, Bt, W, U, Qd, A, Ke, LD):
        for bx in T.thread_binding(tasks, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                KK = T.alloc_shared((C * C,), dtype)
                Xq = T.alloc_shared((S * P,), dtype)     # 16 rows of q (raw, then decayed to r)
                Xk = T.alloc_shared((S * P,), dtype)     # 16 rows of k, likewise
                Xc = T.alloc_shared((S * P,), dtype)     # a diagonal block's gates, or 16 columns
                run = T.alloc_local((2,), dtype)        # running sums; the solve's dot product
                d = T.alloc_local((NL,), dtype)
                acc = T.alloc_local((2,), dtype)
                x = T.alloc_local((C,), dtype)
                n, b, h = task(bx)
                t0 = n * C
                ii, jj = tx // S, tx % S               # the thread's pair in a 16 x 16 block
                operands(Q, Kx, Vx, G, Bt, W, U, Qd, Ke, LD, run, n, b, h, tx)
                # 2. the scores, one row block a (rows r .. r + 15) at a time
                for a in range(blocks):
                    r = a * S
                    diagonal(Q, Kx, G, KK, A, Xq, 0, Xk, 0, Xc, 0, d, acc, a, n, b, h, tx)
                    T.tvm_storage_sync("shared")
                    # (none for a = 0: no barrier may sit inside a condition)
                    # rows decayed to r: q_i, k_i exp(sum_{r < l <= i} g), a thread per channel
                    if tx < K:
                        run[0] = zero
                        for i in T.unroll(S):             # unrolled: the loads issue ahead of the sum
                            run[0] = run[0] + T.Select(i > 0, Xc[i * P + tx * pk], zero)
                            # from memory, not the staged rows: a loop that reads and writes a
                            # shared buffer would need a barrier inside this condition
                            Xq[i * P + tx] = q_at(Q, b, t0 + r + i, h, tx) * T.exp(run[0])
                            Xk[i * P + tx] = k_at(Kx, b, t0 + r + i, h, tx) * T.exp(run[0])
                    # column blocks from a - 1 down: k_j exp(sum_{j < l <= r} g), the sum kept
                    # in run[0] by the channel's thread
                    run[0] = zero
                    for cb1 in range(a):
                        cb = a - 1 - cb1
                        T.tvm_storage_sync("shared")
                        if tx < K:
                            for j1 in T.unroll(S):
                                run[0] = run[0] + load(G, b, t0 + cb * S + S - j1, h, tx * pk)
                                Xc[(S - 1 - j1) * P + tx] = k_at(Kx, b, t0 + cb * S + S - 1 - j1, h, tx) * T.exp(
                                    run[0])
                        T.tvm_storage_sync("shared")
                        acc[0] = zero
                        acc[1] = zero
                        for c0 in range(K // NL):
                            for u in T.unroll(NL):
                                acc[0] = acc[0] + Xk[ii * P + c0 * NL + u] * Xc[jj * P + c0 * NL + u]
                                acc[1] = acc[1] + Xq[ii * P + c0 * NL + u] * Xc[jj * P + c0 * NL + u]
                        KK[(r + ii) * C + cb * S + jj] = acc[0]
                        A[n, b, h, r + ii, cb * S + jj] = acc[1]
                T.tvm_storage_sync("shared")
                # 3. W and U by forward substitution, a thread per column
                solve(Kx, Vx, G, Bt, W, U, KK, x, run, n, b, h, tx)
    return intra_chunk_function(R, NC, HV, C, K, V, Kg, dtype, body, group, narrow, stored)
