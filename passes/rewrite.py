"""The rewrite engine: patterns with named captures, rules as data, one fixpoint driver.

    rules = [Rule(P("permute", P("permute", P.any("x"), name="inner")), fuse_permutes)]
    graph, changed = apply_rules(graph, rules)

A rule's function gets a `Match` (the node, its captures by name, use counts)
and returns a replacement node of the same type, or None to decline. Rules
apply inside scan bodies too; a scan whose body changed is rebuilt.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from dnir.errors import DnirError
from dnir.graph import Graph, Node
from dnir.ops import REGISTRY, make_node
from dnir.types import type_str

MAX_SWEEPS = 64          # loop guard: a rule set that keeps rewriting is a bug in the rules
MAX_REWRITES_PER_NODE = 32


class RewriteError(DnirError):
    """A rule broke the rewrite contract (changed a type) or the rules do not converge."""


class P:
    """A pattern: op name (or a tuple of names, or None for any op), operand
    patterns, attribute constraints (a value, or a predicate on the value),
    an optional predicate on the node, and a capture name."""

    def __init__(self, op=None, *operands, name=None, pred=None, **attrs):
        self.ops = (op,) if isinstance(op, str) else op
        # No operand patterns: the operands are not looked at (any number of them).
        self.operands, self.name, self.pred, self.attrs = operands or None, name, pred, attrs

    @classmethod
    def any(cls, name=None, pred=None) -> "P":
        """Matches any node (including graph inputs) without looking at its operands."""
        return cls(None, name=name, pred=pred)

    def match(self, node: Node, caps: dict) -> bool:
        if self.ops is not None and node.op not in self.ops:
            return False
        if self.operands is not None and len(self.operands) != len(node.inputs):
            return False
        for key, want in self.attrs.items():
            if key not in node.attrs:
                return False
            have = node.attrs[key]
            if not (want(have) if callable(want) else have == want):
                return False
        if self.pred is not None and not self.pred(node):
            return False
        if self.name is not None:
            if self.name in caps and caps[self.name] is not node:
                return False  # a name captured twice must be the same node
            caps[self.name] = node
        return all(p.match(x, caps) for p, x in zip(self.operands or (), node.inputs))


@dataclass
class Match:
    node: Node
    caps: dict
    use_counts: dict = field(repr=False)

    def __getitem__(self, name) -> Node:
        return self.caps[name]

    def __getattr__(self, name) -> Node:
        try:
            return self.caps[name]
        except KeyError:
            raise AttributeError(name) from None

    def uses(self, node: Node) -> int:
        """How many operand slots read `node` in the graph as it was before this sweep."""
        return self.use_counts.get(id(node), 0)


@dataclass(frozen=True)
class Rule:
    pattern: P
    fn: Callable[[Match], Node | None]
    name: str = ""


def map_nodes(graph: Graph, fn: Callable[[Node, Node], Node]) -> tuple[Graph, bool]:
    """Rebuild `graph` bottom-up: each node gets its operands' new versions,
    then `fn(node, original)` returns the node to use in its place. Inputs never change."""
    new: dict[int, Node] = {id(n): n for n in graph.inputs}
    changed = False
    for node in graph.topo_order():
        if id(node) in new:
            continue
        inputs = tuple(new[id(i)] for i in node.inputs)
        rebuilt = node if all(a is b for a, b in zip(inputs, node.inputs)) else rebuild(node, inputs)
        out = fn(rebuilt, node)
        if out.type != node.type:
            raise RewriteError(f"rewrite of {node.op} changed its type {type_str(node.type)} -> "
                               f"{type_str(out.type)}")
        changed |= out is not node
        new[id(node)] = out
    if not changed:
        return graph, False
    return graph.with_outputs([new[id(n)] for n in graph.outputs]), True


def rebuild(node: Node, inputs, **attrs) -> Node:
    return make_node(node.op, inputs, {**node.attrs, **attrs})


def map_bodies(graph: Graph, fn: Callable[[Graph], tuple[Graph, bool]]) -> tuple[Graph, bool]:
    """Apply a graph pass to every scan body (inner bodies first); rebuild changed scans."""
    def visit(node, _):
        if node.op != "scan":
            return node
        body, changed = fn(node.attrs["body"])
        return rebuild(node, node.inputs, body=body) if changed else node
    return map_nodes(graph, visit)


def use_counts(graph: Graph) -> dict[int, int]:
    counts = {key: len(users) for key, users in graph.uses().items()}
    for out in graph.outputs:
        counts[id(out)] = counts.get(id(out), 0) + 1
    return counts


def apply_rules(graph: Graph, rules, max_sweeps: int = MAX_SWEEPS) -> tuple[Graph, bool]:
    """Rewrite to a fixpoint: sweep bottom-up, at each node try the rules until
    none applies; repeat sweeps until nothing changes. Scan bodies first."""
    graph, changed = map_bodies(graph, lambda body: apply_rules(body, rules, max_sweeps))
    by_op: dict[str | None, list[Rule]] = {}
    for rule in rules:
        for op in rule.pattern.ops or (None,):
            by_op.setdefault(op, []).append(rule)
    for _ in range(max_sweeps):
        counts = use_counts(graph)

        def visit(node, original):
            for _ in range(MAX_REWRITES_PER_NODE):
                counts.setdefault(id(node), counts.get(id(original), 0))  # rebuilt nodes keep their uses
                out = _try_rules(node, by_op.get(node.op, []) + by_op.get(None, []), counts)
                if out is None:
                    return node
                node = out
            raise RewriteError(f"rules keep rewriting a {node.op} node: {[r.name for r in rules]}")

        graph, swept = map_nodes(graph, visit)
        if not swept:
            return graph, changed
        changed = True
    raise RewriteError(f"rules did not converge in {max_sweeps} sweeps: {[r.name for r in rules]}")


def _try_rules(node: Node, rules, counts) -> Node | None:
    if node.op == "input":
        return None
    for rule in rules:
        caps: dict = {}
        if not rule.pattern.match(node, caps):
            continue
        out = rule.fn(Match(node, caps, counts))
        if out is None or out is node:
            continue
        if out.type != node.type:
            raise RewriteError(f"rule {rule.name or rule.fn.__name__} turned {node.op}: {type_str(node.type)} "
                               f"into {out.op}: {type_str(out.type)}")
        return out
    return None


def is_elementwise(node: Node) -> bool:
    return REGISTRY[node.op].elementwise
