"""Scale products at their small shape: (x * a) * b -> x * (a * b).

A tensor scaled twice by operands that broadcast against it (a per-row beta,
then a per-row exp(gamma)) makes two passes over the large tensor. Multiplying
the two small operands first makes one small product and one pass over the
large tensor. The rule picks, of the three factors, the one whose shape is the
result's and multiplies the other two first, when their product is smaller
than the intermediate it replaces and that intermediate has no other reader.
Float multiplication is not associative, so the rounding changes by an ulp;
the pass manager's numerical validation covers it.
"""
from __future__ import annotations

import math

from dnir.graph import Graph
from dnir.ops import broadcast_shapes, make_node

from .manager import register_pass
from .rewrite import P, Rule, apply_rules


def small_factors_first(m):
    node = m.node
    for inner, outer in (node.inputs, node.inputs[::-1]):
        if inner.op != "mul" or m.uses(inner) != 1 or inner is outer:
            continue
        factors = [*inner.inputs, outer]
        large = next((f for f in factors if f.shape == node.shape), None)
        if large is None:
            continue
        small = [f for f in factors if f is not large]
        if len(small) != 2 or len({f.dtype for f in factors}) != 1:
            continue
        if math.prod(broadcast_shapes(small[0].shape, small[1].shape)) >= math.prod(inner.shape):
            continue
        return make_node("mul", (large, make_node("mul", tuple(small), {})), {})
    return None


@register_pass("reassociate_scales")
def reassociate_scales(graph: Graph) -> tuple[Graph, bool]:
    """Multiply small broadcast factors together before scaling a large tensor."""
    return apply_rules(graph, [Rule(P("mul", P.any(), P.any()), small_factors_first, "small_factors_first")])
