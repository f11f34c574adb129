"""intra_chunk (dnir/fused.py) with its scores on tensor cores (mma.py, 3xTF32 by default).

The same thread block as intra_chunk.py's kernel (256 threads, one chunk of one head,
the same six results). Step 2, the scores kk and qk, runs as mma tiles of 16 rows x 8
columns, eight warps taking an equal share of them. Steps 1 and 3 are intra_chunk.phases'
for a gate per key channel; with one gate per head both change (below). The sum over
the K channels runs a quarter (KQ channels) at a time: the block stages that quarter's
operands into shared memory (rows padded to KQ + 4 words, so that a warp's fragment
loads hit 32 banks) and every warp adds its tiles' products.

- One gate per head (Kg = 1): the decay of a pair is one scalar, so the scores are
  kk = (k k^T) o E and qk = (q k^T) o E with E_ij = exp(D_ij), D_ij = sum_{j < l <= i} g,
  0 above the diagonal. The products take the raw q and k: warp w the 16 rows of block
  w % 4 of kk (w < 4) or qk against the k rows up to the end of that block (`row_products`);
  E is a [C, C] table computed once, a thread per row and 16-column block summing its gates
  down from the row (each D_ij a sum over its own segment), in the space kk takes afterwards.
- A gate per key channel (Kg = K): below the diagonal as intra_chunk.py does it, rows of
  row block a decayed to r = 16 a and columns before r decayed from r, both by sums over
  their own segments, now staged for all three row blocks at once (a warp per role: the
  rows of one block, or the columns of one) and multiplied on tensor cores (warp w: the rows
  of block w % 4, of kk or qk, against the columns before it). The diagonal blocks, whose
  decay differs per channel and pair, on CUDA cores by halving (`diagonal_by_halves`): every
  pair of a block lies in one pair of sub-blocks of 8, 4, 2 or 1 tokens whose boundary splits
  its decay, so rows and columns staged decayed to that boundary (at most 8 gates summed
  each) leave plain products, a thread per pair, no exp and no per-pair gate sums in the
  channel loop (intra_chunk.py's thread per pair sums 16 masked gates per channel).

One gate per head, steps 1 and 3:

- q_decayed and k_to_end are q's and k's rows times e^gam_t and e^(sum_{l > t} g): a table of
  the 2 C factors, a thread each, then a thread per channel of every row (`operands_by_rows`).
- W and U, X = (I + L)^-1 R with L = beta kk strictly below the diagonal, by 16 x 16 blocks on
  tensor cores (`solve_by_blocks`): X_a = M_a (R_a - sum_{c < a} L_ac X_c), M_a the inverse of
  I + L_aa (CUDA cores, a thread per column of each of the four), every product an mma and
  only the blocks on and below the diagonal: 10 of the 16. A warp holds 16 columns of X for
  all 64 tokens in its accumulators, computed transposed, so that X_c is the left operand of
  the next row block's products straight from the registers that computed it (`a_of_d`).
  intra_chunk.phases' thread per column runs 64 dependent steps of up to 64 fused multiply-adds.

Every exponent stays a sum of gates of one sign over its own segment: finite and exact to
rounding however strong the gates. Shared memory: kk [C, C] and the staging buffer (KDA:
192 rows of KQ + 4 words, the halving's gates beside; GDA: 128): 44 KiB at K = 128.
"""
from __future__ import annotations

from tvm.script import tirx as T

from . import mma
from .intra_chunk import S, THREADS, loads, phases

WARPS = THREADS // 32
KQ = 32                     # channels staged at once
P = KQ + 4                  # a staged row's stride: fragment loads at 4 g + t, no bank conflict
SPLIT = True                # 3xTF32 unless the layer's precision is "tf32" (translate.py passes split)
HALVING = True              # KDA's diagonal blocks by halving (benchmarks/gpu_sweep.py times the other way)
EC = 8                      # channels a round of the halving stages
PE = EC + 1
TENSOR_SOLVE = True         # one gate per head: W and U by 16 x 16 blocks on tensor cores (`solve_by_blocks`)
ROW_OPERANDS = True         # one gate per head: q_decayed and k_to_end as scaled rows (`operands_by_rows`)


def z_at(C: int, c, ks, a, nt, lane, e):
    """Where in Z (`solve_by_blocks`) element e of the B fragment of k-step ks (tokens 8 ks.. of
    column block c) and n-tile nt (tokens 8 nt.. of row block a) lies: Z[j, i] at j (C + 4) + i, row j
    the fragment's token 2 t + e (see `a_of_d`), column i its token g."""
    return (S * c + 8 * ks + 2 * (lane % 4) + e) * (C + 4) + S * a + 8 * nt + lane // 4


