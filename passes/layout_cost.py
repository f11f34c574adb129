"""The one layout cost the layout passes weigh a trial rewrite by: the permutes a run of
the graph executes and the elements they move (a scan body's once per step)."""
from __future__ import annotations

from dnir.graph import Graph


def permute_traffic(graph: Graph) -> tuple[int, int]:
    """(permutes run, elements they move) per run of the graph: a scan body's once per step."""
    count, elements = 0, 0
    for node in graph.topo_order():
        if node.op == "permute":
            count, elements = count + 1, elements + node.type.size
        elif node.op == "scan":
            c, e = permute_traffic(node.attrs["body"])
            count, elements = count + c * node.attrs["length"], elements + e * node.attrs["length"]
    return count, elements


def cheaper(new: Graph, old: Graph) -> bool:
    """`new` runs no more permutes and moves no more elements than `old`, and differs in one."""
    (c, e), (c0, e0) = permute_traffic(new), permute_traffic(old)
    return (c, e) != (c0, e0) and c <= c0 and e <= e0


def keep_if_cheaper(trial: Graph, graph: Graph) -> tuple[Graph, bool]:
    """(trial, True) when the trial is cheaper than the graph it was made from, else (graph, False)."""
    return (trial, True) if cheaper(trial, graph) else (graph, False)
