"""Lower-triangular block skipping for causal, decayed scores.

Recognises S = tril(sum_g (X_g Y_g^T) * exp(E_g), k): a C x C product of rows
X against rows Y under a causal mask with decay factors, scalar per row (g has
one channel) or per channel (g runs over the K channels, the [.., K, C, C]
decay tensor), and computes it in b x b blocks. The exponent E is written in
one of two ways:

- segment sums of the gates, E_ij = sum_{j < l <= i} g_l (the running sum down
  i of g_i masked to i > j, as the layer writes it): every exponent below is
  again exact whatever the gates' sizes (sums of gates over their own
  segments, or on diagonal blocks differences of running sums that are exact,
  see exact_running_sums);
- a difference of cumulative gates gi - gj, masked to j <= i or not (graphs
  written that way): the blocks use differences too, the same numerics.

- blocks above the diagonal are zero and never computed;
- one decay per row (scalar gates, g has one channel): block row a is one
  matmul of its rows against every column up to its diagonal, times
  exp(gi - gj); gi - gj <= 0 left of the diagonal, and the exponent is masked
  to 0 above it, so nothing overflows;
- one decay per channel: diagonal blocks keep the masked form, at b x b; left
  of a diagonal block (rows in block a, every column j before it) there is no
  mask and no decay tensor: with r the first row of block a,
  E_ij = E_ir + E_rj, both <= 0 (no overflow), so that whole strip is one
  matmul of rescaled rows, contracted over all channels at once. As segment
  sums E_ir = sum_{r < l <= i} g_l is a running sum within the block with g_r
  left out, and E_rj = sum_{j < l <= r} g_l a suffix sum of the columns up to r.

For C = 64 and b = 16 that is 10 of 16 blocks, 4 of them masked: 4 row
matmuls (scalar decay), or 3 strip matmuls and 4 diagonal blocks (per channel).
"""
from __future__ import annotations

import math

from dnir.graph import Graph, Node

from .construct import DEFAULT_BLOCK, op, rows, slice_axes
from .manager import register_pass
from .rewrite import P, Rule, apply_rules


def _gate(name: str) -> P:
    """A gate operand, captured without the broadcast_to (one) that may wrap it."""
    return P.either(P("broadcast_to", P.any(name)), P.any(name, pred=lambda n: n.op != "broadcast_to"))


def score_patterns(block: int) -> dict[str, P]:
    """tril(S, k) with k in (0, -1) over C x C scores (C a multiple of `block`, above it), S a
    product of rows X Y^T (either operand order of the mul) and exp of gi - gj, masked or not,
    in one of three forms: 'sum' (channel groups summed on axis -3), 'unit' (a size-1 group
    axis dropped by a reshape) or 'plain' (no group axis)."""
    diff = P("sub", _gate("gi"), _gate("gj"))
    below = P("tril", P("full", value=1.0), k=-1, shape=lambda s: len(s) == 2 and s[0] == s[1])
    segments = P("cumsum", P("mul", _gate("gs"), below), name="seg",
                 pred=lambda s: s.attrs["axis"] % s.rank == s.rank - 2)
    decay = P("exp", P.either(P("tril", diff, k=0, name="masked"), diff, segments))
    prod = P("mul", P("matmul", P.any("x"), P.any("y"), transpose_a=False, transpose_b=True), decay,
             name="prod", shape=lambda s: s[-2] == s[-1])
    forms = {
        "sum": P("sum", prod, keepdims=False,
                 pred=lambda s: [a % s.inputs[0].rank for a in s.attrs["axes"]] == [s.inputs[0].rank - 3]),
        "unit": P("reshape", prod, pred=lambda s: s.inputs[0].shape == s.shape[:-2] + (1,) + s.shape[-2:]),
        "plain": prod,
    }
    causal = lambda s: s[-1] % block == 0 and s[-1] > block      # noqa: E731
    return {form: P("tril", scores, k=lambda k: k in (0, -1), shape=causal) for form, scores in forms.items()}


