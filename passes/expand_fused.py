"""Expand the fused ops that the context's target has no kernel for.

Each fused op (dnir/fused.py) has one `expand` on its OpDef that rebuilds its
results from primitive ops. A backend's graph keeps the fused nodes whose
kernel takes them (`Target.rejects` is None) and gets every other one
expanded, once; without a target (the default context) every fused op is
expanded. The registry (lowering/registry.py) runs this pass last in every
target's preparation.
"""
from __future__ import annotations

from dnir.graph import Graph, Node
from dnir.ops import REGISTRY, OpClass

from .context import current
from .manager import register_pass
from .rewrite import map_bodies, map_nodes


def _expand(graph: Graph, keeps) -> tuple[Graph, bool]:
    results: dict[int, tuple[Node, ...]] = {}     # id(expanded node, as rebuilt) -> its results

    def visit(node: Node, original: Node) -> Node:
        if node.op == "item" and id(node.inputs[0]) in results:
            return results[id(node.inputs[0])][node.attrs["index"]]
        opdef = REGISTRY[node.op]
        if opdef.op_class is OpClass.FUSED and not keeps(node):
            found = opdef.expand(node)
            if not isinstance(node.type, tuple):
                return found
            results[id(node)] = found     # its items take these; the node itself is left unread
        return node

    graph, in_bodies = map_bodies(graph, lambda body: _expand(body, keeps))
    graph, changed = map_nodes(graph, visit)
    return graph, changed or in_bodies


@register_pass("expand_fused")
def expand_fused(graph: Graph) -> tuple[Graph, bool]:
    """Fused ops the context's target has no kernel for: expanded into primitive ops."""
    target = current().target
    return _expand(graph, lambda node: target is not None and target.rejects(node) is None)
