"""Recompute broadcast-expanded operands inside the reductions that read them (GPU).

KDA's diagonal blocks read a tensor t = y_j * exp(mask(g_i - g_j)) of shape
[.., b, b, K], built by broadcasting operands b times smaller, and contract it
twice: Akk = k_i . t and Aqk = q_i . t (matrix-vector products after
sum_mul_to_matmul). On the CPU, t made once and shared is right. On a GPU
whose compiler fuses elementwise producers into a reduction (TVM's FuseOps), t
made once is a large write and two large reads, while recomputed inside each
reduction it never reaches memory: the kernels read only the small operands,
and the exponentials are cheap next to the traffic saved.

The rewrite: a matrix-vector product of t [.., n, K], built by elementwise ops
from operands smaller than itself, and a vector x [.., 1, K] (x @ t^T or
t @ x^T) becomes sum(x * t', axis=-1) with t' a private copy of that chain.
Only the order of the channel sum changes. Not in O2: it is the first pass of
the GPU targets' own pipelines (lowering/tvm/backends.py).
"""
from __future__ import annotations

from dnir.graph import Graph, Node
from dnir.ops import make_node

from .construct import reshape
from .manager import register_pass
from .rewrite import P, Rule, apply_rules, is_elementwise


def _expanded(node: Node, size: int) -> bool:
    """An elementwise node of the full size whose chain ends in operands smaller than it."""
    if not is_elementwise(node) or node.type.size != size:
        return False
    return all(_expanded(i, size) or i.type.size < size for i in node.inputs)


def _copy(node: Node, size: int) -> Node:
    if not (is_elementwise(node) and node.type.size == size):
        return node
    return make_node(node.op, tuple(_copy(i, size) for i in node.inputs), node.attrs)


def matvec_as_reduction(m):
    """x [.., 1, K] against t [.., n, K] with transpose_b, either way round."""
    node = m.node
    a, b = node.inputs
    if node.attrs["transpose_a"] or not node.attrs["transpose_b"] or a.rank != b.rank:
        return None
    x, t = (a, b) if a.shape[-2] == 1 else (b, a)
    if x.shape[-2] != 1 or t.shape[:-2] != node.shape[:-2] or not _expanded(t, t.type.size):
        return None
    prod = make_node("mul", (x, _copy(t, t.type.size)), {})
    total = make_node("sum", (prod,), {"axes": (prod.rank - 1,), "keepdims": False})
    return reshape(total, node.shape)


@register_pass("recompute_into_reductions")
def recompute_into_reductions(graph: Graph) -> tuple[Graph, bool]:
    """Matrix-vector products of broadcast-expanded operands: recomputed per reduction."""
    return apply_rules(graph, [Rule(P("matmul", P.any(), P.any()), matvec_as_reduction, "matvec_as_reduction")])