def scores_operands(m, form: str):
    """(X, Y, gates) of a matched score matrix, X and Y with a group axis, or None when their
    shapes do not fit the C x C product."""
    prod, x, y = m.prod, m.x, m.y
    n, rank = prod.shape[-1], prod.rank
    gs = m.caps.get("gs")
    gi, gj = (gs, None) if gs is not None else (m.gi, m.gj)
    if not (gi.rank == x.rank == y.rank == rank and gi.shape[-2:] == (n, 1) and x.shape[-2] == y.shape[-2] == n
            and (gj is None or (gj.rank == rank and gj.shape[-2:] == (1, n)))):
        return None
    unit = (lambda t: op("reshape", t, shape=t.shape[:-2] + (1,) + t.shape[-2:])) if form == "plain" else \
        (lambda t: t)   # "plain" gets a group axis of size 1
    if gs is not None:
        return unit(x), unit(y), SegmentGates(unit(gs), unit(m.seg))
    return unit(x), unit(y), DifferenceGates(unit(gi), unit(gj), "masked" in m.caps)


GATE_FLOOR = -110.0     # exp of any sum of gates below this is 0 in float32 (e^-103.98 rounds to 0)


def exact_running_sums(g: Node, axis: int) -> list[Node]:
    """Two running sums along `axis` (a diagonal block's tokens) whose differences give the
    block's segment sums E_ij = sum_{j < l <= i} g_l exactly, elementwise from small operands:
    E_ij = ((C_i - C_j) + F_i) - F_j. A GPU compiler then recomputes exp(E) inside the
    reductions that read it (recompute_into_reductions) instead of storing a [.., b, b, K] tensor.

    Each gate is first raised to GATE_FLOOR (a segment holding such a gate decays to exactly 0
    either way), then split into a coarse part, a multiple of 2^-k, and a fine rest below 2^-k
    (both exact): with b * 110 * 2^k < 2^24 every running sum of coarse parts and every
    difference of two is exact in float32, whatever order a backend adds in; the fine parts sum
    to less than b * 2^-k, so their differences are off by ~1e-7 of that, far below a gate."""
    n = g.shape[axis]
    k = 24 - math.ceil(math.log2(n * -GATE_FLOOR)) - 1
    g = op("clamp", g, min=GATE_FLOOR, max=math.inf)
    scale = lambda t, f: op("mul", t, op("full", value=f, shape=(), dtype=g.dtype))   # noqa: E731
    coarse = scale(op("cast", op("cast", scale(g, 2.0 ** k), dtype="i32"), dtype=g.dtype), 2.0 ** -k)
    return [op("cumsum", part, axis=axis) for part in (coarse, op("sub", g, coarse))]


def exact_differences(coarse, fine) -> Node:
    """E_ij from the (i, j) forms of the two running sums: ((C_i - C_j) + F_i) - F_j, the first
    difference exact, so one full-size value is made and the rest is done in place. Capped at 0:
    above the diagonal E_ij > 0 (exp could overflow; the scores are zeroed there after), and
    every exponent is then provably <= 0 (the range analysis sees exp <= 1)."""
    return op("clamp", op("sub", op("add", op("sub", *coarse), fine[0]), fine[1]), min=-math.inf, max=0.0)


def below_diagonal(n: int, dtype: str) -> Node:
    """The n x n ones strictly below the diagonal: [i, j] = 1 where i > j."""
    return op("tril", op("full", value=1.0, shape=(n, n), dtype=dtype), k=-1)


class SegmentGates:
    """The exponent as segment sums of the gates gs [.., G, n, 1]: E_ij = sum_{j < l <= i} g_l
    (0 for i <= j). Every piece is exact: a sum of gates, or a difference of exact running sums."""

    def __init__(self, gs: Node, seg: Node):
        self.gs, self.seg, self.gst = gs, seg, token_major(gs)
        self.groups = gs.shape[-3]

    def rows_exponent(self, lo, hi):
        """E over rows [lo, hi) and columns [0, hi) (the whole matrix's; 0 above the diagonal)."""
        return slice_axes(self.seg, {self.seg.rank - 2: lo}, {self.seg.rank - 2: hi, self.seg.rank - 1: hi})

    def block_exponent(self, lo, hi):
        """E of the diagonal block [lo, hi): [.., G, b, b] (see exact_differences)."""
        g = rows(self.gs, lo, hi, -2)                               # [.., G, b, 1]
        n = hi - lo
        pairs = [(run, op("reshape", run, shape=run.shape[:-2] + (1, n))) for run in exact_running_sums(g, g.rank - 2)]
        return exact_differences(*pairs)

    def channel_last_exponent(self, lo, hi):
        """E of the diagonal block [lo, hi) token-major: [.., i, j, G] (see exact_differences)."""
        g = rows(self.gst, lo, hi, -3)                              # [.., b, G, 1]
        n, G = hi - lo, g.shape[-2]
        pairs = [tuple(op("reshape", run, shape=run.shape[:-3] + ij) for ij in ((n, 1, G), (1, n, G)))
                 for run in exact_running_sums(g, g.rank - 3)]
        return exact_differences(*pairs)

    def to_ref(self, lo, hi):
        """E_ir = sum_{r < l <= i} g_l for i in [lo, hi), r = lo, token-major [.., b, G, 1]."""
        g = rows(self.gst, lo, hi, -3)
        first = op("full", value=0.0, shape=g.shape[:-3] + (1,) + g.shape[-2:], dtype=g.dtype)
        return op("cumsum", op("concat", first, rows(g, 1, hi - lo, -3), axis=g.rank - 3), axis=g.rank - 3)

    def from_ref(self, lo):
        """E_rj = sum_{j < l <= r} g_l for j in [0, r), r = lo, token-major [.., r, G, 1]:
        a matmul by the strictly upper-triangular ones."""
        g = rows(self.gst, 0, lo + 1, -3)
        g = op("reshape", g, shape=g.shape[:-2] + (g.shape[-2],))   # [.., r + 1, G]
        sums = rows(op("matmul", below_diagonal(lo + 1, g.dtype), g, transpose_a=True, transpose_b=False), 0, lo, -2)
        return op("reshape", sums, shape=sums.shape + (1,))


