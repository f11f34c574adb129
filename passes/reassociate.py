"""Scale products at their small shape.

- (x * a) * b -> x * (a * b). A tensor scaled twice by operands that broadcast
  against it (a per-row beta, then a per-row exp(gamma)) makes two passes over
  the large tensor. Multiplying the two small operands first makes one small
  product and one pass over the large tensor. The rule picks, of the three
  factors, the one whose shape is the result's and multiplies the other two
  first, when their product is smaller than the intermediate it replaces and
  that intermediate has no other reader.
- A @ (X * s) -> (A * s') @ X, with s one factor per contracted index (a
  diagonal matrix between the two operands): the scale moves to the smaller
  operand, e.g. W = T (k beta) with T the C x C inverse and k a C x K block.

Float multiplication is not associative, so the rounding changes by an ulp;
the pass manager's numerical validation covers it.
"""
from __future__ import annotations

import math

from dnir.graph import Graph
from dnir.ops import broadcast_shapes, make_node

from .construct import reshape
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


def _contracted_axis(side: int, transposed: bool) -> int:
    """The contracted axis of matmul operand `side` (0: a [.., m, k]; 1: b [.., k, n])."""
    return (-2 if transposed else -1) if side == 0 else (-1 if transposed else -2)


def scale_smaller_operand(m):
    node = m.node
    flags = (node.attrs["transpose_a"], node.attrs["transpose_b"])
    for side in (0, 1):
        scaled, other = node.inputs[side], node.inputs[1 - side]
        if scaled.op != "mul" or m.uses(scaled) != 1 or scaled.rank < 2:
            continue
        axis, other_axis = _contracted_axis(side, flags[side]), _contracted_axis(1 - side, flags[1 - side])
        for x, s in (scaled.inputs, scaled.inputs[::-1]):
            free = -3 - axis      # the operand's other matrix axis (-1 <-> -2)
            if (x.shape != scaled.shape or s.rank != x.rank or s.shape[free] != 1
                    or s.shape[axis] != x.shape[axis] or s.dtype != other.dtype):
                continue
            moved = s if axis == other_axis else \
                reshape(s, s.shape[:-2] + (s.shape[-1], s.shape[-2]))
            if (broadcast_shapes(other.shape, moved.shape) != other.shape
                    or math.prod(other.shape) >= math.prod(x.shape)):
                continue
            operands = [x, x]
            operands[1 - side] = make_node("mul", (other, moved), {})
            return make_node("matmul", tuple(operands), dict(node.attrs))
    return None


@register_pass("reassociate_scales")
def reassociate_scales(graph: Graph) -> tuple[Graph, bool]:
    """Multiply small broadcast factors together before scaling a large tensor, and scale
    the smaller operand of a matmul."""
    return apply_rules(graph, [Rule(P("mul", P.any(), P.any()), small_factors_first, "small_factors_first"),
                               Rule(P("matmul", P.any(), P.any()), scale_smaller_operand, "scale_smaller_operand")])
