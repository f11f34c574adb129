"""Dead-code elimination.

A Graph holds only what its outputs reach, so the dead code left is inside
scans: stacked outputs nobody reads, carries that only feed themselves and are
not read, and loop operands the body never uses.
"""
from __future__ import annotations

from dnir.graph import Graph, Node
from dnir.ops import make_node

from .manager import register_pass


@register_pass("dce")
def dce(graph: Graph) -> tuple[Graph, bool]:
    """Drop unread scan results, dead carries and unused loop operands."""
    read: dict[int, set] = {}
    for node in graph.topo_order():
        if node.op == "item":
            read.setdefault(id(node.inputs[0]), set()).add(node.attrs["index"])
    new: dict[int, Node] = {id(n): n for n in graph.inputs}
    items: dict[int, dict] = {}       # id(old scan) -> old result index -> new result index
    changed = False
    for node in graph.topo_order():
        if id(node) in new:
            continue
        inputs = [new[id(i)] for i in node.inputs]
        if node.op == "item" and id(node.inputs[0]) in items:
            index = items[id(node.inputs[0])][node.attrs["index"]]
            out = node if inputs[0] is node.inputs[0] and index == node.attrs["index"] else \
                make_node("item", inputs, {"index": index})
        elif node.op == "scan":
            out, index_map = _prune_scan(node, inputs, read.get(id(node), set()))
            items[id(node)] = index_map
        elif any(a is not b for a, b in zip(inputs, node.inputs)):
            out = make_node(node.op, inputs, node.attrs)
        else:
            out = node
        changed |= out is not node
        new[id(node)] = out
    if not changed:
        return graph, False
    return graph.with_outputs([new[id(n)] for n in graph.outputs]), True


def _prune_scan(node: Node, operands, read: set):
    body: Graph = node.attrs["body"]
    body, _ = dce(body)
    nc, nx = node.attrs["num_carry"], node.attrs["num_xs"]
    keep_out = [i for i in range(len(body.outputs)) if i < nc or i in read]
    # A carry nobody reads after the loop, whose body input feeds only its own update, is dead.
    while True:
        dead = None
        for i in (i for i in keep_out if i < nc and i not in read):
            if id(body.inputs[i]) not in _reads(body, [j for j in keep_out if j != i]):
                dead = i
                break
        if dead is None:
            break
        keep_out.remove(dead)
    used = _reads(body, keep_out)
    keep_in = [i for i in range(len(body.inputs)) if (i < nc and i in keep_out) or (i >= nc and id(body.inputs[i]) in used)]
    index_map = {old: new for new, old in enumerate(keep_out)}
    if keep_in == list(range(len(body.inputs))) and len(keep_out) == len(body.outputs) \
            and body is node.attrs["body"] and all(a is b for a, b in zip(operands, node.inputs)):
        return node, index_map
    new_body = Graph([body.inputs[i] for i in keep_in], [body.outputs[j] for j in keep_out],
                     [body.output_names[j] for j in keep_out], body.meta)
    attrs = {**node.attrs, "body": new_body, "num_carry": sum(1 for i in keep_in if i < nc),
             "num_xs": sum(1 for i in keep_in if nc <= i < nc + nx)}
    return make_node("scan", [operands[i] for i in keep_in], attrs), index_map


def _reads(body: Graph, outputs) -> set:
    """ids of the values that the chosen body outputs read (operands and the outputs themselves)."""
    sub = Graph(body.inputs, [body.outputs[j] for j in outputs])
    return {id(x) for n in sub.topo_order() for x in n.inputs} | {id(n) for n in sub.outputs}
