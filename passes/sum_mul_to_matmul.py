"""sum(mul(a, b), axis) with a broadcast operand is a matrix product.

    sum(S^T [.., V, K] * k [.., 1, K], axis=-1)  ->  (S^T @ k^T)[.., V]

Every axis of the product is a batch axis (both operands vary along it), an
m axis (only a varies), an n axis (only b varies) or the contracted axis. The
operands are laid out as [batch.., m, k] and [batch.., n, k] and multiplied
with transpose_b; the rewrite applies only when that layout and the way back
are reshapes (no copies), which is the case whenever the axes are already in
that order, as in the decode step and in a row-sum written as sum_rows(S * k).
"""
from __future__ import annotations

import math

from dnir.graph import Graph, Node
from dnir.ops import make_node

from .manager import register_pass
from .rewrite import P, Rule, apply_rules
from .transposes import moves_only_unit_axes


def _aligned(x: Node, rank: int) -> Node:
    x = x.inputs[0] if x.op == "broadcast_to" else x
    return x if x.rank == rank else make_node("reshape", (x,), {"shape": (1,) * (rank - x.rank) + x.shape})


def _as_matrix(x: Node, order, shape):
    """permute x to `order` and reshape to `shape`, if that permute moves only size-1 axes."""
    if not moves_only_unit_axes(order, x.shape):
        return None
    return x if x.shape == tuple(shape) else make_node("reshape", (x,), {"shape": shape})


def sum_of_product(m):
    node, prod = m.node, m.node.inputs[0]
    if len(node.attrs["axes"]) != 1 or prod.dtype == "bool":
        return None
    rank = prod.rank
    k = node.attrs["axes"][0] % rank
    a, b = (_aligned(x, rank) for x in prod.inputs)
    if a.shape[k] == 1 or b.shape[k] == 1:
        return None
    classes = {"batch": [], "m": [], "n": []}
    for axis in range(rank):
        if axis != k:
            da, db = a.shape[axis], b.shape[axis]
            classes["batch" if da == db else "m" if db == 1 else "n"].append(axis)
    batch, ms, ns = classes["batch"], classes["m"], classes["n"]
    if not ms and not ns:
        return None  # a batched dot product: no broadcast operand, nothing to gain
    bshape = tuple(a.shape[i] for i in batch)
    msize, nsize = math.prod(a.shape[i] for i in ms), math.prod(b.shape[i] for i in ns)
    a2 = _as_matrix(a, batch + ms + ns + [k], bshape + (msize, a.shape[k]))
    b2 = _as_matrix(b, batch + ns + ms + [k], bshape + (nsize, b.shape[k]))
    order = batch + ms + ns     # the product's axes; the sum's result keeps them in 0..rank order
    if a2 is None or b2 is None or order != sorted(order):
        return None
    out = make_node("matmul", (a2, b2), {"transpose_a": False, "transpose_b": True})
    return make_node("reshape", (out,), {"shape": node.shape})


@register_pass("sum_mul_to_matmul")
def sum_mul_to_matmul(graph: Graph) -> tuple[Graph, bool]:
    """Turn a broadcast multiply-and-sum over one axis into a matmul."""
    return apply_rules(graph, [Rule(P("sum", P("mul", P.any(), P.any())), sum_of_product, "sum_of_product")])
