"""dnir/fused.py's intra_chunk on ggml: every chunk of every head at once, in a few batched ops.

The op's expansion (dnir/intra_chunk.py) is written for NumPy: chunk-major copies of q, k,
v, g and beta first, decays and scores per chunk, and O2 then cuts the C x C scores into
blocks of 16 rows, which helps NumPy's matmul and costs ggml a copy per block. Here the
chunks are ggml views of the tokens (a chunk is a batch entry of ggml_mul_mat, which
broadcasts over ggml's dims 2 and 3), and each result is made in the layout the loop over
chunks (lower.py's op_chunk_scan) reads it in: u and k_to_end transposed (`Transposed`),
so the loop copies neither. With ggml's dimensions innermost first, one chunk of one head:

    g_t, beta_t    [C]        the gates and betas, tokens innermost (one transpose of [HV, T])
    gam            [C]        cumsum(g_t): the decay from the chunk start, q_decayed = q exp(gam)
    after          [C]        sum_{l > i} g_l, a product with the ones above the diagonal;
                              k_to_end^T = k^T exp(after), never exp(gam_C - gam_i)
    D              [C_j, C_i] sum_{j < l <= i} g_l: the ones where l > j times g_l kept where l <= i,
                              one product, each decay a sum over its own segment (dnir/intra_chunk.py
                              says why)
    Akk            [C_j, C_i] beta_i (k_i . k_j) exp(D_ij), j < i; Aqk the same from q, j <= i
                              (the products once per q/k head; q's scale in the causal mask)
    inv            [C_l, C_i] (I + Akk)^-1 by two ggml_solve_tri of C/2 rows (_inverse_by_halves)
    w = inv diag(beta exp(gam)) k, u^T = v^T (inv diag(beta))^T: two batched products

Only a gate per head (GDA): with one per key channel (KDA) D is K times larger and the
target's check (backend.py) leaves the op to O2's blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

from dnir.lowering.head_reads import head_reads

from .api import F32, TRI_LOWER, TRI_LOWER_DIAG, TRI_UPPER


def rejects(node) -> str | None:
    """None when these ops take the intra_chunk `node`, else why not: float32 and one gate per head
    (a gate per key channel makes the decay tensor K times larger, 2 GiB at T=4096, where O2's
    blocks of 16 rows cost less)."""
    if node.inputs[0].dtype != "f32":
        return f"ggml's intra_chunk is float32, the {node.op} is {node.inputs[0].dtype}"
    if node.inputs[3].shape[-1] != 1:
        return f"ggml's intra_chunk takes one gate per head; g has {node.inputs[3].shape[-1]} per head"
    return None


@dataclass(frozen=True)
class Transposed:
    """A value held as `value`, its transpose over the last two axes (a contiguous or strided
    lower.Value). Readers that take the transpose (op_chunk_scan) use `value` as it is; any
    other reader gets the value copied back (Lowerer.dense)."""
    value: object

    @property
    def shape(self) -> tuple:
        """The shape of the value it stands for."""
        *batch, a, b = self.value.shape
        return (*batch, b, a)


def lower_intra_chunk(low, node, q, k, v, g, beta) -> tuple:
    """(w, u, q_decayed, aqk, k_to_end, last_decay) of `node` from its contiguous operands,
    u and k_to_end as `Transposed`."""
    C = node.attrs["chunk_size"]
    R, Tp, HV, K = q.shape
    V = v.shape[-1]
    NC = Tp // C
    B = R * NC        # ggml's batch: sequence-major (r, chunk); chunk-major results permute it
    call = low.call
    q, q_heads, k_heads, group, scale = _head_operands(low, node, q, k)
    HQ = HV // group

    def chunks(x, width, heads=HV):
        """[R, Tp, heads, width] viewed as [width, C, heads, B] (ggml order): the tokens of a
        chunk are rows heads * width apart; the sequence's chunks follow each other."""
        item = 4
        return call("ggml_view_4d", x.t, width, C, heads, B, width * heads * item, width * item,
                    C * heads * width * item, x.offset)

    def swap01(t):       # ggml dims 0 and 1 exchanged, copied contiguous
        return call("ggml_cont", call("ggml_permute", t, 1, 0, 2, 3))

    def per_token(x):    # [R, Tp, HV, 1] -> [C, HV, B], tokens innermost
        return swap01(call("ggml_reshape_4d", low.view(x, (R * Tp, HV)), HV, C, B, 1))

    def rows(t):         # [C, HV, B] as [1, C, HV, B]: one factor per row of a chunk
        return call("ggml_reshape_4d", t, 1, C, HV, B)

    def columns(t):      # [C, HV, B] as [C, 1, HV, B]: one factor per column of a transposed chunk
        return call("ggml_reshape_4d", t, C, 1, HV, B)

    g_t, beta_t = per_token(g), per_token(beta)
    gam = call("ggml_cumsum", g_t)
    gam_exp = call("ggml_exp", gam)
    q_c = chunks(q, K)
    q_decayed = call("ggml_mul", q_c, rows(gam_exp if scale == 1.0 else call("ggml_scale", gam_exp, scale)))
    # [C, K, HV, B]: k of the q/k heads transposed, then repeated over their value heads (half
    # the transposing copy, and the layer's repeat of k not made at all)
    k_t = swap01(chunks(k_heads, K, HQ))
    if group > 1:
        k_t = call("ggml_reshape_4d", call("ggml_repeat_4d", call("ggml_reshape_4d", k_t, C * K, 1, HQ, B),
                                           C * K, group, HQ, B), C, K, HV, B)
    v_t = swap01(chunks(v, V))                                          # [C, V, HV, B]

    ones = low.view(low.fill((C, C), 1.0), (C, C))
    later = call("ggml_tri", ones, TRI_UPPER)                           # row i: 1 where l > i
    after = call("ggml_mul_mat", later,
                 call("ggml_reshape_4d", g_t, C, HV * B, 1, 1))
    k_to_end_t = call("ggml_mul", k_t, columns(call("ggml_exp", after)))

    # D [C_j, C_i]: D_ij = sum_l [j < l] [l <= i] g_l, a product of the ones where l > j with the
    # gates g_l kept where l <= i, made in the layout the scores are (no transposed copy of a
    # cumsum down i); each sum still runs over its own segment.
    # (every chunk's columns side by side: one matrix product, not one per chunk and head, each
    # of which costs ggml's threads two barriers)
    g_l = call("ggml_tri", call("ggml_repeat_4d", columns(g_t), C, C, HV, B), TRI_LOWER_DIAG)
    d = call("ggml_mul_mat", later, call("ggml_reshape_4d", g_l, C, C * HV * B, 1, 1))
    decay = call("ggml_exp", call("ggml_reshape_4d", d, C, C, HV, B))  # [C_j, C_i]: exp(D_ij)

    # k k^T and q k^T in one product (ggml's sgemm takes a contiguous right operand: each chunk's
    # k rows, then its q rows, against its k), once per q/k head: GQA's `group` value heads of a
    # q/k head only decay them differently. Both masked there (kk below the diagonal, qk on and
    # below it, times q's scale), then exp(D) viewed [C, C, group, HQ B] against a half of them
    # [C, C, 1, HQ B]: value head j reads q/k head j // group. (Where a mask is 0, D is 0.)
    k_hc = chunks(k_heads, K, HQ)
    kq = call("ggml_concat", k_hc, chunks(q_heads, K, HQ), 1)              # [K, 2C, HQ, B]
    masks = call("ggml_concat", call("ggml_tri", ones, TRI_LOWER),
                 call("ggml_tri", low.view(low.fill((C, C), scale), (C, C)), TRI_LOWER_DIAG), 2)
    products = call("ggml_mul", call("ggml_reshape_4d", call("ggml_mul_mat", k_hc, kq), C, C, 2, HQ * B), masks)
    decay_g = call("ggml_reshape_4d", decay, C, C, group, HQ * B)

    def decayed(i):      # the kk (0) or qk (1) products decayed, [C_j, C_i, HV, B]
        half = call("ggml_view_4d", products, C, C, 1, HQ * B, C * 4, C * C * 4, 2 * C * C * 4, i * C * C * 4)
        return call("ggml_reshape_4d", call("ggml_mul", decay_g, half), C, C, HV, B)

    eye = low.op_eye_n(C).t
    akk = call("ggml_mul", decayed(0), rows(beta_t))
    aqk = decayed(1)
    # (I + Akk)^-1 diag(beta): beta scales the inverse's columns (a C x C matrix), not v and k.
    inverse_b = _inverse_by_halves(low, call("ggml_add", akk, eye), beta_t, C, HV, B)
    u_t = call("ggml_mul_mat", inverse_b, v_t)                          # [C_i, V]: (inv (v beta))^T
    w = call("ggml_mul_mat", k_t, call("ggml_mul", inverse_b, columns(gam_exp)))   # [K, C_i]
    gam_last = call("ggml_view_4d", gam, 1, HV, B, 1, C * 4, C * HV * 4, C * HV * B * 4, (C - 1) * 4)
    last_decay = call("ggml_exp", call("ggml_cont", gam_last))

    def result(t, x, y, transposed=False):
        """t, laid out [R, NC, HV, x, y], as the op's [NC, R, HV, ., .] result."""
        value = low.made(t, (B, HV, x, y), (R, NC, HV, x, y), "f32")
        if R > 1:
            value = low.permute(value, (1, 0, 2, 3, 4))
        else:
            value = low.as_shape(value, (NC, R, HV, x, y))
        return Transposed(value) if transposed else value

    return (result(w, C, K), result(u_t, V, C, True), result(q_decayed, C, K), result(aqk, C, C),
            result(k_to_end_t, K, C, True), result(last_decay, 1, 1))