def a_of_d(i):
    """The accumulator element (mma.d_at) that element i of an A fragment (mma.a_at) takes when a
    tile of 16 channels x 8 tokens, a product's result, is the left operand of the next product: A's
    column t is the tile's token 2 t, its column t + 4 the token 2 t + 1 (the B operand's rows are
    read in that order too, z_at), so each lane's own registers feed the next product."""
    return 2 * (i % 2) + i // 2


def takes(C: int, K: int, V: int) -> bool:
    """Whether the kernel takes these sizes: 64-token chunks (the tile shares are made for four row
    blocks), whole quarters of K channels, a thread per column of the solve, the diagonal's stages
    within the staging buffer."""
    return C == 4 * S and K % KQ == 0 and K <= 128 and K + V <= THREADS


def chosen(C: int, K: int, V: int, Kg: int) -> bool:
    """Whether the cuda target runs intra_chunk with this kernel: wherever it takes the sizes. On an H100
    at (1, 8192, 32, 128), 2 blocks an SM: a gate per key channel 0.914 ms at TF32 against 2.04 ms for
    intra_chunk.py's kernel; one gate per head, its products by rows of tiles, 0.541 ms at TF32 and
    0.567 at 3xTF32 (the same accuracy as intra_chunk.py's exact kernel, 1.8e-6 apart) against 0.942
    (benchmarks/results/gpu_sweep_rows.md)."""
    return takes(C, K, V)


def _pick(index, values):
    """values[index] for a run-time index: a chain of selects over the table."""
    out = values[-1]
    for i in range(len(values) - 2, -1, -1):
        out = T.Select(index == i, values[i], out)
    return out


