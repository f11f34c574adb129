"""Block forward substitution for lower-triangular solves.

solve_tri(L, B) with L lower-triangular, split into b x b blocks:

    X_0 = solve_tri(L_00, B_0)
    X_a = solve_tri(L_aa, B_a - sum_{c<a} L_ac X_c)

Only blocks on or below the diagonal are read. The slices of L are pushed
through elementwise ops and into concats, so when L was assembled from blocks
(see tril_blocks) each block is read where it was made, and the zero blocks of
L above the diagonal are never formed at all.
"""
from __future__ import annotations

from dnir.graph import Graph
from dnir.ops import make_node

from .construct import DEFAULT_BLOCK, op, rows, slice_, square
from .manager import register_pass
from .rewrite import P, Rule, apply_rules, is_elementwise


def block_solve(m, block: int):
    lower, rhs_all = m.node.inputs
    n = lower.shape[-1]
    if not m.node.attrs["lower"] or n % block or n <= block:
        return None
    unit = m.node.attrs["unit_diagonal"]
    xs = []
    for a in range(n // block):
        rhs = rows(rhs_all, a * block, (a + 1) * block, -2)
        for c, x_c in enumerate(xs):
            rhs = op("sub", rhs, op("matmul", square(lower, a, c, block), x_c, transpose_a=False,
                                    transpose_b=False))
        l_aa = square(lower, a, a, block)
        xs.append(op("solve_tri", l_aa, rhs, lower=True, unit_diagonal=unit))
    out = op("concat", *xs, axis=m.node.rank - 2)
    return out if out.type == m.node.type else op("broadcast_to", out, shape=m.node.shape)


def slice_of_concat(m):
    """A slice that lies inside one operand of a concat reads that operand."""
    node, cat = m.node, m.node.inputs[0]
    axis, start = cat.attrs["axis"] % cat.rank, 0
    lo, hi = node.attrs["starts"][axis], node.attrs["stops"][axis]
    for part in cat.inputs:
        end = start + part.shape[axis]
        if start <= lo and hi <= end:
            starts, stops = list(node.attrs["starts"]), list(node.attrs["stops"])
            starts[axis], stops[axis] = lo - start, hi - start
            return slice_(part, starts, stops)
        start = end
    return None


def slice_of_elementwise(m):
    """slice(f(a, b)) -> f(slice(a), slice(b)); a broadcast (size-1 or missing) axis is not sliced."""
    node, e = m.node, m.node.inputs[0]
    if not is_elementwise(e) or e.op in ("tril", "triu"):
        return None
    parts = []
    for x in e.inputs:
        pad = e.rank - x.rank
        starts = [0 if d == 1 else s for s, d in zip(node.attrs["starts"][pad:], x.shape)]
        stops = [1 if d == 1 else s for s, d in zip(node.attrs["stops"][pad:], x.shape)]
        parts.append(x if list(x.shape) == stops and not any(starts) else
                     slice_(x, starts, stops))
    return make_node(e.op, parts, e.attrs)


def slice_of_eye(m):
    """A square block of the identity on its diagonal is a smaller identity; off it, zeros."""
    (r0, c0), (r1, c1) = m.node.attrs["starts"], m.node.attrs["stops"]
    if r0 == c0 and r1 == c1:
        return make_node("eye", (), {"n": r1 - r0, "dtype": m.node.dtype})
    if r1 <= c0 or c1 <= r0:
        return make_node("full", (), {"value": 0.0, "shape": m.node.shape, "dtype": m.node.dtype})
    return None


def slice_of_full(m):
    return make_node("full", (), {**m.node.inputs[0].attrs, "shape": m.node.shape})


@register_pass("block_solve")
def block_solve_pass(graph: Graph, block: int = DEFAULT_BLOCK) -> tuple[Graph, bool]:
    """Solve lower-triangular systems by blocks; read each block of L where it is made."""
    return apply_rules(graph, [
        Rule(P("solve_tri", P.any(), P.any()), lambda m: block_solve(m, block), "block_forward_substitution"),
        Rule(P("slice", P("concat")), slice_of_concat, "slice_of_concat"),
        Rule(P("slice", P.any(pred=lambda n: n.op != "input" and is_elementwise(n))), slice_of_elementwise,
             "slice_of_elementwise"),
        Rule(P("slice", P("full")), slice_of_full, "slice_of_full"),
        Rule(P("slice", P("eye")), slice_of_eye, "slice_of_eye"),
    ])
