"""Transpose elimination.

In this IR every value is logically dense, so a permute is a real copy and a
`cont` is a pure copy with no meaning. The rules remove what can be removed:
inverse pairs cancel (two permutes compose into one), a permute that moves
only size-1 axes is a reshape, a swap of the last two axes feeding or fed by a
matmul becomes a transpose flag, permutes move through elementwise ops when
that lets them meet and cancel, and every `cont` goes.
"""
from __future__ import annotations

from dnir.graph import Graph, Node
from dnir.ops import make_node

from .manager import register_pass
from .rewrite import P, Rule, apply_rules, is_elementwise

x = P.any("x")


def permute(node: Node, axes) -> Node:
    axes = tuple(axes)
    return node if axes == tuple(range(len(axes))) else make_node("permute", (node,), {"axes": axes})


def compose(m):
    inner = m.node.inputs[0].attrs["axes"]
    return permute(m.x, [inner[a] for a in m.node.attrs["axes"]])


def moves_only_unit_axes(axes, shape) -> bool:
    """True if the axes longer than 1 keep their relative order (then the permute is a reshape)."""
    big = [a for a in axes if shape[a] != 1]
    return big == sorted(big)


def is_last_two_swap(axes) -> bool:
    n = len(axes)
    return n >= 2 and tuple(axes) == tuple(range(n - 2)) + (n - 1, n - 2)


def fold_into_matmul(m):
    a, b = m.node.inputs
    flags = dict(m.node.attrs)
    if a.op == "permute" and is_last_two_swap(a.attrs["axes"]):
        a, flags["transpose_a"] = a.inputs[0], not flags["transpose_a"]
    elif b.op == "permute" and is_last_two_swap(b.attrs["axes"]):
        b, flags["transpose_b"] = b.inputs[0], not flags["transpose_b"]
    else:
        return None
    return make_node("matmul", (a, b), flags)


def transpose_of_matmul(m):
    """(A B)^T = B^T A^T: swap the operands and flip both flags."""
    mm = m.node.inputs[0]
    a, b = mm.inputs
    return make_node("matmul", (b, a), {"transpose_a": not mm.attrs["transpose_b"],
                                        "transpose_b": not mm.attrs["transpose_a"]})


def _permutable(operand: Node, rank: int) -> bool:
    return operand.rank == 0 or (operand.op == "full" and operand.rank == rank) or \
        (operand.op == "permute" and operand.rank == rank)


def _permuted(operand: Node, axes) -> Node:
    if operand.rank == 0:
        return operand
    if operand.op == "full":
        return make_node("full", (), {**operand.attrs, "shape": tuple(operand.shape[a] for a in axes)})
    return permute(operand, axes)


def _commutes(e: Node, axes) -> bool:
    """tril/triu mask by position in the last two axes: only permutes that keep those commute."""
    n = len(axes)
    return e.op not in ("tril", "triu") or tuple(axes[n - 2:]) == (n - 2, n - 1)


def push_into_elementwise(m):
    """permute(f(permute(a), permute(b))) -> f(permute'(a), permute'(b)): the permutes compose,
    and where they are inverse they vanish. Only when f's result has no other reader."""
    e = m.node.inputs[0]
    if not is_elementwise(e) or m.uses(e) != 1 or not any(i.op == "permute" for i in e.inputs):
        return None
    if not all(_permutable(i, e.rank) for i in e.inputs):
        return None
    axes = m.node.attrs["axes"]
    if not _commutes(e, axes):
        return None
    return make_node(e.op, [_permuted(i, axes) for i in e.inputs], e.attrs)


def sink_out_of_elementwise(m):
    """f(permute(a, p), permute(b, p)) -> permute(f(a, b), p): one copy instead of several."""
    e = m.node
    perms = [i for i in e.inputs if i.op == "permute"]
    if not perms or any(p.shape != e.shape for p in perms):
        return None
    axes = perms[0].attrs["axes"]
    if not _commutes(e, axes):
        return None
    if any(p.attrs["axes"] != axes for p in perms) or not all(i.op == "permute" or i.rank == 0 or
                                                              (i.op == "full" and i.rank == e.rank)
                                                              for i in e.inputs):
        return None
    if len(perms) == 1 and m.uses(perms[0]) > 1:
        return None    # the permute stays for its other reader: sinking would copy twice
    inverse = [axes.index(a) for a in range(len(axes))]
    return permute(make_node(e.op, [_permuted(i, inverse) if i.op != "permute" else i.inputs[0]
                                    for i in e.inputs], e.attrs), axes)


def permute_of_broadcast(m):
    """Permute the small operand, then broadcast: permute(broadcast_to(x)) -> broadcast_to(permute(x))."""
    src, axes = m.x, m.node.attrs["axes"]
    full_rank = make_node("reshape", (src,), {"shape": (1,) * (m.node.rank - src.rank) + src.shape}) \
        if src.rank != m.node.rank else src
    return make_node("broadcast_to", (permute(full_rank, axes),), {"shape": m.node.shape})


def unit_axes_reshape(m):
    if moves_only_unit_axes(m.node.attrs["axes"], m.x.shape):
        return make_node("reshape", (m.x,), {"shape": m.node.shape})
    return None


def permute_of_unit_reshape(m):
    """permute(reshape(x)) where the reshape only adds or drops size-1 axes -> reshape(permute(x)):
    the permute moves next to x's producer, where it may compose or cancel."""
    x, node = m.x, m.node
    big_x = [i for i, d in enumerate(x.shape) if d != 1]
    big_y = [i for i, d in enumerate(node.inputs[0].shape) if d != 1]
    if [x.shape[i] for i in big_x] != [node.inputs[0].shape[i] for i in big_y]:
        return None
    order = [big_x[big_y.index(a)] for a in node.attrs["axes"] if a in big_y]
    moved = permute(x, order + [i for i in range(x.rank) if i not in big_x])
    return make_node("reshape", (moved,), {"shape": node.shape})


RULES = [
    Rule(P("cont", x), lambda m: m.x, "drop_cont"),
    Rule(P("permute", P("permute", x)), compose, "compose_permutes"),
    Rule(P("permute", x), unit_axes_reshape, "unit_axes_permute_to_reshape"),
    Rule(P("permute", P("reshape", x)), permute_of_unit_reshape, "permute_of_unit_reshape"),
    Rule(P("matmul", P.any(), P.any()), fold_into_matmul, "fold_into_matmul_flags"),
    Rule(P("permute", P("matmul", P.any(), P.any()), axes=is_last_two_swap), transpose_of_matmul,
         "transpose_of_matmul"),
    Rule(P("permute", P("broadcast_to", x)), permute_of_broadcast, "permute_of_broadcast"),
    Rule(P("permute", P.any()), push_into_elementwise, "push_into_elementwise"),
    Rule(P(None), lambda m: sink_out_of_elementwise(m) if is_elementwise(m.node) else None,
         "sink_out_of_elementwise"),
]


@register_pass("eliminate_transposes")
def eliminate_transposes(graph: Graph) -> tuple[Graph, bool]:
    """Cancel, fold and drop permutes and conts."""
    return apply_rules(graph, RULES)
