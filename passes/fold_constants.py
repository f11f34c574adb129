"""Constant folding: compute what depends only on constants at compile time.

Small results become `const` nodes; a uniform result of any size (an
elementwise op or a layout op on `full` values) becomes one `full` node, so
folding never grows the graph text with large literal tensors.
"""
from __future__ import annotations

import numpy as np

from dnir.analysis.evaluate import evaluate
from dnir.graph import Graph, Node
from dnir.ops import REGISTRY, make_node

from .manager import register_pass
from .rewrite import P, Rule, apply_rules

MAX_CONST_ELEMENTS = 64            # larger non-uniform results stay computed at run time
UNIFORM_LAYOUT = ("reshape", "permute", "broadcast_to", "slice", "cont")


def _is_source(node: Node) -> bool:
    return node.op != "input" and REGISTRY[node.op].op_class == "source"


def _evaluate(node: Node) -> np.ndarray | None:
    """The node's value from its source operands (None: an op computed at run time only)."""
    return evaluate(node, [evaluate(i, ()) for i in node.inputs])


def _full(value, like: Node) -> Node:
    return make_node("full", (), {"value": float(value), "shape": like.shape, "dtype": like.dtype})


def fold(m) -> Node | None:
    node = m.node
    if node.op in ("scan", "item") or _is_source(node) or not node.inputs:
        return None
    if not all(_is_source(i) for i in node.inputs):
        return None
    if all(i.op == "full" for i in node.inputs) and (REGISTRY[node.op].elementwise and
                                                     node.op not in ("tril", "triu")
                                                     or node.op in UNIFORM_LAYOUT):
        scalars = [make_node("full", (), {"value": i.attrs["value"], "shape": (), "dtype": i.dtype})
                   for i in node.inputs]
        if node.op in UNIFORM_LAYOUT:
            return _full(node.inputs[0].attrs["value"], node)
        return _full(_evaluate(make_node(node.op, scalars, node.attrs)).item(), node)
    if node.type.size > MAX_CONST_ELEMENTS:
        return None
    value = _evaluate(node)
    if value is None:
        return None
    if value.size and np.all(value == value.flat[0]) and node.dtype != "bool":
        return _full(value.flat[0], node)
    return make_node("const", (), {"value": tuple(value.ravel().tolist()), "shape": node.shape,
                                   "dtype": node.dtype})


RULES = [Rule(P(None), fold, "fold")]


@register_pass("fold_constants")
def fold_constants(graph: Graph) -> tuple[Graph, bool]:
    """Replace nodes whose operands are all constants by their value."""
    return apply_rules(graph, RULES)
