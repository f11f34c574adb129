"""The chunked form's work local to each chunk, in primitive ops: from a layer's q, k, v, g
and beta to the operands of the loop over chunks.

Inside a chunk of C tokens, gam the cumulative gate from the chunk start (a [C, Kg]
matrix) and D_ij = gam_i - gam_j:

    Akk[i,j] = beta_i sum_c k_i[c] k_j[c] exp(D_ij[c])   (j < i)
    Aqk[i,j] =        sum_c q_i[c] k_j[c] exp(D_ij[c])   (j <= i)
    W = (I + Akk)^-1 (beta k exp(gam)),   U = (I + Akk)^-1 (beta v)
    q_decayed = q exp(gam),   k_to_end = k exp(gam_C - gam),   last_decay = exp(gam_C)

Every exponent above is <= 0 (g <= 0), so strong gates underflow to 0 and
never overflow. And each is a sum of gates over its own segment, never a
difference of two prefix sums: gam_i (from the chunk start), gam_C (the whole
chunk), gam_C - gam_i = sum_{l > i} g_l (a suffix sum) and D_ij = sum_{j < l <= i} g_l
(a segment sum). Sums of terms of one sign are exact to float32 rounding
whatever their size; a difference of prefix sums that reach 1e6 would lose
every gate of -0.01 after a -1e6 one.

`chunk_operands` is both the chunked model's construction (dnir/models/chunked.py)
and the expansion of the fused op `intra_chunk` (dnir/fused.py), so that a pass can
recognise the op by building it again from the same five tensors
(passes/fuse_intra_chunk.py).
"""
from __future__ import annotations

from .builder import Builder


def chunk_operands(b: Builder, q, k, v, g, beta, chunk_size: int, block_size: int | None = None,
                   factorized_decay: bool = False):
    """(w, u, q_decayed, aqk, k_to_end, last_decay), each [NC, R, HV, C, X] (chunk-major, as the loop
    over chunks walks them; last_decay [NC, R, HV, Kg, 1]), from q, k [R, Tp, HV, K], v [R, Tp, HV, V],
    g [R, Tp, HV, Kg] and beta [R, Tp, HV, 1] with Tp whole chunks of chunk_size tokens."""
    C = chunk_size
    R, Tp, HV, K = q.shape
    NC = Tp // C

    def to_chunks(x):  # [R, Tp, HV, X] -> [R, HV, NC, C, X]
        x = b.cont(b.permute(x, (0, 2, 1, 3)))
        return b.reshape(x, (R, HV, NC, C, x.shape[-1]))

    q, k, v, g, beta = (to_chunks(x) for x in (q, k, v, g, beta))
    # ggml's cumsum runs along the innermost axis only: transpose, copy, cumsum, and back.
    g_t = b.cont(b.transpose(g))                                # [R, HV, NC, Kg, C]
    gam = b.cont(b.transpose(b.cumsum(g_t, axis=-1)))           # [R, HV, NC, C, Kg]
    if block_size is None:
        akk, aqk = diagonal_scores(b, q, k, beta, g_t, factorized_decay)
    else:
        akk, aqk = blocked_scores(b, q, k, beta, g_t, block_size, factorized_decay)

    eye = b.eye(C)
    inverse = b.solve_tri(b.add(eye, akk), eye, lower=True, unit_diagonal=True)   # (I + Akk)^-1
    gam_exp = b.exp(gam)
    w = b.matmul(inverse, b.mul(b.mul(k, beta), gam_exp))       # [R, HV, NC, C, K]
    u = b.matmul(inverse, b.mul(v, beta))                       # [R, HV, NC, C, V]
    q_decayed = b.mul(q, gam_exp)
    Kg = gam.shape[-1]
    gam_last = b.slice_axis(gam, -2, C - 1, C)                  # [R, HV, NC, 1, Kg]
    k_to_end = b.mul(k, b.exp(suffix_sums(b, g_t)))             # decay from each token to the chunk end
    last_decay = b.reshape(b.exp(gam_last), (R, HV, NC, Kg, 1))  # scales the state's key rows

    def chunk_major(x):  # the scan walks the leading axis
        return b.cont(b.permute(x, (2, 0, 1, 3, 4)))

    return tuple(chunk_major(x) for x in (w, u, q_decayed, aqk, k_to_end, last_decay))


def below_diagonal(b: Builder, n: int):
    """The n x n ones strictly below the diagonal: [i, j] = 1 where i > j."""
    return b.tril(b.full((n, n), 1.0), -1)


def suffix_sums(b: Builder, g_t):
    """sum_{l > i} g_l over a run of n tokens, [..., Kg, n] -> [..., n, Kg]: one matmul by the
    ones below the diagonal (never the chunk total minus a prefix sum)."""
    return b.cont(b.transpose(b.matmul(g_t, below_diagonal(b, g_t.shape[-1]))))