def _head_operands(low, node, q, k):
    """(q, q_heads, k_heads, group, scale): q for the value heads unscaled, q and k of the q/k
    heads (lowering/head_reads.py: before the layer's GQA repeat and q's constant scale, where it
    made them so), `group` value heads per q/k head, and q's scale (1.0 when q is read as it is).
    The scale is folded into q's decay factors and the causal mask, so the layer's multiply of
    q (30 ms at (1, 4096, 16 heads, 128), 1 thread) is not computed."""
    q_node, k_node, group, scale = head_reads(*node.inputs[:2])
    known = low.values
    if id(q_node) not in known or id(k_node) not in known:     # (a body's parameters: read as given)
        return q, q, k, 1, 1.0
    q_heads, k_heads = low.dense(known[id(q_node)]), low.dense(known[id(k_node)])
    if scale is None:
        return q, q_heads, k_heads, group, 1.0
    if group == 1:
        return q_heads, q_heads, k_heads, group, scale
    R, Tp, HQ, K = q_heads.shape        # the repeat of the unscaled q: value head j = h group + e
    t = low.call("ggml_repeat_4d", low.view(q_heads, (R * Tp, HQ, 1, K)), K, group, HQ, R * Tp)
    return low.made(t, (R * Tp, HQ, group, K), q.shape, q.dtype), q_heads, k_heads, group, scale


