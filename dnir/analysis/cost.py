"""FLOP and byte counts per node and per graph (a scan's body counts once per step).

FLOPs follow the op registry's rules (matmul 2*m*n*k, elementwise ops one per
output element, sum one per input element, cumsum one per element, solve_tri
n^2 per right-hand-side column, acc one per added element). Bytes are what an
op reads and writes if it runs as one kernel: sources and views (reshape, a
contiguous slice, a scan's item) move nothing.
"""
from __future__ import annotations

from ..graph import Graph, Node
from ..ops import REGISTRY, graph_flops, op_flops
from .views import view_offset

__all__ = ["graph_bytes", "graph_flops", "node_bytes", "node_flops"]


def node_flops(node: Node) -> int:
    return op_flops(node)


def node_bytes(node: Node) -> int:
    if node.op in ("input", "item") or REGISTRY[node.op].op_class == "source":
        return 0
    if node.op == "scan":
        return node.attrs["length"] * graph_bytes(node.attrs["body"])
    if view_offset(node) is not None:
        return 0
    return node.type.nbytes + sum(i.type.nbytes for i in node.inputs)


def graph_bytes(graph: Graph) -> int:
    return sum(node_bytes(n) for n in graph.topo_order())
