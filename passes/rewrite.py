"""The rewrite engine: patterns with named captures, rules as data, one fixpoint driver.

    rules = [Rule(P("permute", P("permute", P.any("x"), name="inner")), fuse_permutes)]
    graph, changed = apply_rules(graph, rules)

A rule's function gets a `Match` (the node, its captures by name, who reads what)
and returns a replacement node of the same type, or None to decline. Rules
apply inside scan bodies too; a scan whose body changed is rebuilt.

Patterns say more than op names:

    # the state times a column of decays, in either order (add, mul, maximum and
    # minimum commute: their operands match both ways), the state at least 3-d
    decayed = P("mul", P.any("s", rank=lambda r: r >= 3), P.any("d", shape=lambda t: t[-1] == 1))

    def private_decay(m):
        if m.uses(m.d) != 1:         # operand slots and graph outputs that read d
            return None              # the decay is shared
        # users: who reads a node, at which operand (m.node among them, as itself)
        others = [u.node for u in m.users(m.s) if u.node is not m.node]
        ...
        m.replace(others[0], item_of_the_fused_op)   # a sibling replaced with the rule's node
        return ...

    Rule(decayed, private_decay, "private_decay")

    # alternatives, each with its own captures: the gate with or without its broadcast
    P.either(P("broadcast_to", P.any("g")), P.any("g", pred=lambda n: n.op != "broadcast_to"))

The first order of a commutative op's operands (or the first alternative) that
matches is given to the rule; if the rule declines it, the next is offered.
Captures never leak from one try into another.
"""
from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

from dnir.errors import DnirError
from dnir.graph import Graph, Node
from dnir.ops import REGISTRY, make_node
from dnir.types import TensorType, type_str

MAX_SWEEPS = 64          # loop guard: a rule set that keeps rewriting is a bug in the rules
MAX_REWRITES_PER_NODE = 32


class RewriteError(DnirError):
    """A rule broke the rewrite contract (changed a type) or the rules do not converge."""


def commutes(op: str) -> bool:
    """Whether a pattern on `op` may match its two operands in either order."""
    return REGISTRY[op].commutative


def _holds(want, have) -> bool:
    return want(have) if callable(want) else have == want


class P:
    """A pattern: op name (or a tuple of names, or None for any op), operand
    patterns, attribute constraints (a value, or a predicate on the value),
    constraints on the result's `shape` and `rank` (likewise), an optional
    predicate on the node, and a capture name.

    `shape` is always the result's shape; for the ops whose attribute is called
    shape (reshape, broadcast_to, full, ...) that attribute is the result shape."""

    def __init__(self, op=None, *operands, name=None, pred=None, shape=None, rank=None, **attrs):
        self.ops = (op,) if isinstance(op, str) else op
        # No operand patterns: the operands are not looked at (any number of them).
        self.operands, self.name, self.pred, self.attrs = operands or None, name, pred, attrs
        self.shape, self.rank = shape, rank

    @classmethod
    def any(cls, name=None, pred=None, shape=None, rank=None) -> "P":
        """Matches any node (including graph inputs) without looking at its operands."""
        return cls(None, name=name, pred=pred, shape=shape, rank=rank)

    @classmethod
    def either(cls, *alternatives: "P") -> "P":
        """Matches what any of `alternatives` matches (each in turn, with its own captures)."""
        return _Either(alternatives)

    def match(self, node: Node, caps: dict) -> bool:
        """Whether the pattern matches `node`; the first match's captures are added to `caps`."""
        for found in self.matches(node, caps):
            caps.update(found)
            return True
        return False

    def matches(self, node: Node, caps: dict | None = None) -> Iterator[dict]:
        """Each distinct way the pattern matches `node` (commutative operands in either
        order), as the captures it makes on top of `caps`."""
        seen = set()
        for found in self._match(node, dict(caps or {})):
            key = frozenset((k, id(v)) for k, v in found.items())
            if key not in seen:     # two orders that capture the same nodes are one match
                seen.add(key)
                yield found

    def _match(self, node: Node, caps: dict) -> Iterator[dict]:
        # Every alternative extends its own copy of the captures: a failed order leaves nothing behind.
        if not self._fits(node):
            return
        if self.name is not None:
            if self.name in caps and caps[self.name] is not node:
                return  # a name captured twice must be the same node
            caps = {**caps, self.name: node}
        if self.operands is None:
            yield caps
            return
        orders = (node.inputs, node.inputs[::-1]) if commutes(node.op) else (node.inputs,)
        for inputs in orders:
            yield from _match_all(self.operands, inputs, caps)

    def _fits(self, node: Node) -> bool:
        """The checks on the node itself, before its operands are looked at."""
        if self.ops is not None and node.op not in self.ops:
            return False
        if self.operands is not None and len(self.operands) != len(node.inputs):
            return False
        if any(key not in node.attrs or not _holds(want, node.attrs[key]) for key, want in self.attrs.items()):
            return False
        if self.shape is not None or self.rank is not None:
            if not isinstance(node.type, TensorType):
                return False    # a multi-result node has no one shape
            if self.shape is not None and not _holds(self.shape, node.shape):
                return False
            if self.rank is not None and not _holds(self.rank, node.rank):
                return False
        return self.pred is None or self.pred(node)