def intra_chunk_mma_kernel(R: int, NC: int, HV: int, C: int, K: int, V: int, Kg: int, dtype: str, group: int = 1,
                           scale: float | None = None, narrow: dict | None = None, split: bool = SPLIT,
                           halving: bool = HALVING, decayed: bool = False, skip: tuple = (), stored: str = "",
                           tensor_solve: bool = TENSOR_SOLVE, row_operands: bool = ROW_OPERANDS):
    """The op's function (fused_signatures.intra_chunk_function) with its scores on tensor cores; group,
    scale and narrow: how the operands are read, as intra_chunk.intra_chunk_kernel's. halving: KDA's
    diagonal blocks by halving (`diagonal_by_halves`) rather than by intra_chunk.phases' `diagonal`.
    decayed: one gate per head through the per-channel path (decayed rows and columns, halving).
    skip: steps left out ("operands", "scores", "diagonals", "solve"), wrong results, for timing what
    each step costs (benchmarks/gpu_sweep.py). stored: as intra_chunk.phases stores W, U, Qd, Ke.
    tensor_solve: one gate per head, W and U by `solve_by_blocks` rather than intra_chunk.phases'
    thread per column. row_operands: one gate per head, q_decayed and k_to_end by `operands_by_rows`
    rather than intra_chunk.phases' thread per channel."""
    from .kernels import converted
    from .fused_signatures import intra_chunk_function
    tasks = NC * R * HV
    blocks = C // S
    per_key = Kg == K or decayed
    gk = 1 if Kg == K else 0                   # the gate of channel c: c or 0
    # warp w takes the 16 rows of block a = w % 4 of kk (w < 4) or qk, as a row of 8-column tiles: per
    # head against every k row up to the end of that block, per key channel against the columns before it
    NT = C // mma.N if not per_key else (blocks - 1) * S // mma.N
    assert WARPS == 2 * blocks
    zero = T.cast(0, dtype)
    # kk is stored times beta_i (one product less in the solve's inner loop) unless intra_chunk.phases'
    # `diagonal` writes part of it
    scaled = not (per_key and not halving)
    operands, diagonal, solve = phases(C, K, V, Kg, dtype, group, scale, scaled_kk=scaled, stored=stored)
    q_at, k_at, load = loads(dtype, group, scale)
    upper = [(a, b) for a in range(blocks) for b in range(a + 1, blocks)]
    # KDA's staging buffer: q rows of blocks 1..3 decayed to their r, then k rows, then the columns
    # before each r decayed from it (r of them for block a, at col_start(a))
    def col_start(a):                          # a: a row block, or a run-time expression of one
        return 2 * (blocks - 1) * S + S * a * (a - 1) // 2
    col0 = [col_start(a) for a in range(blocks)]
    rows = (col0[-1] + (blocks - 1) * S) if per_key else 2 * C
    words = max(rows * P, 3 * S * (K + 1), 8 * C * PE) if per_key else rows * P
    by_blocks = tensor_solve and Kg == 1 and scaled
    ZP = C + 4                                 # Z's row stride: a B fragment's loads hit 32 banks (z_at)
    zf = C * ZP                                # the right-hand sides' factors after Z: beta e^gam, then beta
    MT = -(-(K + V) // mma.M)                  # tiles of 16 columns of [W | U]
    if by_blocks:
        words = max(words, zf + 2 * C)

    def task(t):
        return t // (R * HV), (t // HV) % R, t % HV

    def a_base(w):                             # the staged row of warp w's left operand's first row
        if per_key:                            # q rows of blocks 1.. decayed to their r, then the k rows
            return ((1 - w // blocks) * (blocks - 1) + w % blocks - 1) * S
        return w // blocks * C + w % blocks * S          # k rows, then q rows

    def b_base(w):                             # the staged row of warp w's first column
        return col_start(w % blocks) if per_key else 0

    def tile_used(w, j):                       # (warp-uniform) tile j holds columns the warp's rows need
        return j * mma.N < (w % blocks + (0 if per_key else 1)) * S

    def tile_stored(w, j):                     # per head every tile: qk's zeros above the diagonal too
        return tile_used(w, j) if per_key else j * mma.N < C

    def row_at(w, lane, j, i):                 # (row, column) in the chunk of warp w's element i of tile j
        return w % blocks * S + mma.d_at(lane, i)[0], j * mma.N + mma.d_at(lane, i)[1]

    @T.macro
    def products(X, acc, fa, fb, w, lane):
        """acc += warp w's row of tiles over the staged quarter of channels. The number of tiles a warp
        uses is warp-uniform and each tile's accumulators sit at fixed registers: a table of (warp,
        tile) pairs picked at run time cost ten times the products' instructions in branches and moves."""
        for k8 in T.unroll(KQ // mma.K8):
            for i in T.unroll(4):
                fa[i] = X[(a_base(w) + mma.a_at(lane, i)[0]) * P + k8 * mma.K8 + mma.a_at(lane, i)[1]]
                fa[4 + i] = mma.low_part(fa[i])
            for j in T.unroll(NT):
                if tile_used(w, j):
                    for i in T.unroll(2):      # B = the staged columns transposed
                        fb[i] = X[(b_base(w) + j * mma.N + mma.b_at(lane, i)[1]) * P + k8 * mma.K8
                                  + mma.b_at(lane, i)[0]]
                        fb[2 + i] = mma.low_part(fb[i])
                    mma.mma(acc, 4 * j, fa, fb, split)

    def kk_value(x, Bt, b, n, h, i):          # what KK holds for kk_ij = x
        return x * load(Bt, b, n * C + i, h, 0) if scaled else x

    @T.macro
    def store(KK, A, Bt, acc, n, b, h, w, lane):
        """kk's tiles into KK, qk's into A (warp-uniform choice); per head whole rows, qk's zeros above
        the diagonal too."""
        for j in T.unroll(NT):
            for i in T.unroll(4):
                if tile_stored(w, j):
                    if w < blocks:
                        KK[row_at(w, lane, j, i)[0] * C + row_at(w, lane, j, i)[1]] = kk_value(
                            acc[4 * j + i], Bt, b, n, h, row_at(w, lane, j, i)[0])
                    else:
                        A[n, b, h, row_at(w, lane, j, i)[0], row_at(w, lane, j, i)[1]] = acc[4 * j + i]

    @T.macro
    def upper_zeros(A, n, b, h, tx):
        """qk's 16 x 16 blocks above the diagonal."""
        for e in T.unroll(len(upper)):
            A[n, b, h, _pick(e, [a for a, _ in upper]) * S + tx // S,
              _pick(e, [c for _, c in upper]) * S + tx % S] = zero

    @T.macro
    def fetch_rows(Q, Kx, pf, kq, n, b, h, tx):
        """pf = the thread's k and q of quarter kq (tokens (e THREADS + tx) // KQ, channel % KQ)."""
        for e in T.unroll(C * KQ // THREADS):
            pf[2 * e] = k_at(Kx, b, n * C + (e * THREADS + tx) // KQ, h, kq * KQ + (e * THREADS + tx) % KQ)
            pf[2 * e + 1] = q_at(Q, b, n * C + (e * THREADS + tx) // KQ, h, kq * KQ + (e * THREADS + tx) % KQ)

    @T.macro
    def scores_per_head(Q, Kx, G, Bt, KK, A, X, Y, run, d, pf, acc, fa, fb, n, b, h, tx):
        """One gate per head: the ten blocks' raw products on tensor cores, times E (Y: the gates)."""
        if tx < C:
            Y[tx] = load(G, b, n * C + tx, h, 0)
        T.tvm_storage_sync("shared")
        # E into KK: thread (row i = tx // blocks, column block tx % blocks), D summed down from i
        run[0] = zero
        for l in T.unroll(C):                  # unrolled: the loads issue ahead of the sum
            run[0] = run[0] + T.Select(tx % blocks * S + S <= l and l <= tx // blocks, Y[l], zero)
        for j1 in T.unroll(S):
            KK[tx // blocks * C + tx % blocks * S + S - 1 - j1] = T.Select(
                tx % blocks * S + S - 1 - j1 <= tx // blocks, T.exp(run[0]), zero)
            run[0] = run[0] + T.Select(tx % blocks * S + S - 1 - j1 <= tx // blocks,
                                       Y[tx % blocks * S + S - 1 - j1], zero)
        for i in T.unroll(4 * NT):
            acc[i] = zero
        fetch_rows(Q, Kx, pf, 0, n, b, h, tx)
        for kq in range(K // KQ):
            T.tvm_storage_sync("shared")
            for e in T.unroll(C * KQ // THREADS):   # k rows, then q rows
                for r in T.unroll(2):
                    X[(r * C + (e * THREADS + tx) // KQ) * P + (e * THREADS + tx) % KQ] = pf[2 * e + r]
            T.tvm_storage_sync("shared")
            fetch_rows(Q, Kx, pf, T.min(kq + 1, K // KQ - 1), n, b, h, tx)   # the next quarter's, meanwhile
            products(X, acc, fa, fb, tx // 32, tx % 32)
        for j in T.unroll(NT):                 # times E, which is 0 above the diagonal
            for i in T.unroll(4):
                acc[4 * j + i] = acc[4 * j + i] * KK[row_at(tx // 32, tx % 32, j, i)[0] * C
                                                     + row_at(tx // 32, tx % 32, j, i)[1]]
        T.tvm_storage_sync("shared")          # every E read before kk takes its place
        store(KK, A, Bt, acc, n, b, h, tx // 32, tx % 32)

    @T.macro
    def stage_decayed(Q, Kx, G, X, run, kq, n, b, h, tx):
        """Channel kq KQ + tx % KQ of the quarter, role tx // KQ (a warp): rows of block a = role + 1
        decayed to r = 16 a (q at (a - 1) 16, k after all q rows), or (role - 3) the columns before
        r = 16 (role - 2) decayed from r, at col0."""
        if tx // KQ < blocks - 1:
            run[0] = zero
            for i in T.unroll(S):
                run[0] = run[0] + T.Select(
                    i > 0, load(G, b, n * C + (tx // KQ + 1) * S + i, h, (kq * KQ + tx % KQ) * gk), zero)
                X[(tx // KQ * S + i) * P + tx % KQ] = q_at(
                    Q, b, n * C + (tx // KQ + 1) * S + i, h, kq * KQ + tx % KQ) * T.exp(run[0])
                X[((blocks - 1 + tx // KQ) * S + i) * P + tx % KQ] = k_at(
                    Kx, b, n * C + (tx // KQ + 1) * S + i, h, kq * KQ + tx % KQ) * T.exp(run[0])
        elif tx // KQ < 2 * (blocks - 1):
            run[0] = zero
            for j1 in T.unroll((blocks - 1) * S):   # j = r - 1 - j1 while j1 < r; loads clamped to the chunk
                run[0] = run[0] + T.Select(j1 < (tx // KQ - blocks + 2) * S, load(
                    G, b, n * C + T.max((tx // KQ - blocks + 2) * S - j1, 0), h, (kq * KQ + tx % KQ) * gk), zero)
                if j1 < (tx // KQ - blocks + 2) * S:
                    X[(_pick(tx // KQ - blocks + 2, col0) + (tx // KQ - blocks + 2) * S - 1 - j1) * P + tx % KQ] = k_at(
                        Kx, b, n * C + T.max((tx // KQ - blocks + 2) * S - 1 - j1, 0), h,
                        kq * KQ + tx % KQ) * T.exp(run[0])

    # The diagonal blocks by halving: a pair i > j of one 16-token block lies in exactly one pair of
    # sub-blocks (2v + 1, 2v) of size s = 8, 4, 2 or 1, whose boundary (2v + 1) s splits its decay:
    # D_ij = sum_{j < l <= (2v+1)s} g + sum_{(2v+1)s < l <= i} g. Per level, every token's k and q are
    # staged decayed to its sub-block's boundary (from it in an odd sub-block, to it in an even one:
    # at most s gates, each a sum over its own segment), and a thread per pair adds plain products;
    # EC channels a round. X rows: level L's k at 2 C L + t, q at 2 C L + C + t. Y rows: the round's
    # gates (one spare row: an odd sub-block's last sum reads past), raw k at C + 1 + t, raw q at 2 C + 1 + t.
    def sub_pair(sz, q):                       # (i, j) of pair q of level sz: sz x sz pairs per sub-block pair
        return (2 * (q // (sz * sz)) + 1) * sz + q % (sz * sz) // sz, 2 * (q // (sz * sz)) * sz + q % sz

    @T.macro
    def level_rows(sz, L, Q, Kx, X, Y, run, cg, n, b, h, tx):
        for e in T.unroll(C * EC // THREADS):
            run[0] = zero
            for m in T.unroll(sz):             # l = base + m + 1: (t, base + sz] if even, (base, t] if odd
                run[0] = run[0] + T.Select(
                    ((e * THREADS + tx) // EC // sz % 2 == 1) == ((e * THREADS + tx) // EC // sz * sz + m + 1
                                                                   <= (e * THREADS + tx) // EC),
                    Y[((e * THREADS + tx) // EC // sz * sz + m + 1) * PE + (e * THREADS + tx) % EC], zero)
            X[(2 * C * L + (e * THREADS + tx) // EC) * PE + (e * THREADS + tx) % EC] = Y[
                (C + 1 + (e * THREADS + tx) // EC) * PE + (e * THREADS + tx) % EC] * T.exp(run[0])
            X[(2 * C * L + C + (e * THREADS + tx) // EC) * PE + (e * THREADS + tx) % EC] = Y[
                (2 * C + 1 + (e * THREADS + tx) // EC) * PE + (e * THREADS + tx) % EC] * T.exp(run[0])

    @T.macro
    def pair_dot(sz, L, q, X, dg, o):
        for c in T.unroll(EC):
            dg[o] = dg[o] + X[(2 * C * L + sub_pair(sz, q)[0]) * PE + c] * X[(2 * C * L + sub_pair(sz, q)[1]) * PE + c]
            dg[o + 1] = dg[o + 1] + X[(2 * C * L + C + sub_pair(sz, q)[0]) * PE + c] * X[
                (2 * C * L + sub_pair(sz, q)[1]) * PE + c]

    @T.macro
    def pair_store(sz, q, KK, A, Bt, dg, o, n, b, h):
        KK[sub_pair(sz, q)[0] * C + sub_pair(sz, q)[1]] = kk_value(dg[o], Bt, b, n, h, sub_pair(sz, q)[0])
        A[n, b, h, sub_pair(sz, q)[0], sub_pair(sz, q)[1]] = dg[o + 1]
        A[n, b, h, sub_pair(sz, q)[1], sub_pair(sz, q)[0]] = zero

    @T.macro
    def fetch(Q, Kx, G, pf, cg, n, b, h, tx):
        """pf = the thread's gates, k and q of round cg (tokens (e THREADS + tx) // EC, channel % EC)."""
        for e in T.unroll(C * EC // THREADS):
            pf[3 * e] = load(G, b, n * C + (e * THREADS + tx) // EC, h, (cg * EC + (e * THREADS + tx) % EC) * gk)
            pf[3 * e + 1] = k_at(Kx, b, n * C + (e * THREADS + tx) // EC, h, cg * EC + (e * THREADS + tx) % EC)
            pf[3 * e + 2] = q_at(Q, b, n * C + (e * THREADS + tx) // EC, h, cg * EC + (e * THREADS + tx) % EC)

    @T.macro
    def diagonal_by_halves(Q, Kx, G, Bt, KK, A, X, Y, run, dg, pf, n, b, h, tx):
        """kk and qk of the four diagonal blocks (and qk's zeros above them); the thread's pairs: q = tx of
        level 8 (256 pairs), then tx < 128: level 4, < 192: level 2, < 224: level 1, else qk_tt of
        t = tx - 224 and t + 32."""
        for i in T.unroll(4):
            dg[i] = zero
        fetch(Q, Kx, G, pf, 0, n, b, h, tx)
        for cg in range(K // EC):
            T.tvm_storage_sync("shared")
            for e in T.unroll(C * EC // THREADS):
                for r in T.unroll(3):          # the gates, raw k, raw q at rows 0, C + 1, 2 C + 1
                    Y[(r * (C + 1) - r // 2 + (e * THREADS + tx) // EC) * PE + (e * THREADS + tx) % EC] = pf[3 * e + r]
            T.tvm_storage_sync("shared")
            fetch(Q, Kx, G, pf, T.min(cg + 1, K // EC - 1), n, b, h, tx)   # the next round's, while this one runs
            level_rows(8, 0, Q, Kx, X, Y, run, cg, n, b, h, tx)
            level_rows(4, 1, Q, Kx, X, Y, run, cg, n, b, h, tx)
            level_rows(2, 2, Q, Kx, X, Y, run, cg, n, b, h, tx)
            level_rows(1, 3, Q, Kx, X, Y, run, cg, n, b, h, tx)
            T.tvm_storage_sync("shared")
            pair_dot(8, 0, tx, X, dg, 0)
            if tx < 128:
                pair_dot(4, 1, tx, X, dg, 2)
            elif tx < 192:
                pair_dot(2, 2, tx - 128, X, dg, 2)
            elif tx < 224:
                pair_dot(1, 3, tx - 192, X, dg, 2)
            else:
                for c in T.unroll(EC):
                    dg[2] = dg[2] + Y[(2 * C + 1 + tx - 224) * PE + c] * Y[(C + 1 + tx - 224) * PE + c]
                    dg[3] = dg[3] + Y[(2 * C + 1 + tx - 192) * PE + c] * Y[(C + 1 + tx - 192) * PE + c]
        T.tvm_storage_sync("shared")          # Y may share its memory with KK
        pair_store(8, tx, KK, A, Bt, dg, 0, n, b, h)
        if tx < 128:
            pair_store(4, tx, KK, A, Bt, dg, 2, n, b, h)
        elif tx < 192:
            pair_store(2, tx - 128, KK, A, Bt, dg, 2, n, b, h)
        elif tx < 224:
            pair_store(1, tx - 192, KK, A, Bt, dg, 2, n, b, h)
        else:
            A[n, b, h, tx - 224, tx - 224] = dg[2]
            A[n, b, h, tx - 192, tx - 192] = dg[3]
        upper_zeros(A, n, b, h, tx)

    @T.macro
    def diagonals_by_threads(Q, Kx, G, Bt, KK, A, X, Y, run, d, pf, acc, n, b, h, tx):
        for a in range(blocks):                # a thread per pair (intra_chunk.phases)
            diagonal(Q, Kx, G, KK, A, X, 0, X, S * (K + 1), X, 2 * S * (K + 1), d, acc, a, n, b, h, tx)

    @T.macro
    def diagonals_by_halves(Q, Kx, G, Bt, KK, A, X, Y, run, d, pf, acc, n, b, h, tx):
        diagonal_by_halves(Q, Kx, G, Bt, KK, A, X, Y, run, d, pf, n, b, h, tx)

    diagonals = diagonals_by_halves if halving else diagonals_by_threads

    @T.macro
    def no_diagonals(Q, Kx, G, Bt, KK, A, X, Y, run, d, pf, acc, n, b, h, tx):
        T.evaluate(0)

    diagonals = no_diagonals if "diagonals" in skip else diagonals

    @T.macro
    def scores_per_key(Q, Kx, G, Bt, KK, A, X, Y, run, d, pf, acc, fa, fb, n, b, h, tx):
        """A gate per key channel: the diagonal blocks, then the six below them on tensor cores."""
        diagonals(Q, Kx, G, Bt, KK, A, X, Y, run, d, pf, acc, n, b, h, tx)
        for i in T.unroll(4 * NT):
            acc[i] = zero
        for kq in range(K // KQ):
            T.tvm_storage_sync("shared")
            stage_decayed(Q, Kx, G, X, run, kq, n, b, h, tx)
            T.tvm_storage_sync("shared")
            products(X, acc, fa, fb, tx // 32, tx % 32)
        store(KK, A, Bt, acc, n, b, h, tx // 32, tx % 32)

    scores = scores_per_key if per_key else scores_per_head

    @T.macro
    def no_scores(Q, Kx, G, Bt, KK, A, X, Y, run, d, pf, acc, fa, fb, n, b, h, tx):
        T.evaluate(0)

    @T.macro
    def gate_sum(G, run, n, b, h, t, through):
        """run[0] = the sum of chunk n's gates g_l over l <= t (through) or over l > t: each token's
        exponent a sum over its own segment (one gate per head)."""
        run[0] = zero
        for l in T.unroll(C):
            run[0] = run[0] + T.Select((l <= t) == through, load(G, b, n * C + l, h, 0), zero)

    @T.macro
    def operands_by_rows(Q, Kx, Vx, G, Bt, W, U, Qd, Ke, LD, X, run, n, b, h, tx):
        """One gate per head: q_decayed and k_to_end are q's and k's rows scaled by e^gam_t and
        e^(sum_{l > t} g_l): a table of both (a thread per token and factor, each exponent a sum over its
        own segment) in X, which the scores stage into only after a barrier, then every row a thread per
        channel: consecutive threads, consecutive channels (intra_chunk.phases' thread per channel runs
        down its column, a running sum and an exp a token, half the block idle)."""
        if tx < 2 * C:                         # tx < C: l <= t; else l > t (t = tx - C)
            gate_sum(G, run, n, b, h, tx % C, tx < C)
            X[tx] = T.exp(run[0])
            if tx == C - 1:
                LD[n, b, h, 0, 0] = T.exp(run[0])
        T.tvm_storage_sync("shared")
        for e in T.unroll(C * K // THREADS):
            Qd[n, b, h, (e * THREADS + tx) // K, (e * THREADS + tx) % K] = converted(q_at(
                Q, b, n * C + (e * THREADS + tx) // K, h, (e * THREADS + tx) % K) * X[(e * THREADS + tx) // K],
                dtype, stored or dtype)
            Ke[n, b, h, (e * THREADS + tx) // K, (e * THREADS + tx) % K] = converted(k_at(
                Kx, b, n * C + (e * THREADS + tx) // K, h, (e * THREADS + tx) % K) * X[C + (e * THREADS + tx) // K],
                dtype, stored or dtype)

    @T.macro
    def operands_by_channels(Q, Kx, Vx, G, Bt, W, U, Qd, Ke, LD, X, run, n, b, h, tx):
        operands(Q, Kx, Vx, G, Bt, W, U, Qd, Ke, LD, run, n, b, h, tx)

    @T.macro
    def no_operands(Q, Kx, Vx, G, Bt, W, U, Qd, Ke, LD, X, run, n, b, h, tx):
        T.evaluate(0)

    @T.macro
    def block_inverses(G, Bt, KK, X, m, run, n, b, h, tx):
        """Z's blocks (X[0:zf]; Z[j, i] at j ZP + i): -kk_ij (beta_i kk_ij) below the diagonal blocks, each
        diagonal block the inverse M_a of I + its kk (a thread per column: forward substitution; M_a[i, j]
        at Z[j, i]); after Z, beta e^gam and beta per token."""
        for a1 in T.unroll(blocks - 1):
            for c in T.unroll(blocks - 1):
                if c <= a1:
                    X[(S * c + tx % S) * ZP + S * (a1 + 1) + tx // S] = -KK[(S * (a1 + 1) + tx // S) * C
                                                                            + S * c + tx % S]
        if tx < C:                             # column tx % S of M_a, a = tx // S
            for i in T.unroll(S):
                run[1] = zero
                for l in T.unroll(S):
                    if l < i:
                        run[1] = run[1] + KK[(tx // S * S + i) * C + tx // S * S + l] * m[l]
                m[i] = T.Select(i == tx % S, T.cast(1, dtype), T.Select(i > tx % S, -run[1], zero))
                X[(tx // S * S + tx % S) * ZP + tx // S * S + i] = m[i]
        elif tx < 2 * C:                       # token tx - C's factors
            gate_sum(G, run, n, b, h, tx - C, True)
            X[zf + tx - C] = load(Bt, b, n * C + tx - C, h, 0) * T.exp(run[0])
            X[zf + tx] = load(Bt, b, n * C + tx - C, h, 0)

    def tile(mi, tx):                          # the warp's mi-th tile of 16 columns of [W | U]
        return tx // 32 + WARPS * mi

    def rhs(Kx, Vx, X, mt, n, b, h, token, col):   # W's or U's right-hand side at (token, column)
        t = n * C + token
        if (K + V) % mma.M:                    # a last tile past U's columns: zeros there
            return T.if_then_else(col < K, X[zf + token] * k_at(Kx, b, t, h, T.min(col, K - 1)),
                                  T.if_then_else(col < K + V, X[zf + C + token] * load(
                                      Vx, b, t, h, T.min(T.max(col - K, 0), V - 1)), zero))
        return T.if_then_else(mt * mma.M < K, X[zf + token] * k_at(Kx, b, t, h, T.min(col, K - 1)),
                              X[zf + C + token] * load(Vx, b, t, h, T.max(col - K, 0)))

    @T.macro
    def solve_by_blocks(Kx, Vx, G, Bt, W, U, KK, X, m, xs, ys, fa, fb, run, n, b, h, tx):
        """W and U, X = (I + L)^-1 R, on tensor cores by 16 x 16 blocks: X_a = M_a (R_a - sum_{c < a}
        L_ac X_c), only the blocks on and below the diagonal. Computed transposed, a warp's tile of 16
        columns by the chunk's 64 tokens in its registers, so that X_c, a result, is the left operand
        of the next row block's products without a move (a_of_d); Z holds -L^T and M_a^T."""
        block_inverses(G, Bt, KK, X, m, run, n, b, h, tx)
        T.tvm_storage_sync("shared")
        for mi in T.unroll(-(-MT // WARPS)):
            if tile(mi, tx) * mma.M < K + V:        # warp-uniform: columns 16 mt.. of [W | U]
                for a in T.unroll(blocks):
                    for nt in T.unroll(2):
                        for i in T.unroll(4):
                            ys[4 * nt + i] = rhs(Kx, Vx, X, tile(mi, tx), n, b, h,
                                                 S * a + 8 * nt + mma.d_at(tx % 32, i)[1],
                                                 tile(mi, tx) * mma.M + mma.d_at(tx % 32, i)[0])
                    for c in T.unroll(blocks - 1):             # ys -= X_c L_ac^T
                        if c < a:
                            for ks in T.unroll(2):
                                for i in T.unroll(4):
                                    fa[i] = xs[4 * (2 * c + ks) + a_of_d(i)]
                                    fa[4 + i] = mma.low_part(fa[i])
                                for nt in T.unroll(2):
                                    for e in T.unroll(2):
                                        fb[e] = X[z_at(C, c, ks, a, nt, tx % 32, e)]
                                        fb[2 + e] = mma.low_part(fb[e])
                                    mma.mma(ys, 4 * nt, fa, fb, split)
                    for i in T.unroll(8):
                        xs[8 * a + i] = zero
                    for ks in T.unroll(2):                     # X_a = ys M_a^T (M_a's upper 8 x 8 is 0)
                        for i in T.unroll(4):
                            fa[i] = ys[4 * ks + a_of_d(i)]
                            fa[4 + i] = mma.low_part(fa[i])
                        for nt in T.unroll(2):
                            if ks <= nt:
                                for e in T.unroll(2):
                                    fb[e] = X[z_at(C, a, ks, a, nt, tx % 32, e)]
                                    fb[2 + e] = mma.low_part(fb[e])
                                mma.mma(xs, 4 * (2 * a + nt), fa, fb, split)
                for nt in T.unroll(C // mma.N):
                    for i in T.unroll(4):
                        if tile(mi, tx) * mma.M < K:
                            W[n, b, h, 8 * nt + mma.d_at(tx % 32, i)[1],
                              tile(mi, tx) * mma.M + mma.d_at(tx % 32, i)[0]] = converted(
                                  xs[4 * nt + i], dtype, stored or dtype)
                        elif tile(mi, tx) * mma.M + mma.d_at(tx % 32, i)[0] < K + V:
                            U[n, b, h, 8 * nt + mma.d_at(tx % 32, i)[1],
                              tile(mi, tx) * mma.M + mma.d_at(tx % 32, i)[0] - K] = converted(
                                  xs[4 * nt + i], dtype, stored or dtype)

    @T.macro
    def solve_in_blocks(Kx, Vx, G, Bt, W, U, KK, X, fa, fb, run, n, b, h, tx):
        m = T.alloc_local((S,), dtype)
        xs = T.alloc_local((4 * C // mma.N,), dtype)
        ys = T.alloc_local((8,), dtype)
        solve_by_blocks(Kx, Vx, G, Bt, W, U, KK, X, m, xs, ys, fa, fb, run, n, b, h, tx)

    @T.macro
    def solve_by_columns(Kx, Vx, G, Bt, W, U, KK, X, fa, fb, run, n, b, h, tx):
        x = T.alloc_local((C,), dtype)
        solve(Kx, Vx, G, Bt, W, U, KK, x, run, n, b, h, tx)

    @T.macro
    def no_solve(Kx, Vx, G, Bt, W, U, KK, X, fa, fb, run, n, b, h, tx):
        T.evaluate(0)

    solve_step = no_solve if "solve" in skip else solve_in_blocks if by_blocks else solve_by_columns
    scores = no_scores if "scores" in skip else scores
    operands = no_operands if "operands" in skip else operands_by_rows if row_operands and Kg == 1 \
        else operands_by_channels

    @T.macro
    def body(Q, Kx, Vx, G, Bt, W, U, Qd, A, Ke, LD):
        T.reads()                              # the tensor-core calls read registers TVM cannot see
        T.writes()
        for bx in T.thread_binding(tasks, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                KK = T.alloc_shared((C * C,), dtype)
                X = T.alloc_shared((words,), dtype)
                Y = T.alloc_shared(((3 * C + 1) * PE,), dtype)
                run = T.alloc_local((2,), dtype)        # running sums; the solve's dot product
                d = T.alloc_local((4,), dtype)
                pf = T.alloc_local((max(3 * C * EC, 2 * C * KQ) // THREADS,), dtype)   # the next round's operands
                acc = T.alloc_local((4 * NT,), dtype)
                fa = T.alloc_local((8,), dtype)
                fb = T.alloc_local((4,), dtype)
                n, b, h = task(bx)
                operands(Q, Kx, Vx, G, Bt, W, U, Qd, Ke, LD, X, run, n, b, h, tx)
                scores(Q, Kx, G, Bt, KK, A, X, Y, run, d, pf, acc, fa, fb, n, b, h, tx)
                T.tvm_storage_sync("shared")
                solve_step(Kx, Vx, G, Bt, W, U, KK, X, fa, fb, run, n, b, h, tx)

    return intra_chunk_function(R, NC, HV, C, K, V, Kg, dtype, body, group, narrow, stored)
