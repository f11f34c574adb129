"""The work local to each chunk (the fused op `intra_chunk`, dnir/fused.py) as one CPU kernel.

Lowered op by op, this work is some forty kernels over [.., C, C] and, for a gate
per key channel, [.., C, C, K] tensors in memory (the decay of every pair of
tokens on every channel: 1 GiB at T = 4096). Here one parallel task takes one
chunk of one head (R x HV x NC tasks) and keeps everything but the results in
buffers of its own (about 150 KiB: the core's L2), reading q, k, v, g and beta
where the layer has them ([R, Tp, HV, X]) and writing the loop's operands
chunk-major. Per chunk, with gam the running sum of the gates:

 1. gam and the sums from the end (sum_{l > i} g_l), each a running sum of gates;
    q_decayed, k_to_end, last_decay, and W's and U's right-hand sides
    (beta k exp(gam), beta v).
 2. the scores kk = k_i . k_j and qk = q_i . k_j, each channel decayed by
    exp(D_ij), D_ij = sum_{j < l <= i} g_l. One gate per head: two products, then
    each pair scaled, D a running sum down i. A gate per channel: by blocks of BLOCK
    tokens,
    - a diagonal block pair by pair, exp(D_ij) the running product down i of the
      tokens' decays exp(g_l) (factors in (0, 1]; channels in vector lanes);
    - a block a below the diagonal as a product of rescaled operands, r its first
      row: k_i exp(sum_{r < l <= i} g) (rows) and k_j exp(sum_{j < l <= r} g)
      (columns, stored transposed so that columns are vector lanes). Both sums are
      of gates over their own segment, both exponents <= 0: no [C, C, K] tensor,
      and never a difference of prefix sums.
 3. W and U by forward substitution, x_i = rhs_i - beta_i sum_{j < i} kk_ij x_j,
    rows of K and V values in vector lanes, in the output buffers themselves.
 4. Aqk = qk on and below the diagonal.

exp is a polynomial of our own on float32 (vectorised: LLVM's exp intrinsic
becomes one libm call per lane), 2 ulp, 0 below -87.3 (float32's smallest
normal), inf above 88.72, NaN kept.
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from .fused_signatures import intra_chunk_function

BLOCK = 16          # tokens per block of the scores
ROWS = 4            # register tile rows of a block's product (columns: its tokens, vector lanes)
COLUMNS = 32        # a substitution tile's values per row (at most): 2 AVX-512 vectors of float32


def rejects(node, target) -> str | None:
    """None when this kernel runs the intra_chunk `node` on `target`, else why not."""
    dtype = node.inputs[0].dtype
    if target.dtypes is not None and dtype not in target.dtypes:
        return f"the kernel is written for {', '.join(sorted(target.dtypes))}, not {dtype}"
    C = node.attrs["chunk_size"]
    if C % min(BLOCK, C) or C % ROWS:
        return f"chunks of {C} tokens are not whole blocks of {BLOCK}"
    return None


def _exp(x, dtype):
    """exp(x): float32 by range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial there."""
    if dtype != "float32":
        return T.exp(x)
    f = lambda v: T.float32(v)  # noqa: E731
    xc = T.max(T.min(x, f(88.72)), f(-87.33))
    n = T.floor(xc * f(1.44269504088896341) + f(0.5))
    r = xc - n * f(0.693359375) + n * f(2.12194440e-4)
    p = ((((f(1.9875691500e-4) * r + f(1.3981999507e-3)) * r + f(8.3334519073e-3)) * r
          + f(4.1665795894e-2)) * r + f(1.6666665459e-1)) * r + f(5.0000001201e-1)
    p = p * r * r + r + f(1.0)
    # 2^(n - 1) built in the exponent field (n - 1 + 127 in [0, 254]), times 2: n may be 128
    half_scale = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 126, 23))
    value = p * half_scale * f(2.0)
    value = T.Select(x > f(88.7228), T.float32(float("inf")), T.Select(x < f(-87.33), f(0.0), value))
    return T.Select(x != x, x, value)


def intra_chunk_kernel(R: int, NC: int, HV: int, C: int, K: int, V: int, Kg: int, dtype: str):
    """The op's function: q, k [R, Tp, HV, K], v [R, Tp, HV, V], g [R, Tp, HV, Kg], beta
    [R, Tp, HV, 1] -> W, U, Qd, A, Ke, LD (dnir/fused.py's order), chunk-major."""
    tasks = NC * R * HV
    chunk = chunk_macro(C, K, V, Kg, dtype, lambda n, b, h, i, c: (n, b, h, i, c))

    def task(t):                               # (chunk, row, head) of task t
        return t // (R * HV), (t // HV) % R, t % HV

    @T.macro
    def body(Q, Kx, Vx, G, Bt, W, U, Qd, A, Ke, LD):
        for t in T.parallel(tasks):
            n, b, h = task(t)
            chunk(Q, Kx, Vx, G, Bt, W, U, Qd, A, Ke, LD, n, b, h)
    return intra_chunk_function(R, NC, HV, C, K, V, Kg, dtype, body)


def chunk_macro(C: int, K: int, V: int, Kg: int, dtype: str, out, group: int = 1, scale: float | None = None):
    """chunk(Q, Kx, Vx, G, Bt, W, U, Qd, A, Ke, LD, n, b, h): the work of chunk n of row b, head h,
    its results written at out(n, b, h, i, c) (row i, column c; LD's: out(n, b, h, c, 0)): the
    op's chunk-major outputs, or a fused kernel's buffers of one chunk. group: value heads per head
    of Q and Kx (head h reads their head h // group: GQA without repeated copies); scale: q's
    factor, applied to Qd and A here (None: Q is q scaled already)."""
    qh = (lambda h: h) if group == 1 else (lambda h: h // group)  # noqa: E731

    def scaled(x):
        return x if scale is None else x * T.cast(scale, dtype)
    s = min(BLOCK, C)
    blocks = C // s
    per_key = 1 if Kg == K else 0              # the gate of channel c: c or 0
    lanes = math.gcd(K, 16)                    # a dot product's partial sums

    @T.macro
    def reduce_lanes(part):                    # part[0] = the sum of part[:lanes], as a tree
        if lanes >= 16:
            for c in T.vectorized(8):
                part[c] = part[c] + part[c + 8]
        if lanes >= 8:
            for c in T.vectorized(4):
                part[c] = part[c] + part[c + 4]
        if lanes >= 4:
            for c in T.vectorized(2):
                part[c] = part[c] + part[c + 2]
        if lanes >= 2:
            part[0] = part[0] + part[1]
    zero, one = T.cast(0, dtype), T.cast(1, dtype)
    tiny = T.cast(1.1754944e-38, dtype)        # float32's smallest normal: no subnormal products (slow)

    @T.macro
    def substitute(X, width, cols, a, n, b, h):
        """X[n, b, h] = (I + a)^-1 X[n, b, h] (a strictly lower): tiles of ROWS rows x cols
        values, the rows above a tile (final already) subtracted with one vector load per row,
        then the tile's own rows in order."""
        for i0, c0 in T.grid(C // ROWS, width // cols):
            acc = T.alloc_buffer((ROWS, cols), dtype)
            for r in T.unroll(ROWS):
                for c in T.vectorized(cols):
                    acc[r, c] = X[out(n, b, h, i0 * ROWS + r, c0 * cols + c)]
            for j in range(i0 * ROWS):
                for r in T.unroll(ROWS):
                    for c in T.vectorized(cols):
                        acc[r, c] = acc[r, c] - a[i0 * ROWS + r, j] * X[out(n, b, h, j, c0 * cols + c)]
            for r in T.unroll(ROWS):
                for r2 in T.unroll(ROWS):
                    if r2 < r:
                        for c in T.vectorized(cols):
                            acc[r, c] = acc[r, c] - a[i0 * ROWS + r, i0 * ROWS + r2] * acc[r2, c]
                for c in T.vectorized(cols):
                    X[out(n, b, h, i0 * ROWS + r, c0 * cols + c)] = acc[r, c]

    @T.macro
    def chunk(Q, Kx, Vx, G, Bt, W, U, Qd, A, Ke, LD, n, b, h):
        t0 = n * C
        gam = T.alloc_buffer((C, Kg), dtype)       # running sums, then their exps
        after = T.alloc_buffer((C, Kg), dtype)
        kk = T.alloc_buffer((C, C), dtype)
        qk = T.alloc_buffer((C, C), dtype)
        # 1. the gates' running sums and the scaled operands
        for c in T.vectorized(Kg):
            gam[0, c] = G[b, t0, h, c]
            after[C - 1, c] = zero
        for i in range(1, C):
            for c in T.vectorized(Kg):
                gam[i, c] = gam[i - 1, c] + G[b, t0 + i, h, c]
                after[C - 1 - i, c] = after[C - i, c] + G[b, t0 + C - i, h, c]
        for i in range(C):
            for c in T.vectorized(Kg):
                gam[i, c] = _exp(gam[i, c], dtype)
                after[i, c] = _exp(after[i, c], dtype)
        for c in T.vectorized(Kg):
            LD[out(n, b, h, c, 0)] = gam[C - 1, c]
        for i in range(C):
            for c in T.vectorized(K):
                Qd[out(n, b, h, i, c)] = scaled(Q[b, t0 + i, qh(h), c] * gam[i, c * per_key])
                Ke[out(n, b, h, i, c)] = Kx[b, t0 + i, qh(h), c] * after[i, c * per_key]
                W[out(n, b, h, i, c)] = Kx[b, t0 + i, qh(h), c] * Bt[b, t0 + i, h, 0] * gam[i, c * per_key]
            for c in T.vectorized(V):
                U[out(n, b, h, i, c)] = Vx[b, t0 + i, h, c] * Bt[b, t0 + i, h, 0]
        if per_key == 1:
            # 2a. diagonal blocks, pair by pair: exp(D_ij) as the running product down i of
            # the tokens' decays exp(g_l), l in (j, i]: factors in (0, 1], as accurate as the
            # exp of the segment sum (no cancellation, no overflow), without an exp per pair
            step = T.alloc_buffer((C, Kg), dtype)
            for i in range(C):
                for c in T.vectorized(Kg):
                    step[i, c] = _exp(G[b, t0 + i, h, c], dtype)
            for a, jj in T.grid(blocks, s):
                j = a * s + jj
                e = T.alloc_buffer((Kg,), dtype)
                part_q = T.alloc_buffer((lanes,), dtype)
                part_k = T.alloc_buffer((lanes,), dtype)
                for c in T.vectorized(Kg):
                    e[c] = one
                for ii in range(jj, s):
                    i = a * s + ii
                    for c in T.vectorized(Kg):   # (below float32's normals: 0, as _exp)
                        e[c] = e[c] * T.Select(ii > jj, step[i, c], one)
                        e[c] = T.Select(e[c] < tiny, zero, e[c])
                    for c in T.vectorized(lanes):
                        part_q[c] = zero
                        part_k[c] = zero
                    for c0 in range(K // lanes):
                        for c in T.vectorized(lanes):     # (no let here: TVM's vectorizer keeps one lane)
                            part_q[c] = part_q[c] + Q[b, t0 + i, qh(h), c0 * lanes + c] * (
                                Kx[b, t0 + j, qh(h), c0 * lanes + c] * e[(c0 * lanes + c) * per_key])
                            part_k[c] = part_k[c] + Kx[b, t0 + i, qh(h), c0 * lanes + c] * (
                                Kx[b, t0 + j, qh(h), c0 * lanes + c] * e[(c0 * lanes + c) * per_key])
                    # the lanes summed as a tree: log2(lanes) dependent vector adds, not lanes scalar ones
                    reduce_lanes(part_q)
                    reduce_lanes(part_k)
                    qk[i, j] = part_q[0]
                    kk[i, j] = part_k[0]
            # 2b. blocks below the diagonal: rows decayed to the block's first row r, columns from it
            for a in range(1, blocks):
                r = a * s
                rows_q = T.alloc_buffer((s, K), dtype)
                rows_k = T.alloc_buffer((s, K), dtype)
                cols = T.alloc_buffer((K, C), dtype)        # column j: k_j exp(sum_{j < l <= r} g)
                run = T.alloc_buffer((Kg,), dtype)
                for c in T.vectorized(Kg):
                    run[c] = zero
                for ii in range(s):
                    for c in T.vectorized(Kg):
                        run[c] = run[c] + T.Select(ii > 0, G[b, t0 + r + ii, h, c], zero)
                    for c in T.vectorized(K):
                        rows_q[ii, c] = Q[b, t0 + r + ii, qh(h), c] * _exp(run[c * per_key], dtype)
                        rows_k[ii, c] = Kx[b, t0 + r + ii, qh(h), c] * _exp(run[c * per_key], dtype)
                for c in T.vectorized(Kg):
                    run[c] = zero
                for jj in range(r):
                    j = r - 1 - jj
                    for c in T.vectorized(Kg):
                        run[c] = run[c] + G[b, t0 + j + 1, h, c]
                    for c in T.vectorized(K):
                        cols[c, j] = Kx[b, t0 + j, qh(h), c] * _exp(run[c * per_key], dtype)
                for i0, j0 in T.grid(s // ROWS, a):
                    acc_q = T.alloc_buffer((ROWS, s), dtype)
                    acc_k = T.alloc_buffer((ROWS, s), dtype)
                    for ri in T.unroll(ROWS):
                        for jl in T.vectorized(s):
                            acc_q[ri, jl] = zero
                            acc_k[ri, jl] = zero
                    for c in range(K):
                        for ri in T.unroll(ROWS):
                            for jl in T.vectorized(s):
                                acc_q[ri, jl] = acc_q[ri, jl] + rows_q[i0 * ROWS + ri, c] * cols[c, j0 * s + jl]
                                acc_k[ri, jl] = acc_k[ri, jl] + rows_k[i0 * ROWS + ri, c] * cols[c, j0 * s + jl]
                    for ri in T.unroll(ROWS):
                        for jl in T.vectorized(s):
                            qk[r + i0 * ROWS + ri, j0 * s + jl] = acc_q[ri, jl]
                            kk[r + i0 * ROWS + ri, j0 * s + jl] = acc_k[ri, jl]
        else:
            # one gate per head: the plain products k_i . k_j and q_i . k_j (columns from k
            # transposed, vector lanes), then each pair scaled by exp(D_ij), D a running sum
            # down i of every column j < i at once
            kt = T.alloc_buffer((K, C), dtype)
            seg = T.alloc_buffer((C,), dtype)
            for j, c in T.grid(C, K):
                kt[c, j] = Kx[b, t0 + j, qh(h), c]
            for i0, j0 in T.grid(C // ROWS, C // s):
                if j0 * s < (i0 + 1) * ROWS:
                    acc_q = T.alloc_buffer((ROWS, s), dtype)
                    acc_k = T.alloc_buffer((ROWS, s), dtype)
                    for ri in T.unroll(ROWS):
                        for jl in T.vectorized(s):
                            acc_q[ri, jl] = zero
                            acc_k[ri, jl] = zero
                    for c in range(K):
                        for ri in T.unroll(ROWS):
                            for jl in T.vectorized(s):
                                acc_q[ri, jl] = acc_q[ri, jl] + Q[b, t0 + i0 * ROWS + ri, qh(h), c] * kt[c, j0 * s + jl]
                                acc_k[ri, jl] = acc_k[ri, jl] + Kx[b, t0 + i0 * ROWS + ri, qh(h), c] * kt[c, j0 * s + jl]
                    for ri in T.unroll(ROWS):
                        for jl in T.vectorized(s):
                            qk[i0 * ROWS + ri, j0 * s + jl] = acc_q[ri, jl]
                            kk[i0 * ROWS + ri, j0 * s + jl] = acc_k[ri, jl]
            for j in T.vectorized(C):
                seg[j] = zero
            for i in range(C):
                for j in T.vectorized(C):
                    seg[j] = seg[j] + T.Select(j < i, G[b, t0 + i, h, 0], zero)
                    qk[i, j] = qk[i, j] * _exp(seg[j], dtype)
                    kk[i, j] = kk[i, j] * _exp(seg[j], dtype)
        # 3. W and U: (I + beta kk) x = rhs, in the outputs, by tiles of ROWS rows
        for i, j in T.grid(C, C):
            kk[i, j] = Bt[b, t0 + i, h, 0] * kk[i, j]
        substitute(W, K, math.gcd(K, COLUMNS), kk, n, b, h)
        substitute(U, V, math.gcd(V, COLUMNS), kk, n, b, h)
        # 4. Aqk: on and below the diagonal
        for i in range(C):
            for j in T.vectorized(C):
                A[out(n, b, h, i, j)] = T.Select(j <= i, scaled(qk[i, j]), zero)
    return chunk
