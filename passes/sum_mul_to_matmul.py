"""sum(mul(a, b), axis) with a broadcast operand is a matrix product.

    sum(S^T [.., V, K] * k [.., 1, K], axis=-1)  ->  (S^T @ k^T)[.., V]
    sum(S [.., K, V] * k [.., K, 1], axis=-2)    ->  (S^T @ k)[.., V]

Every axis of the product is a batch axis (both operands vary along it), an
m axis (only a varies), an n axis (only b varies) or the contracted axis. The
operands are laid out as [batch.., m, k] and [batch.., n, k] with transpose_b
(the row-sum form), or, failing that, with the contracted axis on the other
side of either operand (the transpose flags) or with a and b swapped; the
rewrite applies only when the layouts and the way back are reshapes (no
copies), which is the case whenever the axes are already in one of these
orders, as in the decode step in either state layout and in a row-sum
written as sum_rows(S * k).
"""
from __future__ import annotations

import math

from dnir.graph import Graph, Node
from dnir.ops import make_node

from .construct import moves_only_unit_axes, reshape
from .manager import register_pass
from .rewrite import P, Rule, apply_rules


def _aligned(x: Node, rank: int) -> Node:
    x = x.inputs[0] if x.op == "broadcast_to" else x
    return x if x.rank == rank else reshape(x, (1,) * (rank - x.rank) + x.shape)


def _as_matrix(x: Node, order, shape):
    """permute x to `order` and reshape to `shape`, if that permute moves only size-1 axes."""
    if not moves_only_unit_axes(order, x.shape):
        return None
    return x if x.shape == tuple(shape) else reshape(x, shape)


# Operand layouts tried in turn: [.., m, k] x [.., n, k] first (the row-sum form).
FLAGS = ((False, True), (False, False), (True, True), (True, False))


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
    for left, right, lm, rn in ((a, b, ms, ns), (b, a, ns, ms)):
        if batch + lm + rn != sorted(batch + lm + rn):
            continue    # the product's axes; the sum's result keeps them in 0..rank order
        rows, cols = math.prod(left.shape[i] for i in lm), math.prod(right.shape[i] for i in rn)
        for ta, tb in FLAGS:
            a2 = _as_matrix(left, batch + ([k] + lm if ta else lm + [k]) + rn,
                            bshape + ((left.shape[k], rows) if ta else (rows, left.shape[k])))
            b2 = _as_matrix(right, batch + (rn + [k] if tb else [k] + rn) + lm,
                            bshape + ((cols, right.shape[k]) if tb else (right.shape[k], cols)))
            if a2 is not None and b2 is not None:
                out = make_node("matmul", (a2, b2), {"transpose_a": ta, "transpose_b": tb})
                return reshape(out, node.shape)
    return None


@register_pass("sum_mul_to_matmul")
def sum_mul_to_matmul(graph: Graph) -> tuple[Graph, bool]:
    """Turn a broadcast multiply-and-sum over one axis into a matmul."""
    return apply_rules(graph, [Rule(P("sum", P("mul", P.any(), P.any())), sum_of_product, "sum_of_product")])
