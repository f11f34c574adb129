"""A builder that reads like NumPy: `b.matmul(x, y, transpose_b=True)`."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .errors import AttrError, DnirError, DTypeError, ShapeError
from .graph import Graph, Node
from .ops import _raise, as_node_like, make_node, slice_by_index
from .types import canonical_dtype
from .verify import verify


def _ints(xs) -> tuple[int, ...]:
    return tuple(int(x) for x in xs)


class Builder:
    """Collects a graph's inputs; each method makes one typed node.

        b = Builder()
        x = b.input("x", (4, 8))
        y = b.exp(b.cumsum(x, axis=1))
        g = b.build(y, names=["y"])
    """

    def __init__(self, dtype="f32"):
        self.default_dtype = canonical_dtype(dtype)
        self.inputs: list[Node] = []

    # -- sources -------------------------------------------------------------
    def input(self, name: str, shape, dtype=None) -> Node:
        if any(n.attrs["name"] == name for n in self.inputs):
            _raise(AttrError, "input", (), f"input name {name!r} is used twice")
        node = make_node("input", (), {"name": name, "shape": _ints(shape),
                                       "dtype": _dtype("input", (), dtype or self.default_dtype)})
        self.inputs.append(node)
        return node

    def const(self, value, dtype=None) -> Node:
        arr = np.asarray(value)
        dtype = _dtype("const", (), dtype or (self.default_dtype if arr.dtype.kind == "f" else arr.dtype))
        return make_node("const", (), {"value": tuple(arr.ravel().tolist()), "shape": arr.shape,
                                       "dtype": dtype})

    def full(self, shape, value, dtype=None) -> Node:
        return make_node("full", (), {"shape": _ints(shape), "value": float(value),
                                      "dtype": _dtype("full", (), dtype or self.default_dtype)})

    def zeros(self, shape, dtype=None) -> Node:
        return self.full(shape, 0.0, dtype)

    def eye(self, n: int, dtype=None) -> Node:
        return make_node("eye", (), {"n": int(n), "dtype": _dtype("eye", (), dtype or self.default_dtype)})

    # -- elementwise ---------------------------------------------------------
    def _binary(self, op, a, b):
        if not isinstance(a, Node) and not isinstance(b, Node):
            _raise(DnirError, op, (a, b), "expected at least one dnir Node operand")
        if not isinstance(a, Node):
            a, b = b, a
            return make_node(op, (_scalar_like(b, a), a), {})
        return make_node(op, (a, _scalar_like(b, a)), {})

    def add(self, a, b): return self._binary("add", a, b)
    def sub(self, a, b): return self._binary("sub", a, b)
    def mul(self, a, b): return self._binary("mul", a, b)
    def div(self, a, b): return self._binary("div", a, b)
    def maximum(self, a, b): return self._binary("maximum", a, b)
    def minimum(self, a, b): return self._binary("minimum", a, b)

    def neg(self, x): return make_node("neg", (x,), {})
    def exp(self, x): return make_node("exp", (x,), {})
    def log(self, x): return make_node("log", (x,), {})
    def sigmoid(self, x): return make_node("sigmoid", (x,), {})
    def softplus(self, x): return make_node("softplus", (x,), {})
    def sqrt(self, x): return make_node("sqrt", (x,), {})
    def rsqrt(self, x): return make_node("rsqrt", (x,), {})

    def cast(self, x, dtype): return make_node("cast", (x,), {"dtype": _dtype("cast", (x,), dtype)})

    def where(self, cond, a, b):
        if not isinstance(a, Node) and not isinstance(b, Node):
            _raise(DnirError, "where", (cond, a, b), "expected at least one dnir Node branch (or cast the condition)")
        ref = a if isinstance(a, Node) else b
        return make_node("where", (cond, _scalar_like(a, ref), _scalar_like(b, ref)), {})

    def clamp(self, x, min=float("-inf"), max=float("inf")):
        return make_node("clamp", (x,), {"min": float(min), "max": float(max)})

    # -- layout --------------------------------------------------------------
    def reshape(self, x, shape) -> Node:
        shape = list(_ints(shape))
        if shape.count(-1) > 1:
            _raise(ShapeError, "reshape", (x,), f"shape {shape} has more than one -1")
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            if known == 0 or x.type.size % known:
                _raise(ShapeError, "reshape", (x,), f"the -1 in shape {shape} cannot be resolved")
            shape[shape.index(-1)] = x.type.size // known
        return make_node("reshape", (x,), {"shape": shape})

    def permute(self, x, axes) -> Node:
        return make_node("permute", (x,), {"axes": _ints(axes)})

    def transpose(self, x, a: int = -2, b: int = -1) -> Node:
        """Swap two axes (the last two by default)."""
        axes = list(range(x.rank))
        if not (-x.rank <= a < x.rank and -x.rank <= b < x.rank):
            _raise(ShapeError, "permute", (x,), f"transpose axes {a}, {b} out of range for rank {x.rank}")
        axes[a], axes[b] = axes[b], axes[a]
        return self.permute(x, axes)

    def broadcast_to(self, x, shape) -> Node:
        return make_node("broadcast_to", (x,), {"shape": _ints(shape)})

    def pad(self, x, pads, value: float = 0.0) -> Node:
        """pads: one (before, after) pair per axis, or fewer pairs for the leading axes."""
        pads = [tuple(_ints(p)) for p in pads] + [(0, 0)] * (x.rank - len(pads))
        return make_node("pad", (x,), {"pads": pads, "value": float(value)})

    def slice(self, x, starts, stops) -> Node:
        return make_node("slice", (x,), {"starts": _ints(starts), "stops": _ints(stops)})

    def slice_axis(self, x, axis: int, start: int, stop: int) -> Node:
        index = [slice(None)] * x.rank
        index[axis] = slice(start, stop)
        return slice_by_index(x, tuple(index))

    def concat(self, xs: Sequence[Node], axis: int) -> Node:
        return make_node("concat", tuple(xs), {"axis": int(axis)})

    def cont(self, x) -> Node:
        return make_node("cont", (x,), {})

    # -- reductions ----------------------------------------------------------
    def sum(self, x, axis=None, keepdims: bool = False) -> Node:
        axes = range(x.rank) if axis is None else ([axis] if isinstance(axis, int) else axis)
        return make_node("sum", (x,), {"axes": _ints(axes), "keepdims": bool(keepdims)})

    def cumsum(self, x, axis: int) -> Node:
        return make_node("cumsum", (x,), {"axis": int(axis)})

    # -- matrices ------------------------------------------------------------
    def matmul(self, a, b, transpose_a: bool = False, transpose_b: bool = False) -> Node:
        return make_node("matmul", (a, b), {"transpose_a": bool(transpose_a), "transpose_b": bool(transpose_b)})

    def tril(self, x, k: int = 0) -> Node:
        return make_node("tril", (x,), {"k": int(k)})

    def triu(self, x, k: int = 0) -> Node:
        return make_node("triu", (x,), {"k": int(k)})

    def solve_tri(self, a, b, lower: bool = True, unit_diagonal: bool = False) -> Node:
        """X with A X = B, A triangular [..., n, n], B [..., n, m]."""
        return make_node("solve_tri", (a, b), {"lower": bool(lower), "unit_diagonal": bool(unit_diagonal)})

    def set(self, dst, src, offsets) -> Node:
        return make_node("set", (dst, src), {"offsets": _ints(offsets)})

    def acc(self, dst, src, offsets) -> Node:
        return make_node("acc", (dst, src), {"offsets": _ints(offsets)})

    # -- control -------------------------------------------------------------
    def scan(self, body: Graph, carries: Sequence[Node], xs: Sequence[Node] = (),
             consts: Sequence[Node] = (), length: int | None = None) -> list[Node]:
        """Loop `body` over the leading axis of `xs`; returns final carries then stacked outputs."""
        if length is None:
            if not xs:
                _raise(AttrError, "scan", tuple(carries) + tuple(consts), "without sequence operands needs length=")
            length = xs[0].shape[0] if xs[0].rank else -1
        node = make_node("scan", tuple(carries) + tuple(xs) + tuple(consts),
                         {"body": body, "length": int(length), "num_carry": len(carries), "num_xs": len(xs)})
        return [make_node("item", (node,), {"index": i}) for i in range(len(node.type))]

    def build(self, outputs, names=None, meta=None) -> Graph:
        if isinstance(outputs, Node):
            outputs = [outputs]
        graph = Graph(self.inputs, outputs, names, meta)
        verify(graph)
        return graph


def _dtype(op, operands, dtype) -> str:
    """canonical_dtype, failing like any other error of the op being built."""
    try:
        return canonical_dtype(dtype)
    except DTypeError as e:
        _raise(DTypeError, op, operands, str(e))


def _scalar_like(value, like: Node) -> Node:
    return as_node_like(value, like)