class _Either(P):
    def __init__(self, alternatives):
        ops = [alt.ops for alt in alternatives]
        super().__init__(None if None in ops else tuple(dict.fromkeys(o for alt in ops for o in alt)))
        self.alternatives = alternatives

    def _match(self, node: Node, caps: dict) -> Iterator[dict]:
        for alt in self.alternatives:
            yield from alt._match(node, caps)


def _match_all(patterns, nodes, caps: dict) -> Iterator[dict]:
    if not patterns:
        yield caps
        return
    for found in patterns[0]._match(nodes[0], caps):
        yield from _match_all(patterns[1:], nodes[1:], found)


class Use(NamedTuple):
    node: Node      # the reader
    operand: int    # which of its operands it reads


class Sweep:
    """One sweep over a graph: who reads each node in the graph as the sweep began, and the
    replacements rules asked for beyond their own node. A node the sweep built in place of
    another (rebuilt on new operands, or a rule's result) answers for the node it replaces."""

    def __init__(self, graph: Graph, pending: dict):
        self._users: dict[int, list[Use]] = {id(n): [] for n in graph.topo_order()}
        for node in graph.topo_order():
            for slot, inp in enumerate(node.inputs):
                self._users[id(inp)].append(Use(node, slot))
        self._outputs = Counter(id(n) for n in graph.outputs)
        # Nodes are held next to their ids (so that an id stays its own while it is a key).
        self._stands_for: dict[int, tuple[Node, Node]] = {}   # id(new) -> (new, the graph's node)
        self._pending = pending                               # id(node) -> (node, its replacement)
        self._done: dict[int, tuple[Node, Node]] = {}         # id(node) -> (node, what the sweep made of it)
        self.carried: dict[int, tuple[Node, Node]] = {}       # replacements left for the next sweep

    def replaced(self, new: Node, old: Node) -> None:
        """`new` takes `old`'s place (a node of the graph, or one already standing for one)."""
        if id(new) not in self._users and id(new) not in self._stands_for:
            self._stands_for[id(new)] = (new, self.original(old))

    def original(self, node: Node) -> Node:
        """The node of the graph that `node` stands for (itself if it is one)."""
        entry = self._stands_for.get(id(node))
        return node if entry is None else entry[1]

    def users(self, node: Node) -> tuple[Use, ...]:
        return tuple(self._users.get(id(self.original(node)), ()))

    def outputs(self, node: Node) -> int:
        return self._outputs[id(self.original(node))]

    def schedule(self, node: Node, by: Node) -> None:
        """Put `by` in `node`'s place: when the sweep reaches it, or in the next sweep if it has passed it."""
        node = self.original(node)
        done = self._done.get(id(node))
        if done is None:
            self._pending[id(node)] = (node, by)
        else:
            self.carried[id(done[1])] = (done[1], by)

    def start(self, original: Node, node: Node) -> Node:
        """The node to visit for the graph's `original` (rebuilt as `node`): a scheduled replacement, or node."""
        entry = self._pending.pop(id(original), None)
        return entry[1] if entry is not None and entry[0] is original else node

    def finish(self, original: Node, node: Node) -> None:
        self._done[id(original)] = (original, node)