class DifferenceGates:
    """The exponent as gi - gj (gi [.., G, n, 1], gj [.., G, 1, n]), masked to j <= i or not."""

    def __init__(self, gi: Node, gj: Node, masked: bool):
        self.gi, self.gj, self.masked = gi, gj, masked
        self.groups = gi.shape[-3]
        self.git = token_major(gi)
        self.gjt = op("permute", gj, axes=tuple(range(gj.rank - 3)) + (gj.rank - 1, gj.rank - 3, gj.rank - 2))

    def rows_exponent(self, lo, hi):
        # left of the diagonal gi - gj <= 0 (g only falls along the chunk); masked above it
        return op("tril", op("sub", rows(self.gi, lo, hi, -2), rows(self.gj, 0, hi, -1)), k=lo)

    def block_exponent(self, lo, hi):
        diff = op("sub", rows(self.gi, lo, hi, -2), rows(self.gj, lo, hi, -1))
        return op("tril", diff, k=0) if self.masked else diff

    def channel_last_exponent(self, lo, hi):
        def split(t, axis):  # [.., b, G, 1] -> [.., b, 1, G] (axis -3) or [.., 1, b, G] (axis -2)
            t = rows(t, lo, hi, -3)
            shape = t.shape[:-3] + ((t.shape[-3], 1) if axis == -3 else (1, t.shape[-3])) + (t.shape[-2],)
            return op("reshape", t, shape=shape)
        diff = op("sub", split(self.git, -3), split(self.gjt, -2))
        if not self.masked:
            return diff
        n = hi - lo     # the mask multiplies the exponent (masked to 0 before exp)
        mask = op("tril", op("full", value=1.0, shape=(n, n), dtype=diff.dtype), k=0)
        return op("mul", diff, op("reshape", mask, shape=(n, n, 1)))

    def to_ref(self, lo, hi):
        return op("sub", rows(self.git, lo, hi, -3), rows(self.git, lo, lo + 1, -3))

    def from_ref(self, lo):
        return op("sub", rows(self.git, lo, lo + 1, -3), rows(self.gjt, 0, lo, -3))


def token_major(t: Node) -> Node:
    """[.., G, n, d] -> [.., n, G, d] (a reshape when G is 1)."""
    r = t.rank
    return op("permute", t, axes=tuple(range(r - 3)) + (r - 2, r - 3, r - 1))


