"""Constructors the passes build nodes with, so that no pass imports another pass's helpers.

Each returns its operand itself when the op would change nothing."""
from __future__ import annotations

from dnir.graph import Node
from dnir.ops import make_node


def permute(node: Node, axes) -> Node:
    """permute(node, axes), composed with node's own permute (a permute never reads a permute)."""
    axes = tuple(axes)
    if node.op == "permute":
        node, axes = node.inputs[0], tuple(node.attrs["axes"][a] for a in axes)
    return node if axes == tuple(range(len(axes))) else make_node("permute", (node,), {"axes": axes})


def reshape(x: Node, shape) -> Node:
    return x if tuple(shape) == x.shape else make_node("reshape", (x,), {"shape": tuple(shape)})
