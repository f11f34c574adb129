"""Loop-invariant code motion: work in a scan body that depends only on the
loop's invariant operands (and constants) runs once, before the loop.

The hoisted values become new invariant operands of the scan; the operands
they replace are dropped by DCE when nothing else in the body reads them.
A `broadcast_to` stays in the body (hoisting it would only pass a bigger tensor in).
"""
from __future__ import annotations

from dnir.graph import Graph, Node
from dnir.ops import REGISTRY, make_node

from .manager import register_pass
from .rewrite import map_bodies, map_nodes, rebuild


def _is_source(node: Node) -> bool:
    return node.op != "input" and REGISTRY[node.op].op_class == "source"


def hoist_scan(scan: Node) -> Node:
    body: Graph = scan.attrs["body"]
    first_const = scan.attrs["num_carry"] + scan.attrs["num_xs"]
    outside = {id(p): op for p, op in zip(body.inputs[first_const:], scan.inputs[first_const:])}
    invariant = set(outside)
    for node in body.topo_order():
        if _is_source(node) or (node.op != "input" and node.inputs and
                                all(id(i) in invariant for i in node.inputs)):
            invariant.add(id(node))

    def worth_hoisting(node):
        return id(node) in invariant and node.op not in ("input", "broadcast_to") and not _is_source(node)

    frontier = {}
    for node in body.topo_order():
        if not worth_hoisting(node):
            for i in node.inputs:
                if worth_hoisting(i):
                    frontier.setdefault(id(i), i)
    for out in body.outputs:
        if worth_hoisting(out):
            frontier.setdefault(id(out), out)
    if not frontier:
        return scan
    clones = dict(outside)

    def clone(node):
        if id(node) not in clones:
            clones[id(node)] = rebuild(node, [clone(i) for i in node.inputs]) if node.inputs else node
        return clones[id(node)]

    taken = set(body.input_names)
    params, hoisted = {}, []
    for k, node in enumerate(frontier.values()):
        name = next(f"inv{k}_{j}" for j in range(len(taken) + 1) if f"inv{k}_{j}" not in taken)
        params[id(node)] = make_node("input", (), {"name": name, "shape": node.shape, "dtype": node.dtype})
        hoisted.append(clone(node))
    inner, _ = map_nodes(body, lambda node, original: params.get(id(original), node))
    new_body = Graph(body.inputs + tuple(params.values()), inner.outputs, body.output_names, body.meta)
    return make_node("scan", scan.inputs + tuple(hoisted), {**scan.attrs, "body": new_body})


@register_pass("hoist_loop_invariants")
def hoist_loop_invariants(graph: Graph) -> tuple[Graph, bool]:
    """Compute loop-invariant work of scan bodies once, outside the loop."""
    graph, inner = map_bodies(graph, hoist_loop_invariants)
    graph, changed = map_nodes(graph, lambda node, _: hoist_scan(node) if node.op == "scan" else node)
    return graph, changed or inner
