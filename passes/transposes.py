"""Transpose elimination.

In this IR every value is logically dense, so a permute is a real copy and a
`cont` is a pure copy with no meaning. The rules remove what can be removed:
inverse pairs cancel (two permutes compose into one), a permute that moves
only size-1 axes is a reshape, a swap of the last two axes feeding or fed by a
matmul becomes a transpose flag, permutes move through elementwise ops when
that lets them meet and cancel, and every `cont` goes.

Permutes also sink toward their readers: through elementwise ops whose other
operands change layout without a copy (scalars, vectors, a rank-1 update),
and into sums, slices and concats, which then move less. A permute with
several readers sinks into all of them only as a trial, kept when the graph
then moves fewer elements: that is how a state carried transposed, S^T = P(S),
read by S^T k, S^T q and a decay and update, runs untransposed with no copy.
A matrix-vector product reads its matrix untransposed (the vector takes the
transpose, which for a vector is a reshape).
"""
from __future__ import annotations

from dnir.graph import Graph, Node
from dnir.ops import make_node

from .construct import is_last_two_swap, moves_only_unit_axes, permute, reshape, slice_under_permute
from .layout_cost import keep_if_cheaper
from .manager import register_pass
from .rewrite import P, Rule, apply_rules, is_elementwise

x = P.any("x")


def compose(m):
    return permute(m.node.inputs[0], m.node.attrs["axes"])   # permute composes with its operand


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


def copy_free(x: Node, axes, m, rank: int):
    """x (an operand of an elementwise op of rank `rank`, aligned from the right) permuted by
    `axes` without copying a value of the op's size, or None: a scalar, a full, a permute
    that `axes` undoes, a permute that moves only size-1 axes (a reshape), or an elementwise
    op read only here whose operands are all such (a rank-1 update k u^T of two vectors)."""
    if x.rank == 0:
        return x
    shape = (1,) * (rank - x.rank) + x.shape
    if x.op == "full":
        return make_node("full", (), {**x.attrs, "shape": tuple(shape[a] for a in axes)})
    if x.rank < rank:
        x = reshape(x, shape)
    if x.op == "permute" and [x.attrs["axes"][a] for a in axes] == list(range(rank)):
        return x.inputs[0]
    if moves_only_unit_axes(axes, x.shape):
        return reshape(x, tuple(x.shape[a] for a in axes))
    if x.op == "input" or not is_elementwise(x) or m.uses(x) != 1 or not _commutes(x, axes):
        return None
    operands = [copy_free(i, axes, m, rank) for i in x.inputs]
    return None if None in operands else make_node(x.op, operands, x.attrs)


def sink_out_of_elementwise(m, shared=False):
    """f(permute(a, p), b) -> permute(f(a, b'), p) where b' is b in a's layout at no copy:
    one copy of the result instead of one per operand, and the permute moves on toward
    its readers. `shared`: also when the permute has other readers (they keep it)."""
    e = m.node
    perms = [i for i in e.inputs if i.op == "permute" and i.shape == e.shape]
    if not perms or not _commutes(e, perms[0].attrs["axes"]):
        return None
    axes = perms[0].attrs["axes"]
    if not shared and len(perms) == 1 and m.uses(perms[0]) > 1:
        return None    # the permute stays for its other reader: sinking would copy twice
    inverse = [axes.index(a) for a in range(len(axes))]
    operands = [copy_free(i, inverse, m, e.rank) for i in e.inputs]
    return None if None in operands else permute(make_node(e.op, operands, e.attrs), axes)


def sum_of_permute(m, shared=False):
    """sum(permute(a, p)) -> permute'(sum(a)): the permute moves the smaller, reduced value
    (and often none at all: summing a transposed matrix over its rows is a column sum)."""
    node, inner = m.node, m.node.inputs[0]
    if not shared and m.uses(inner) > 1:
        return None
    p, rank, keep = inner.attrs["axes"], node.inputs[0].rank, node.attrs["keepdims"]
    summed = {a % rank for a in node.attrs["axes"]}
    out = make_node("sum", (m.x,), {"axes": tuple(sorted(p[a] for a in summed)), "keepdims": keep})
    if keep:
        return permute(out, p)
    kept = [p[a] for a in range(rank) if a not in summed]
    return permute(out, [sorted(kept).index(a) for a in kept])


