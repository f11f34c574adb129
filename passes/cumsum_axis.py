"""Dimension-aware cumsum: a cumsum reads any axis, so the transposes written
around it (because some backends only scan the last axis) are not needed.

    permute(cumsum(permute(x, p), axis=-1), inverse(p))  ->  cumsum(x, axis=p[-1])

The rule moves the permute from the cumsum's operand to its result; the
transpose pass then cancels it against the inverse permute that follows.
A reshape that only adds or drops size-1 axes moves the same way.
"""
from __future__ import annotations

from dnir.graph import Graph
from dnir.ops import make_node

from .construct import permute, reshape
from .manager import register_pass
from .rewrite import P, Rule, apply_rules

x = P.any("x")


def permute_out_of_cumsum(m):
    axis = m.node.attrs["axis"] % m.node.rank
    axes = m.node.inputs[0].attrs["axes"]
    return permute(make_node("cumsum", (m.x,), {"axis": axes[axis]}), axes)


def _big_axes(shape):
    return [i for i, d in enumerate(shape) if d != 1]


def reshape_out_of_cumsum(m):
    """cumsum(reshape(x), a) -> reshape(cumsum(x, a')) when the reshape only moves size-1 axes."""
    src, dst = m.x.shape, m.node.shape
    if [src[i] for i in _big_axes(src)] != [dst[i] for i in _big_axes(dst)]:
        return None
    axis = m.node.attrs["axis"] % m.node.rank
    if dst[axis] == 1:
        return m.node.inputs[0]  # a running sum over one element is the element
    src_axis = _big_axes(src)[_big_axes(dst).index(axis)]
    return reshape(make_node("cumsum", (m.x,), {"axis": src_axis}), dst)


RULES = [
    Rule(P("cumsum", P("cont", x)), lambda m: make_node("cumsum", (m.x,), m.node.attrs), "cumsum_of_cont"),
    Rule(P("cumsum", P("permute", x)), permute_out_of_cumsum, "permute_out_of_cumsum"),
    Rule(P("cumsum", P("reshape", x)), reshape_out_of_cumsum, "reshape_out_of_cumsum"),
    Rule(P("permute", P("permute", x)), lambda m: permute(m.node.inputs[0], m.node.attrs["axes"]),
         "compose_permutes"),
]


@register_pass("cumsum_axis")
def cumsum_axis(graph: Graph) -> tuple[Graph, bool]:
    """Run cumsum along the axis it needs instead of transposing around it."""
    return apply_rules(graph, RULES)
