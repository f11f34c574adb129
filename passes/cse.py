"""Common-subexpression elimination: one node per structural key (op, operands, attrs, type)."""
from __future__ import annotations

from dnir.graph import Graph

from .manager import register_pass
from .rewrite import map_bodies, map_nodes


@register_pass("cse")
def cse(graph: Graph) -> tuple[Graph, bool]:
    """Merge structurally equal nodes (inside scan bodies too)."""
    graph, in_bodies = map_bodies(graph, cse)
    table = {}
    graph, changed = map_nodes(graph, lambda node, _: table.setdefault(node.key(), node))
    return graph, changed or in_bodies
