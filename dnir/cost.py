"""FLOP and byte counts per node and per graph (scan bodies count once per step)."""
from __future__ import annotations

from .graph import Graph, Node
from .ops import REGISTRY, op_flops


def graph_flops(graph: Graph) -> int:
    return sum(op_flops(n) for n in graph.topo_order())


def node_bytes(node: Node) -> int:
    """Bytes an op reads and writes if it runs as one kernel (sources and views move nothing)."""
    if node.op in ("input", "item") or REGISTRY[node.op].kind == "source":
        return 0
    if node.op == "scan":
        return node.attrs["length"] * graph_bytes(node.attrs["body"])
    out = node.type.nbytes
    if node.op == "reshape":
        return 0
    return out + sum(i.type.nbytes for i in node.inputs)


def graph_bytes(graph: Graph) -> int:
    return sum(node_bytes(n) for n in graph.topo_order())
