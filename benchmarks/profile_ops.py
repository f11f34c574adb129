"""Where a graph spends its time on the NumPy backend: every node timed.

The executor below is numpy_backend.execute with a clock around each kernel;
a scan body's nodes are timed on every step and summed, so a node inside the
loop over chunks reports its total over all chunks. Node names are the text
format's (%12, or %3 in the body of scan %40), so a slow node can be found in
`dnir opt --dump` output.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from dnir.analysis.names import value_names
from dnir.graph import Graph, Node
from dnir.lowering.numpy_backend import KERNELS, prepare_inputs, release_plan
from dnir.types import numpy_dtype


@dataclass
class NodeTime:
    name: str          # "%12", or "%40/%3" for node %3 in the body of scan %40
    op: str
    shape: tuple
    seconds: float     # summed over every execution (every scan step)
    calls: int


def profile(graph: Graph, inputs) -> list[NodeTime]:
    """Run `graph` once on `inputs`; the time of every node, slowest first (scans are
    reported through their body's nodes, not as one opaque row)."""
    times: dict[str, NodeTime] = {}
    _execute(graph, prepare_inputs(graph, inputs), times, "")
    return sorted(times.values(), key=lambda t: -t.seconds)


def by_op(rows: list[NodeTime]) -> list[tuple[str, float, int]]:
    """(op, seconds, nodes) summed over nodes, slowest first."""
    total: dict[str, list] = {}
    for r in rows:
        entry = total.setdefault(r.op, [0.0, 0])
        entry[0] += r.seconds
        entry[1] += 1
    return sorted(((op, s, n) for op, (s, n) in total.items()), key=lambda x: -x[1])


def _execute(graph: Graph, args, times, prefix: str):
    names = value_names(graph)
    values: dict[int, np.ndarray] = {id(n): a for n, a in zip(graph.inputs, args)}
    for node, dead in zip(graph.topo_order(), release_plan(graph)):   # values freed as the executor does
        if id(node) not in values:
            operands = [values[id(i)] for i in node.inputs]
            name = prefix + names[id(node)]
            if node.op == "scan":
                values[id(node)] = _scan(node, operands, times, name + "/")
            else:
                start = time.perf_counter()
                dt = None if isinstance(node.type, tuple) else numpy_dtype(node.dtype)
                values[id(node)] = KERNELS[node.op](node, dt, *operands)
                _add(times, name, node, time.perf_counter() - start)
            del operands
        for key in dead:
            values.pop(key, None)
    return [values[id(n)] for n in graph.outputs]


def _scan(node: Node, operands, times, prefix: str):
    body: Graph = node.attrs["body"]
    nc, nx, length = node.attrs["num_carry"], node.attrs["num_xs"], node.attrs["length"]
    carries, xs, consts = list(operands[:nc]), operands[nc:nc + nx], list(operands[nc + nx:])
    ys = [np.empty((length,) + t.shape, dtype=numpy_dtype(t.dtype)) for t in body.output_types[nc:]]
    for step in range(length):
        outs = _execute(body, carries + [x[step] for x in xs] + consts, times, prefix)
        carries = outs[:nc]
        start = time.perf_counter()
        for y, value in zip(ys, outs[nc:]):
            y[step] = value
        _add(times, prefix + "stack", node, time.perf_counter() - start, op="scan(stack ys)")
    return tuple(carries) + tuple(ys)


def _add(times, name, node, seconds, op=None):
    row = times.get(name)
    if row is None:
        shape = node.type[0].shape if isinstance(node.type, tuple) else node.shape
        row = times[name] = NodeTime(name, op or node.op, tuple(shape), 0.0, 0)
    row.seconds += seconds
    row.calls += 1
