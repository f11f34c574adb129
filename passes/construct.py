"""The node constructors and axis arithmetic the passes share, so that no pass imports
another pass's helpers (or rebuilds them by hand). `permute` and `reshape` return their
operand itself when the op would change nothing."""
from __future__ import annotations

from dnir.graph import Node
from dnir.ops import make_node

DEFAULT_BLOCK = 16     # rows per block of the tiled triangular rewrites (block_tril, block_solve)


def op(name, *inputs, **attrs) -> Node:
    """make_node with operands as arguments and attributes as keywords."""
    return make_node(name, inputs, attrs)


def permute(node: Node, axes) -> Node:
    """permute(node, axes), composed with node's own permute (a permute never reads a permute)."""
    axes = tuple(axes)
    if node.op == "permute":
        node, axes = node.inputs[0], tuple(node.attrs["axes"][a] for a in axes)
    return node if axes == tuple(range(len(axes))) else make_node("permute", (node,), {"axes": axes})


def reshape(x: Node, shape) -> Node:
    return x if tuple(shape) == x.shape else make_node("reshape", (x,), {"shape": tuple(shape)})


def slice_(x: Node, starts, stops) -> Node:
    return make_node("slice", (x,), {"starts": tuple(starts), "stops": tuple(stops)})


def slice_axes(x: Node, starts: dict | None = None, stops: dict | None = None) -> Node:
    """x sliced on the axes given ({axis: start}, {axis: stop}); other axes whole."""
    begin, end = [0] * x.rank, list(x.shape)
    for a, s in (starts or {}).items():
        begin[a] = s
    for a, s in (stops or {}).items():
        end[a] = s
    return slice_(x, begin, end)


def rows(x: Node, start: int, stop: int, axis: int) -> Node:
    """x[start:stop] along one axis."""
    return slice_axes(x, {axis % x.rank: start}, {axis % x.rank: stop})


def square(x: Node, r: int, c: int, block: int) -> Node:
    """Block (r, c) of the last two axes, block x block."""
    return slice_axes(x, {x.rank - 2: r * block, x.rank - 1: c * block},
                      {x.rank - 2: (r + 1) * block, x.rank - 1: (c + 1) * block})


def slice_under_permute(x: Node, p, starts, stops) -> Node:
    """The slice of x that permute(., p) turns into slice(permute(x, p), starts, stops)."""
    return slice_axes(x, {a: starts[j] for j, a in enumerate(p)}, {a: stops[j] for j, a in enumerate(p)})


def moves_only_unit_axes(axes, shape) -> bool:
    """True if the axes longer than 1 keep their relative order (then the permute is a reshape)."""
    big = [a for a in axes if shape[a] != 1]
    return big == sorted(big)


def is_last_two_swap(axes) -> bool:
    n = len(axes)
    return n >= 2 and tuple(axes) == tuple(range(n - 2)) + (n - 1, n - 2)
