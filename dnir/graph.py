"""Immutable typed nodes and the Graph that holds them."""
from __future__ import annotations

from collections import Counter
from types import MappingProxyType

import numpy as np

from .types import TensorType, type_str

# Node's operators build typed nodes, which the op registry does, and a graph's str() is
# the text format's printer; both modules import this one, so each installs what it
# provides here when imported (dnir.ops: build, operand, index; dnir.text: print).
_INSTALLED: dict = {}


def install(**functions):
    _INSTALLED.update(functions)


def _freeze(value):
    """Attribute values are stored immutably: lists become tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


class Node:
    """One operation: `op(inputs) {attrs} -> type`. Never mutated after creation.

    `type` is a TensorType, or a tuple of them for multi-result ops (`scan`),
    whose results are read with `item` nodes.
    """

    __slots__ = ("op", "inputs", "attrs", "type", "__weakref__")

    def __init__(self, op: str, inputs, attrs, type):
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "inputs", tuple(inputs))
        object.__setattr__(self, "attrs", MappingProxyType({k: _freeze(v) for k, v in dict(attrs).items()}))
        object.__setattr__(self, "type", type)

    def __setattr__(self, name, value):
        raise AttributeError("dnir nodes are immutable; use node.replace(...)")

    def replace(self, *, op=None, inputs=None, attrs=None, type=None) -> "Node":
        """A new node with some fields changed; type is re-inferred unless given."""
        new_op = self.op if op is None else op
        new_inputs = self.inputs if inputs is None else tuple(inputs)
        new_attrs = dict(self.attrs) if attrs is None else dict(attrs)
        if type is not None:
            return Node(new_op, new_inputs, new_attrs, type)
        if new_op == "input":
            return Node(new_op, new_inputs, new_attrs, self.type)
        return _INSTALLED["build"](new_op, new_inputs, new_attrs)

    # Shortcuts used everywhere.
    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    @property
    def rank(self) -> int:
        return len(self.type.shape)

    def key(self):
        """Structural identity of this node given its inputs' identities (for CSE)."""
        return (self.op, tuple(id(i) for i in self.inputs), _attr_key(self.attrs), self.type)

    def __repr__(self) -> str:
        name = f" {self.attrs['name']!r}" if self.op == "input" else ""
        return f"<Node {self.op}{name}: {type_str(self.type)}>"

    # Arithmetic sugar so graphs read like NumPy: x * y, x @ y, -x, x[0:4].
    def _bin(self, op, other, swap=False):
        other = _INSTALLED["operand"](other, self)
        a, b = (other, self) if swap else (self, other)
        return _INSTALLED["build"](op, (a, b), {})

    def __add__(self, o): return self._bin("add", o)
    def __radd__(self, o): return self._bin("add", o, True)
    def __sub__(self, o): return self._bin("sub", o)
    def __rsub__(self, o): return self._bin("sub", o, True)
    def __mul__(self, o): return self._bin("mul", o)
    def __rmul__(self, o): return self._bin("mul", o, True)
    def __truediv__(self, o): return self._bin("div", o)
    def __rtruediv__(self, o): return self._bin("div", o, True)

    def __matmul__(self, o):
        return _INSTALLED["build"]("matmul", (self, o), {})

    def __neg__(self):
        return _INSTALLED["build"]("neg", (self,), {})

    def __getitem__(self, index):
        return _INSTALLED["index"](self, index)

    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other


def _attr_key(attrs):
    return tuple(sorted((k, id(v) if isinstance(v, Graph) else v) for k, v in attrs.items()))


