"""Candidate execution orders for the memory planner.

Any topological order computes the same values, but how many bytes are live at
once depends on it: a value computed long before its first use holds its bytes
all that time. The planner plans each candidate and keeps the smallest arena
(as XLA's memory scheduler tries several and keeps the best):

- the graph's own order (depth-first post-order from the outputs);
- a greedy list schedule: among the ops whose operands are all computed, run
  the one that adds the fewest bytes, counting as freed the operands (through
  views, their storage) that it reads last. Ties go to the earlier op in the
  graph's own order.
"""
from __future__ import annotations

from collections import defaultdict

from ..graph import Graph, Node
from .views import nbytes, view_offset


def candidate_orders(graph: Graph) -> list[list[Node]]:
    default = graph.topo_order()
    greedy = greedy_order(graph)
    return [default] if greedy == default else [default, greedy]


def greedy_order(graph: Graph) -> list[Node]:
    order = graph.topo_order()
    rank = {id(n): i for i, n in enumerate(order)}
    inputs = {id(n) for n in graph.inputs}
    outputs = {id(n) for n in graph.outputs}
    # Storage each value lives in: views share their operand's; scan results are their items'.
    root, size = {}, {}
    for n in order:
        if n.op != "scan" and view_offset(n) is not None:
            root[id(n)] = root[id(n.inputs[0])]
        else:
            root[id(n)] = id(n)
            size[id(n)] = 0 if n.op in ("input", "item") or isinstance(n.type, tuple) else nbytes(n.type)
    for n in order:
        if n.op == "item":             # its bytes are written by the scan
            size[id(n.inputs[0])] += nbytes(n.type)
    pinned = {root[i] for i in inputs | outputs}
    readers = defaultdict(set)         # storage -> ops that read it
    for n in order:
        for i in n.inputs:
            readers[root[id(i)]].add(id(n))
    remaining = {r: len(s) for r, s in readers.items()}
    waiting = {id(n): len({id(i) for i in n.inputs}) for n in order}
    users = defaultdict(set)
    for n in order:
        for i in n.inputs:
            users[id(i)].add(n)

    result = list(graph.inputs)
    ready = {id(n): n for n in order if waiting[id(n)] == 0 and id(n) not in inputs}
    for n in graph.inputs:
        _done(n, users, waiting, ready)

    roots_read = {id(n): {root[id(i)] for i in n.inputs} for n in order}
    own = {id(n): size.get(id(n), 0) if root[id(n)] == id(n) else 0 for n in order}
    costs: dict[int, tuple] = {}        # ready op -> (bytes added, rank); dropped when it changes

    def cost(n):
        if id(n) not in costs:
            freed = sum(size.get(r, 0) for r in roots_read[id(n)] if remaining[r] == 1 and r not in pinned)
            costs[id(n)] = (own[id(n)] - freed, rank[id(n)])
        return costs[id(n)]

    while ready:
        n = min(ready.values(), key=cost)
        del ready[id(n)]
        result.append(n)
        for r in roots_read[id(n)]:
            remaining[r] -= 1
            if remaining[r] == 1:
                for u in readers[r]:
                    costs.pop(u, None)
        _done(n, users, waiting, ready)
    return result


def _done(n, users, waiting, ready):
    for u in users[id(n)]:
        waiting[id(u)] -= 1
        if waiting[id(u)] == 0:
            ready[id(u)] = u