def segment_sums(b: Builder, g_t):
    """D_ij = sum_{j < l <= i} g_l (0 for i <= j) over a run of n tokens: [..., Kg, n] ->
    [..., Kg, n, n], the running sum down i of g_i masked to i > j."""
    *batch, Kg, n = g_t.shape
    g_i = b.broadcast_to(b.reshape(g_t, (*batch, Kg, n, 1)), (*batch, Kg, n, n))        # ggml_repeat
    # ggml's cumsum runs along the innermost axis: down i is across the transposed rows.
    masked = b.mul(g_i, below_diagonal(b, n))
    return b.transpose(b.cumsum(b.cont(b.transpose(masked)), axis=-1))


def diagonal_scores(b: Builder, q, k, beta, g_t, factorized_decay: bool = False):
    """Akk and Aqk of a run of n tokens against itself: [..., n, n].

    q, k [..., n, K]; beta [..., n, 1]; g_t [..., Kg, n] (the gates, transposed).
    The decay tensor exp(D) is [..., Kg, n, n]; channels that share a gate are
    contracted by one matmul (all K channels for gdn, one each for kda).
    """
    if factorized_decay:
        return _factorized_scores(b, q, k, beta, b.cont(b.transpose(b.cumsum(g_t, axis=-1))))
    Kg = g_t.shape[-2]
    decay = b.exp(segment_sums(b, g_t))               # D <= 0 below the diagonal, 0 on and above it
    k_groups = _gate_groups(b, k, Kg)
    kk = b.sum(b.mul(b.matmul(k_groups, k_groups, transpose_b=True), decay), axis=-3)
    qk = b.sum(b.mul(b.matmul(_gate_groups(b, q, Kg), k_groups, transpose_b=True), decay), axis=-3)
    return b.mul(b.tril(kk, -1), beta), b.tril(qk)


def _gate_groups(b: Builder, x, Kg: int):
    """[..., n, K] -> [..., Kg, n, K // Kg]: the key channels grouped by the gate they share."""
    *batch, n, K = x.shape
    x = b.reshape(x, (*batch, n, Kg, K // Kg))
    axes = list(range(len(batch))) + [len(batch) + 1, len(batch), len(batch) + 2]
    return b.cont(b.permute(x, axes))


def _factorized_scores(b: Builder, q, k, beta, gam):
    """exp(gam_i - gam_j) as exp(gam_i) * exp(-gam_j): plain matmuls, but exp(-gam_j)
    overflows float32 once -gam_j > ~88. Kept so the range analysis can show it."""
    grow, shrink = b.exp(gam), b.exp(b.neg(gam))
    k_shrunk = b.mul(k, shrink)
    kk = b.matmul(b.mul(b.mul(k, beta), grow), k_shrunk, transpose_b=True)
    qk = b.matmul(b.mul(q, grow), k_shrunk, transpose_b=True)
    return b.tril(kk, -1), b.tril(qk)


def blocked_scores(b: Builder, q, k, beta, g_t, s: int, factorized_decay: bool = False):
    """Akk and Aqk of a chunk assembled from s x s blocks with `acc`.

    Diagonal blocks need the masked decay. A block below the diagonal (rows in
    block a, columns in block c < a) is one matmul of rescaled operands: with r
    the first row of block a, D_ij = sum_{r < l <= i} g_l + sum_{j < l <= r} g_l,
    both sums of gates (exact) and both exponents <= 0.
    """
    C = q.shape[-2]
    batch = q.shape[:-2]
    akk = aqk = b.zeros((*batch, C, C))
    blocks = [[b.slice_axis(x, -2, a * s, (a + 1) * s) for x in (q, k, beta)] for a in range(C // s)]
    for a, (q_a, k_a, beta_a) in enumerate(blocks):
        offsets = (0,) * len(batch) + (a * s, a * s)
        g_t_a = b.slice_axis(g_t, -1, a * s, (a + 1) * s)
        kk, qk = diagonal_scores(b, q_a, k_a, beta_a, g_t_a, factorized_decay)
        akk, aqk = b.acc(akk, kk, offsets), b.acc(aqk, qk, offsets)
        if a == 0:
            continue
        r = a * s
        after_r = b.concat([b.zeros((*g_t_a.shape[:-1], 1)), b.slice_axis(g_t_a, -1, 1, s)], axis=-1)
        to_ref = b.exp(b.cont(b.transpose(b.cumsum(after_r, axis=-1))))      # sum_{r < l <= i} g_l
        q_ref = b.mul(q_a, to_ref)
        k_ref = b.mul(b.mul(k_a, to_ref), beta_a)
        back = b.exp(b.slice_axis(suffix_sums(b, b.slice_axis(g_t, -1, 0, r + 1)), -2, 0, r))  # sum_{j < l <= r}
        for c, (_, k_c, _) in enumerate(blocks[:a]):
            k_c = b.mul(k_c, b.slice_axis(back, -2, c * s, (c + 1) * s))
            offsets = (0,) * len(batch) + (a * s, c * s)
            akk = b.acc(akk, b.matmul(k_ref, k_c, transpose_b=True), offsets)
            aqk = b.acc(aqk, b.matmul(q_ref, k_c, transpose_b=True), offsets)
    return akk, aqk