@dataclass
class Match:
    node: Node
    caps: dict
    sweep: Sweep = field(repr=False)
    also: list = field(default_factory=list, repr=False)   # (node, replacement) beside the rule's own

    def __getitem__(self, name) -> Node:
        return self.caps[name]

    def __getattr__(self, name) -> Node:
        try:
            return self.caps[name]
        except KeyError:
            raise AttributeError(name) from None

    def users(self, node: Node) -> tuple[Use, ...]:
        """The nodes that read `node` and at which operand, one per operand slot, in the graph
        as it was at the start of this sweep (for a node rebuilt in this sweep: the readers of
        the node it replaces), the matched node given as itself. A node a rule has just
        built has none."""
        me = self.sweep.original(self.node)
        return tuple(Use(self.node, u.operand) if u.node is me else u for u in self.sweep.users(node))

    def is_output(self, node: Node) -> bool:
        """Whether `node` is an output of the graph being rewritten (for a scan body: of the body)."""
        return self.sweep.outputs(node) > 0

    def uses(self, node: Node) -> int:
        """How many operand slots and graph outputs read `node` (as `users`)."""
        return len(self.users(node)) + self.sweep.outputs(node)

    def replace(self, node: Node, by: Node) -> None:
        """Also put `by` (of the same type) in the place of `node`, another node of the graph (one
        found through `users`, say: the second result of a fused op), if the rule's own
        replacement is taken."""
        if by.type != node.type:
            raise RewriteError(f"{by.op}: {type_str(by.type)} cannot replace {node.op}: {type_str(node.type)}")
        self.also.append((node, by))


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


# new node -> the node it was rebuilt from (the same op on new operands): the pass manager's record
# of which pass made a node (manager.made_by) follows it, so that a rebuilt reader is no new node.
REBUILT_FROM: "weakref.WeakKeyDictionary[Node, Node]" = weakref.WeakKeyDictionary()


def rebuild(node: Node, inputs, **attrs) -> Node:
    return derived(make_node(node.op, inputs, {**node.attrs, **attrs}), node)


def derived(new: Node, old: Node) -> Node:
    """`new` is `old`'s op made again (on new operands, or moved to another layout): note it."""
    if new is not old:
        REBUILT_FROM.setdefault(new, old)
    return new


def map_bodies(graph: Graph, fn: Callable[[Graph], tuple[Graph, bool]]) -> tuple[Graph, bool]:
    """Apply a graph pass to every scan body (inner bodies first); rebuild changed scans."""
    def visit(node, _):
        if node.op != "scan":
            return node
        body, changed = fn(node.attrs["body"])
        return rebuild(node, node.inputs, body=body) if changed else node
    return map_nodes(graph, visit)


def apply_rules(graph: Graph, rules, max_sweeps: int = MAX_SWEEPS) -> tuple[Graph, bool]:
    """Rewrite to a fixpoint: sweep bottom-up, at each node try the rules until
    none applies; repeat sweeps until nothing changes. Scan bodies first."""
    graph, changed = map_bodies(graph, lambda body: apply_rules(body, rules, max_sweeps))
    by_op: dict[str | None, list[Rule]] = {}
    for rule in rules:
        for op in rule.pattern.ops or (None,):
            by_op.setdefault(op, []).append(rule)
    pending: dict = {}
    for _ in range(max_sweeps):
        sweep = Sweep(graph, pending)

        def visit(node, original):
            node = sweep.start(original, node)
            for _ in range(MAX_REWRITES_PER_NODE):
                sweep.replaced(node, original)
                out = _try_rules(node, by_op.get(node.op, []) + by_op.get(None, []), sweep)
                if out is None:
                    sweep.finish(original, node)
                    return node
                node = out
            raise RewriteError(f"rules keep rewriting a {node.op} node: {[r.name for r in rules]}")

        graph, swept = map_nodes(graph, visit)
        if not swept:
            return graph, changed
        changed, pending = True, sweep.carried
    raise RewriteError(f"rules did not converge in {max_sweeps} sweeps: {[r.name for r in rules]}")


def _try_rules(node: Node, rules, sweep: Sweep) -> Node | None:
    if node.op == "input":
        return None
    for rule in rules:
        for caps in rule.pattern.matches(node):
            match = Match(node, caps, sweep)
            out = rule.fn(match)
            if out is None or out is node:
                continue
            if out.type != node.type:
                raise RewriteError(f"rule {rule.name or rule.fn.__name__} turned {node.op}: "
                                   f"{type_str(node.type)} into {out.op}: {type_str(out.type)}")
            for other, by in match.also:
                sweep.schedule(other, by)
            return out
    return None


def is_elementwise(node: Node) -> bool:
    return REGISTRY[node.op].elementwise