def block_scores(m, form: str, block: int):
    s, k = m.node.inputs[0], m.node.attrs["k"]
    n = s.shape[-1]
    found = scores_operands(m, form)
    if found is None:
        return None
    x, y, gates = found
    nb, batch = n // block, s.shape[:-2]
    if x.shape[-3] == 1 and gates.groups == 1:
        return _scalar_decay_rows(x, y, gates, k, block, s)
    xt, yt = token_major(x), token_major(y)
    width = x.shape[-3] * x.shape[-1]     # channels G x d, contracted together off the diagonal
    block_rows = []
    for a in range(nb):
        lo, hi = a * block, (a + 1) * block
        row = []
        if a:   # every column left of the block, in one matmul against the block's first row as reference
            x_a = op("mul", rows(xt, lo, hi, -3), op("exp", gates.to_ref(lo, hi)))
            y_a = op("mul", rows(yt, 0, lo, -3), op("exp", gates.from_ref(lo)))
            x_a, y_a = (op("reshape", t, shape=t.shape[:-3] + (t.shape[-3], width)) for t in (x_a, y_a))
            row.append(_fit(op("matmul", x_a, y_a, transpose_a=False, transpose_b=True), batch))
        if form == "sum" and x.shape[-1] == 1:
            diag = channel_last_diagonal(xt, yt, gates, lo, hi)
        else:
            decay = op("exp", gates.block_exponent(lo, hi))
            prod = op("mul", op("matmul", rows(x, lo, hi, -2), rows(y, lo, hi, -2), transpose_a=False,
                                transpose_b=True), decay)
            diag = op("sum", prod, axes=(prod.rank - 3,), keepdims=False) if form == "sum" else \
                op("reshape", prod, shape=prod.shape[:-3] + prod.shape[-2:])
        row.append(op("tril", _fit(diag, batch), k=k))
        block_rows.append(_block_row(row, n, s))
    return op("concat", *block_rows, axis=len(batch))


def _scalar_decay_rows(x, y, gates, k, block, s) -> Node:
    """One decay per row (no channel axis in g): block row a is one matmul against every
    column up to its diagonal, times exp(E) with E <= 0 (gi - gj is masked to 0 above the
    diagonal; segment sums are 0 there), and the product zeroed above the diagonal after."""
    n, batch = s.shape[-1], s.shape[:-2]
    block_rows = []
    for a in range(n // block):
        lo, hi = a * block, (a + 1) * block
        prod = op("matmul", rows(x, lo, hi, -2), rows(y, 0, hi, -2), transpose_a=False, transpose_b=True)
        decay = op("exp", gates.rows_exponent(lo, hi))
        scores = op("mul", prod, decay)
        row = op("tril", _fit(op("reshape", scores, shape=scores.shape[:-3] + scores.shape[-2:]), batch), k=lo + k)
        block_rows.append(_block_row([row], n, s))
    return op("concat", *block_rows, axis=len(batch))


def _block_row(pieces, n: int, s: Node) -> Node:
    """One block row of the n x n scores: its pieces up to the diagonal, then zeros."""
    *batch, b, hi = s.shape[:-2] + (pieces[0].shape[-2], sum(p.shape[-1] for p in pieces))
    if hi < n:
        pieces = pieces + [op("full", value=0.0, shape=(*batch, b, n - hi), dtype=s.dtype)]
    return op("concat", *pieces, axis=len(batch) + 1) if len(pieces) > 1 else pieces[0]


def channel_last_diagonal(xt, yt, gates, lo, hi) -> Node:
    """A diagonal block with one gate per channel, kept in the token-major layout:
    [.., i, 1, G] * [.., 1, j, G] * exp(E_ij), summed over the channels G; E is 0 above
    the diagonal (no overflow) and the tril after it zeroes those entries."""
    def split(t, axis):  # [.., b, G, 1] -> [.., b, 1, G] (axis -3) or [.., 1, b, G] (axis -2)
        t = rows(t, lo, hi, -3)
        shape = t.shape[:-3] + ((t.shape[-3], 1) if axis == -3 else (1, t.shape[-3])) + (t.shape[-2],)
        return op("reshape", t, shape=shape)
    # x_i * (y_j * decay): the bracket is shared by the scores that use the same y (Akk and Aqk),
    # and the sum over channels of x_i times it is a matrix-vector product (sum_mul_to_matmul).
    prod = op("mul", split(xt, -3), op("mul", split(yt, -2), op("exp", gates.channel_last_exponent(lo, hi))))
    return op("sum", prod, axes=(prod.rank - 1,), keepdims=False)


def _fit(t: Node, batch) -> Node:
    return t if t.shape[:-2] == batch else op("broadcast_to", t, shape=batch + t.shape[-2:])


@register_pass("block_tril")
def block_tril(graph: Graph, block: int = DEFAULT_BLOCK) -> tuple[Graph, bool]:
    """Compute causal decayed C x C scores in b x b blocks on and below the diagonal."""
    return apply_rules(graph, [Rule(pattern, lambda m, form=form: block_scores(m, form, block), f"block_scores_{form}")
                               for form, pattern in score_patterns(block).items()])