def _inverse_by_halves(low, a, beta_t, C, HV, B):
    """X = A^-1 diag(beta) of every chunk's unit lower triangular A [C, C] (ggml: columns
    innermost), by its two diagonal blocks of h = C / 2 rows:

        X11 = A11^-1 diag(beta_1)     [X21 | X22] = A22^-1 [-A21 X11 | diag(beta_2)]     X12 = 0

    ggml_solve_tri is a scalar substitution per right-hand column, n^2 / 2 multiply-adds for
    each: two solves of h rows (h and 2h columns) cost 3/8 of one of C rows (C columns), 164 ms
    at 1 thread at (1, 4096, 32, 128), and A21 X11 is one batched product."""
    call, h, item = low.call, C // 2, 4

    def block(r, c):       # rows r h.., columns c h.. of each A
        return call("ggml_cont", call("ggml_view_4d", a, h, h, HV, B, C * item, C * C * item, C * C * HV * item,
                                      (r * h * C + c * h) * item))

    def diag_beta(c):      # diag(beta) of the columns c h.. of each chunk
        column = call("ggml_view_4d", beta_t, h, 1, HV, B, C * item, C * item, C * HV * item, c * h * item)
        return call("ggml_mul", call("ggml_repeat_4d", low.op_eye_n(h).t, h, h, HV, B), column)

    x11 = call("ggml_solve_tri", block(0, 0), diag_beta(0), True, True, False)
    x11_t = call("ggml_cont", call("ggml_permute", x11, 1, 0, 2, 3))
    a21_x11 = call("ggml_mul_mat", x11_t, block(1, 0))
    bottom = call("ggml_solve_tri", block(1, 1), call("ggml_concat", call("ggml_neg", a21_x11), diag_beta(1), 0),
                  True, True, False)
    top = call("ggml_pad_ext", x11, 0, h, 0, 0, 0, 0, 0, 0)
    return call("ggml_concat", top, bottom, 1)
