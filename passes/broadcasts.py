"""Broadcast hoisting: compute at the small shape, broadcast once, late.

Every elementwise op and matmul broadcasts its operands by itself, so a
materialised `broadcast_to` feeding one is a wasted copy. The rules strip such
operands; when all operands were broadcast, the op runs at the small shape and
one `broadcast_to` of its result moves towards the consumers (where the next
op strips it again, or CSE shares it between users).
"""
from __future__ import annotations

from dnir.graph import Graph, Node
from dnir.ops import broadcast_shapes, make_node

from .construct import reshape
from .manager import register_pass
from .rewrite import P, Rule, apply_rules, is_elementwise

POSITIONAL = ("tril", "triu")    # elementwise, but the result depends on the position in the last two axes


def _keeps_matrix_axes(node: Node) -> bool:
    src = node.inputs[0]
    return src.rank >= 2 and src.shape[-2:] == node.shape[-2:]


def strip_elementwise(m):
    e = m.node
    if not is_elementwise(e) or not any(i.op == "broadcast_to" for i in e.inputs):
        return None
    if e.op in POSITIONAL and not _keeps_matrix_axes(e.inputs[0]):
        return None
    stripped = [i.inputs[0] if i.op == "broadcast_to" else i for i in e.inputs]
    small = make_node(e.op, stripped, e.attrs)
    if small.shape == e.shape:
        return small
    return make_node("broadcast_to", (small,), {"shape": e.shape})


def strip_matmul(m):
    """matmul broadcasts its batch axes; a broadcast that leaves the matrix axes alone is not needed."""
    operands = [i.inputs[0] if i.op == "broadcast_to" and _keeps_matrix_axes(i) else i for i in m.node.inputs]
    if all(a is b for a, b in zip(operands, m.node.inputs)):
        return None
    small = make_node("matmul", operands, m.node.attrs)
    if small.shape == m.node.shape:
        return small
    return make_node("broadcast_to", (small,), {"shape": m.node.shape})


def strip_sum(m):
    """A sum over axes the operand was only broadcast along is the small sum times the count."""
    node, src = m.node, m.x
    pad = node.inputs[0].rank - src.rank
    axes = [a % node.inputs[0].rank for a in node.attrs["axes"]]
    if any(a >= pad and src.shape[a - pad] != 1 for a in axes):
        return None
    count = 1
    for a in axes:
        count *= node.inputs[0].shape[a]
    aligned = reshape(src, (1,) * pad + src.shape) if pad else src
    summed = reshape(aligned, _reduced(aligned.shape, axes, node.attrs["keepdims"]))
    scaled = make_node("mul", (summed, make_node("full", (), {"value": float(count), "shape": (),
                                                               "dtype": node.dtype})), {})
    shape = broadcast_shapes(scaled.shape, node.shape)
    return scaled if scaled.shape == node.shape else make_node("broadcast_to", (scaled,), {"shape": shape})


def _reduced(shape, axes, keepdims):
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


RULES = [
    Rule(P("broadcast_to", P("broadcast_to", P.any("x"))),
         lambda m: make_node("broadcast_to", (m.x,), {"shape": m.node.shape}), "broadcast_chain"),
    Rule(P(None), strip_elementwise, "elementwise_at_small_shape"),
    Rule(P("matmul", P.any(), P.any()), strip_matmul, "matmul_broadcasts_batch"),
    Rule(P("sum", P("broadcast_to", P.any("x"))), strip_sum, "sum_of_broadcast"),
]


@register_pass("hoist_broadcasts")
def hoist_broadcasts(graph: Graph) -> tuple[Graph, bool]:
    """Remove broadcast_to feeding ops that broadcast by themselves; broadcast late."""
    return apply_rules(graph, RULES)
