"""The pass manager: named pipelines, the verifier after every pass, optional
numeric validation, per-pass instrumentation, IR dumps."""
from __future__ import annotations

import os
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dnir.analysis.cost import graph_flops
from dnir.analysis.memory import plan as memory_plan
from dnir.errors import DnirError
from dnir.files import write_text
from dnir.graph import Graph
from dnir.text import print_graph
from dnir.verify import verify

from .rewrite import REBUILT_FROM
from .validate import ValidationError, compare


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[..., tuple[Graph, bool]]   # (graph, **options) -> (graph, changed)
    doc: str = ""


PASSES: dict[str, Pass] = {}


def register_pass(name: str):
    def register(fn):
        PASSES[name] = Pass(name, fn, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
        return fn
    return register


@dataclass
class PassRecord:
    name: str
    seconds: float
    changed: bool
    nodes: int
    ops: Counter
    flops: int
    peak_bytes: int | None
    delta: dict = field(default_factory=dict)   # op -> change in count

    def delta_text(self) -> str:
        return ", ".join(f"{'+' if d > 0 else ''}{d} {op}" for op, d in sorted(self.delta.items())) or "-"

    def to_json(self) -> dict:
        return {"pass": self.name, "seconds": self.seconds, "changed": self.changed, "nodes": self.nodes,
                "ops": dict(self.ops), "flops": self.flops, "peak_bytes": self.peak_bytes,
                "delta": dict(self.delta)}


# Which pass first made each node (None: it came with the graph, or is a copy of one that did): a
# side table (nodes stay as they are), filled by run_pipeline and by a target's preparation
# (lowering/registry.py).
_MADE_BY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _all_nodes(graph: Graph):
    for node in graph.topo_order():
        yield node
        if node.op == "scan":
            yield from _all_nodes(node.attrs["body"])


def record_made_by(before: Graph, after: Graph, pass_name: str):
    """Note `pass_name` as the maker of every node of `after` (scan bodies included) that is new:
    neither in `before` nor a rebuilt copy (rewrite.REBUILT_FROM: the same op on new operands, as
    a rewrite rebuilds the readers of what it changed) of a node made earlier; a copy keeps its
    original's maker."""
    if after is before:
        return
    old = {id(n) for n in _all_nodes(before)}
    for node in _all_nodes(after):
        if node in _MADE_BY or id(node) in old:
            continue
        original = REBUILT_FROM.get(node)
        while original is not None and original not in _MADE_BY and id(original) not in old:
            original = REBUILT_FROM.get(original)
        _MADE_BY[node] = pass_name if original is None else _MADE_BY.get(original)


def made_by(node) -> str | None:
    """The pass that first made `node`, or None for a node that came with the graph."""
    return _MADE_BY.get(node)


def planned_peak_bytes(graph: Graph) -> int:
    """The memory plan's peak: the compute buffer the graph needs."""
    return memory_plan(graph).peak_bytes


def resolve(pipeline) -> list[str]:
    """A pipeline name, a comma-separated string of pass names, or a list of names."""
    if isinstance(pipeline, str):
        if pipeline in PIPELINES:
            return list(PIPELINES[pipeline])
        names = [n.strip() for n in pipeline.split(",") if n.strip()]
    else:
        names = list(pipeline)
    unknown = [n for n in names if n not in PASSES]
    if unknown or (isinstance(pipeline, str) and not names and pipeline):
        raise DnirError(f"unknown pass or pipeline {', '.join(unknown) or pipeline!r}; pipelines: "
                        f"{', '.join(PIPELINES)}; passes: {', '.join(sorted(PASSES))}")
    return names


def snapshot(name, graph, seconds, changed, before: Counter | None) -> PassRecord:
    ops = graph.op_histogram()
    delta = {op: ops[op] - before[op] for op in set(ops) | set(before) if ops[op] != before[op]} if before else {}
    return PassRecord(name, seconds, changed, sum(ops.values()), ops, graph_flops(graph),
                      planned_peak_bytes(graph), delta)


def run_pipeline(graph: Graph, pipeline="O2", *, options: dict | None = None, validate: bool = False,
                 dump_dir: str | None = None, seed: int = 0,
                 progress: Callable | None = None) -> tuple[Graph, list[PassRecord]]:
    """Run the passes in order; returns the graph and one record per pass
    (record 0 is the input graph). A failure names the pass and the ones before it.
    `progress` wraps the list of pass names (e.g. a tqdm bar) to show how far it is."""
    names, options = resolve(pipeline), options or {}
    records = [snapshot("input", graph, 0.0, False, None)]
    rng = np.random.default_rng(seed)
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        _dump(dump_dir, 0, "input", graph)
    for i, name in enumerate(progress(names) if progress else names, 1):
        where = f"pass {name!r} (after {', '.join(names[:i - 1]) or 'no other pass'})"
        start = time.perf_counter()
        new, changed = PASSES[name].fn(graph, **options.get(name, {}))
        seconds = time.perf_counter() - start
        try:
            verify(new)
        except DnirError as e:
            raise type(e)(f"{where}: {e}") from None
        if new.input_types != graph.input_types or new.output_types != graph.output_types \
                or new.meta != graph.meta or new.output_names != graph.output_names:
            raise ValidationError(f"{where} changed the graph's signature or metadata")
        if validate and changed:
            problems = compare(graph, new, rng)
            if problems:
                raise ValidationError(f"{where} changed the results: {'; '.join(problems)}")
        records.append(snapshot(name, new, seconds, changed, records[-1].ops))
        record_made_by(graph, new, name)
        graph = new
        if dump_dir:
            _dump(dump_dir, i, name, graph)
    return graph, records


def _dump(dump_dir, index, name, graph):
    write_text(os.path.join(dump_dir, f"{index:03d}_{name}.dnir"), print_graph(graph))


def report_table(records: list[PassRecord]) -> str:
    head = f"{'pass':<20} {'time ms':>8} {'nodes':>6} {'GFLOP':>10} {'peak MB':>9}  changes"
    lines = [head, "-" * len(head)]
    for r in records:
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f}"
        lines.append(f"{r.name:<20} {r.seconds * 1e3:>8.1f} {r.nodes:>6} {r.flops / 1e9:>10.4f} {peak:>9}  "
                     f"{r.delta_text() if r.changed else ('-' if r.name != 'input' else '')}")
    return "\n".join(lines)


CLEANUP = ["remove_identities", "fold_constants", "cse", "dce"]
LAYOUT = ["eliminate_transposes", "relayout_scan_carries", "cumsum_axis", "eliminate_transposes"]
PIPELINES: dict[str, list[str]] = {
    "O0": [],
    "O1": CLEANUP + LAYOUT + CLEANUP,
    "O2": ["fuse_intra_chunk"] + CLEANUP + LAYOUT + ["hoist_broadcasts", "reassociate_scales", "hoist_loop_invariants",
                              "sum_mul_to_matmul"] + CLEANUP
    + LAYOUT + ["block_tril", "block_solve", "set_vs_acc"] + CLEANUP + ["sum_mul_to_matmul"]
    + LAYOUT + ["propagate_layout"] + CLEANUP,
}
