"""Constant folding: compute what depends only on constants at compile time.

Small results become `const` nodes; a uniform result of any size (an
elementwise op or a layout op on `full` values) becomes one `full` node, so
folding never grows the graph text with large literal tensors.
"""
from __future__ import annotations

import numpy as np

from dnir.analysis.evaluate import evaluate
from dnir.graph import Graph, Node
from dnir.ops import REGISTRY, OpClass, make_node

from .manager import register_pass
from .rewrite import P, Rule, apply_rules

MAX_CONST_ELEMENTS = 64            # larger non-uniform results stay computed at run time


def _keeps_uniform(node: Node) -> bool:
    """A view or a copy of a uniform value is uniform (pad and concat may add other values)."""
    return node.op == "cont" or REGISTRY[node.op].view is not None


def _is_source(node: Node) -> bool:
    return node.op != "input" and REGISTRY[node.op].op_class == "source"


def _evaluate(node: Node) -> np.ndarray | None:
    """The node's value from its source operands (None: an op computed at run time only)."""
    return evaluate(node, [evaluate(i, ()) for i in node.inputs])


def _full(value, like: Node) -> Node:
    return make_node("full", (), {"value": float(value), "shape": like.shape, "dtype": like.dtype})


def fold(m) -> Node | None:
    node = m.node
    if REGISTRY[node.op].op_class in (OpClass.CONTROL, OpClass.FUSED) or _is_source(node) or not node.inputs:
        return None
    if not all(_is_source(i) for i in node.inputs):
        return None
    if all(i.op == "full" for i in node.inputs) and (REGISTRY[node.op].elementwise and
                                                     node.op not in ("tril", "triu")
                                                     or _keeps_uniform(node)):
        scalars = [make_node("full", (), {"value": i.attrs["value"], "shape": (), "dtype": i.dtype})
                   for i in node.inputs]
        if _keeps_uniform(node):
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