class Graph:
    """A function: input nodes in order, output nodes in order (with names).

    Everything else is derived on demand: the topological order, the use lists.
    """

    def __init__(self, inputs, outputs, output_names=None, meta=None):
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        if output_names is None:
            output_names = [f"out{i}" for i in range(len(self.outputs))]
        self.output_names = tuple(output_names)
        # What the graph computes, for tools that need more than its ops
        # (e.g. the model options an oracle check needs). Passes carry it over.
        self.meta = {k: _freeze(v) for k, v in (meta or {}).items()}
        self._order = None

    def with_outputs(self, outputs) -> "Graph":
        """The same function signature and metadata with new output nodes."""
        return Graph(self.inputs, outputs, self.output_names, self.meta)

    @property
    def input_types(self) -> tuple[TensorType, ...]:
        return tuple(n.type for n in self.inputs)

    @property
    def output_types(self) -> tuple[TensorType, ...]:
        return tuple(n.type for n in self.outputs)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(n.attrs["name"] for n in self.inputs)

    def topo_order(self) -> list[Node]:
        """Every node reachable from the outputs, each after its inputs.

        The graph's inputs come first in their declared order; the rest is a
        depth-first post-order from the outputs (deterministic, so the printed
        text of a graph is stable).
        """
        if self._order is None:
            order, seen = list(self.inputs), {id(n) for n in self.inputs}
            for root in self.outputs:
                stack = [(root, False)]
                while stack:
                    node, expanded = stack.pop()
                    if id(node) in seen:
                        continue
                    if expanded:
                        seen.add(id(node))
                        order.append(node)
                        continue
                    stack.append((node, True))
                    for inp in reversed(node.inputs):
                        if id(inp) not in seen:
                            stack.append((inp, False))
            self._order = order
        return self._order

    def __iter__(self):
        return iter(self.topo_order())

    def __len__(self) -> int:
        return len(self.topo_order())

    def uses(self) -> dict[int, list[Node]]:
        """id(node) -> the nodes that read it (one entry per operand slot)."""
        users: dict[int, list[Node]] = {id(n): [] for n in self.topo_order()}
        for node in self.topo_order():
            for inp in node.inputs:
                users[id(inp)].append(node)
        return users

    def op_histogram(self, recursive: bool = True) -> Counter:
        hist = Counter()
        for node in self.topo_order():
            hist[node.op] += 1
            if recursive and node.op == "scan":
                hist.update(node.attrs["body"].op_histogram())
        return hist

    def node_count(self, recursive: bool = True) -> int:
        return sum(self.op_histogram(recursive).values())

    def to_networkx(self):
        import networkx as nx
        g = nx.DiGraph()
        for node in self.topo_order():
            g.add_node(id(node), node=node)
            for inp in node.inputs:
                g.add_edge(id(inp), id(node))
        return g

    def __repr__(self) -> str:
        return f"<Graph {len(self.inputs)} inputs, {len(self.outputs)} outputs, {len(self)} nodes>"

    def __str__(self) -> str:
        return _INSTALLED["print"](self)


def structurally_equal(a: Graph, b: Graph) -> bool:
    """Same inputs, outputs and nodes up to renaming of intermediate values."""
    if len(a.inputs) != len(b.inputs) or len(a.outputs) != len(b.outputs):
        return False
    if a.output_names != b.output_names or not _attr_equal(tuple(sorted(a.meta.items())),
                                                             tuple(sorted(b.meta.items()))):
        return False
    pairs: dict[int, int] = {}
    for x, y in zip(a.inputs, b.inputs):
        if x.type != y.type or x.attrs["name"] != y.attrs["name"]:
            return False
        pairs[id(x)] = id(y)
    order_a, order_b = a.topo_order(), b.topo_order()
    if len(order_a) != len(order_b):
        return False
    for x, y in zip(order_a, order_b):
        if id(x) in pairs:
            continue
        if x.op != y.op or x.type != y.type or len(x.inputs) != len(y.inputs):
            return False
        if any(pairs.get(id(i)) != id(j) for i, j in zip(x.inputs, y.inputs)):
            return False
        if set(x.attrs) != set(y.attrs):
            return False
        for k, v in x.attrs.items():
            w = y.attrs[k]
            if isinstance(v, Graph):
                if not isinstance(w, Graph) or not structurally_equal(v, w):
                    return False
            elif not _attr_equal(v, w):
                return False
        pairs[id(x)] = id(y)
    return all(pairs.get(id(x)) == id(y) for x, y in zip(a.outputs, b.outputs))


def _attr_equal(v, w) -> bool:
    if isinstance(v, float) and isinstance(w, float):
        return v == w or (v != v and w != w)
    if isinstance(v, tuple) and isinstance(w, tuple):
        return len(v) == len(w) and all(_attr_equal(p, q) for p, q in zip(v, w))
    return type(v) is type(w) and v == w
