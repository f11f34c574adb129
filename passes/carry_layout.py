"""Scan carries in the layout their loop body wants.

A carry that enters the loop as permute(x, p) (or a slice of one) can be carried
as x instead: the body then reads permute(c, p) and returns permute(c', p^-1),
and eliminate_transposes sinks both into the body's own ops, where they cancel
or fold into matmul flags and sums; after the loop the final value gets
permute(., p), which cancels with the permute back that the program applies
to it. The delta rule carried as S^T [V, K] (ggml's layout) this way runs on
S [K, V] with no transpose per step and none around the loop.

A trial: kept only when the permutes run per call (a body's once per step)
move fewer elements; all eligible carries of the graph together, then each alone.
"""
from __future__ import annotations

from dnir.graph import Graph, Node
from dnir.ops import make_node

from .construct import permute, slice_under_permute
from .layout_cost import cheaper
from .manager import register_pass
from .rewrite import map_nodes, rebuild
from .transposes import eliminate_transposes


def unpermuted(init: Node):
    """(x, p) with init == permute(x, p), x being init's operand or a slice of it; else None."""
    if init.op == "permute":
        return init.inputs[0], init.attrs["axes"]
    if init.op == "slice" and init.inputs[0].op == "permute":
        x, p = init.inputs[0].inputs[0], init.inputs[0].attrs["axes"]
        return slice_under_permute(x, p, init.attrs["starts"], init.attrs["stops"]), p
    return None


def relayout(scan: Node, carries) -> Node:
    """The scan with each carry i in `carries` ({i: (x, p)}) carried as x."""
    body: Graph = scan.attrs["body"]
    inputs, operands, clones = list(body.inputs), list(scan.inputs), {id(n): n for n in body.inputs}
    for i, (x, p) in carries.items():
        inputs[i] = make_node("input", (), {"name": body.inputs[i].attrs["name"], "shape": x.shape,
                                            "dtype": x.dtype})
        operands[i], clones[id(body.inputs[i])] = x, permute(inputs[i], p)
    for node in body.topo_order():
        if id(node) not in clones:
            clones[id(node)] = rebuild(node, [clones[id(j)] for j in node.inputs])
    outputs = [clones[id(o)] for o in body.outputs]
    for i, (_, p) in carries.items():
        outputs[i] = permute(outputs[i], [p.index(a) for a in range(len(p))])
    new_body = Graph(inputs, outputs, body.output_names, body.meta)
    return make_node("scan", operands, {**scan.attrs, "body": new_body})


def with_relayouts(graph: Graph, plan) -> Graph:
    """plan: {id(scan): (scan, {carry: (x, p)})}. The scans' results are read in the old layout."""
    scans, items = {}, {}
    for node in graph.topo_order():
        if node.op == "item" and id(node.inputs[0]) in plan:
            scan, carries = plan[id(node.inputs[0])]
            if id(scan) not in scans:
                scans[id(scan)] = relayout(scan, carries)
            i = node.attrs["index"]
            new = make_node("item", (scans[id(scan)],), {"index": i})
            items[id(node)] = permute(new, carries[i][1]) if i in carries else new
    graph, _ = map_nodes(graph, lambda node, original: items.get(id(original), node))
    return eliminate_transposes(graph)[0]


def plans(graph: Graph) -> list[dict]:
    """Every permuted carry of the graph's scans at once, then each one alone."""
    found = [(scan, i, unpermuted(scan.inputs[i])) for scan in graph.topo_order() if scan.op == "scan"
             for i in range(scan.attrs["num_carry"])]
    found = [(scan, i, xp) for scan, i, xp in found if xp is not None]
    together = {}
    for scan, i, xp in found:
        together.setdefault(id(scan), (scan, {}))[1][i] = xp
    alone = [{id(scan): (scan, {i: xp})} for scan, i, xp in found] if len(found) > 1 else []
    return ([together] if found else []) + alone


@register_pass("relayout_scan_carries")
def relayout_scan_carries(graph: Graph) -> tuple[Graph, bool]:
    """Carry a scan's permuted carries unpermuted when the permutes then cancel."""
    changed = False
    while True:    # each accepted trial moves strictly fewer elements: this ends
        trials = (with_relayouts(graph, plan) for plan in plans(graph))
        trial = next((t for t in trials if cheaper(t, graph)), None)
        if trial is None:
            return graph, changed
        graph, changed = trial, True