def slice_of_permute(m, shared=False):
    """slice(permute(x, p)) -> permute(slice'(x), p): the permute moves only the part kept."""
    inner = m.node.inputs[0]
    if not shared and m.uses(inner) > 1:
        return None
    p = inner.attrs["axes"]
    return permute(slice_under_permute(m.x, p, m.node.attrs["starts"], m.node.attrs["stops"]), p)


def concat_of_permutes(m, shared=False):
    """concat(permute(a, p), permute(b, p)) -> permute(concat(a, b), p): one copy for all parts."""
    parts = m.node.inputs
    if any(i.op != "permute" or i.attrs["axes"] != parts[0].attrs["axes"] for i in parts):
        return None
    if not shared and any(m.uses(i) > 1 for i in parts):
        return None
    p = parts[0].attrs["axes"]
    joined = make_node("concat", [i.inputs[0] for i in parts], {"axis": p[m.node.attrs["axis"] % m.node.rank]})
    return permute(joined, p)


def permute_of_broadcast(m):
    """Permute the small operand, then broadcast: permute(broadcast_to(x)) -> broadcast_to(permute(x))."""
    src, axes = m.x, m.node.attrs["axes"]
    full_rank = reshape(src, (1,) * (m.node.rank - src.rank) + src.shape) \
        if src.rank != m.node.rank else src
    return make_node("broadcast_to", (permute(full_rank, axes),), {"shape": m.node.shape})


def unit_axes_reshape(m):
    if moves_only_unit_axes(m.node.attrs["axes"], m.x.shape):
        return reshape(m.x, m.node.shape)
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
    return reshape(moved, node.shape)


def matrix_as_stored(m):
    """A matrix-vector product reads its matrix untransposed: A^T x -> (x^T A)^T, where the
    outer transpose of a vector is a reshape. The matrix is then read row by row."""
    a, b = m.node.inputs
    ta, tb = m.node.attrs["transpose_a"], m.node.attrs["transpose_b"]
    rows, cols = m.node.shape[-2:]
    if ta and cols == 1 < rows:
        flags = {"transpose_a": not tb, "transpose_b": False}
    elif tb and rows == 1 < cols:
        flags = {"transpose_a": False, "transpose_b": not ta}
    else:
        return None
    return reshape(make_node("matmul", (b, a), flags), m.node.shape)


def rules(shared: bool) -> list[Rule]:
    """`shared`: permutes sink into every reader, also when they have several (each gets a copy)."""
    return [
        Rule(P("cont", x), lambda m: m.x, "drop_cont"),
        Rule(P("permute", P("permute", x)), compose, "compose_permutes"),
        Rule(P("permute", x), unit_axes_reshape, "unit_axes_permute_to_reshape"),
        Rule(P("permute", P("reshape", x)), permute_of_unit_reshape, "permute_of_unit_reshape"),
        Rule(P("matmul", P.any(), P.any()), fold_into_matmul, "fold_into_matmul_flags"),
        Rule(P("matmul", P.any(), P.any()), matrix_as_stored, "matrix_as_stored"),
        Rule(P("permute", P("matmul", P.any(), P.any()), axes=is_last_two_swap), transpose_of_matmul,
             "transpose_of_matmul"),
        Rule(P("permute", P("broadcast_to", x)), permute_of_broadcast, "permute_of_broadcast"),
        Rule(P("permute", P.any()), push_into_elementwise, "push_into_elementwise"),
        Rule(P(None), lambda m: sink_out_of_elementwise(m, shared) if is_elementwise(m.node) else None,
             "sink_out_of_elementwise"),
        Rule(P("sum", P("permute", x)), lambda m: sum_of_permute(m, shared), "sum_of_permute"),
        Rule(P("slice", P("permute", x)), lambda m: slice_of_permute(m, shared), "slice_of_permute"),
        Rule(P("concat"), lambda m: concat_of_permutes(m, shared), "concat_of_permutes"),
    ]


RULES = rules(shared=False)
SHARED_RULES = rules(shared=True)


@register_pass("eliminate_transposes")
def eliminate_transposes(graph: Graph) -> tuple[Graph, bool]:
    """Cancel, fold and drop permutes and conts."""
    graph, changed = apply_rules(graph, RULES)
    # A permute read by several ops sinks into each of them only if all the copies then
    # cancel or fold (into matmul flags, sums, other permutes): tried, kept when cheaper.
    trial, sunk = apply_rules(graph, SHARED_RULES)
    kept, cheaper = keep_if_cheaper(trial, graph) if sunk else (graph, False)
    return kept, changed or cheaper
