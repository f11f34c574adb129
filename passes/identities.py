"""Identity removal: ops that return their operand unchanged, and chains that collapse.

cont of a value that is not a view is an identity (it is already dense);
a chain of reshapes is one reshape; x + 0, x * 1 and x / 1 are x.
"""
from __future__ import annotations

from dnir.graph import Graph
from dnir.ops import REGISTRY, make_node

from .construct import reshape, slice_
from .manager import register_pass
from .rewrite import P, Rule, apply_rules


def may_be_strided(node) -> bool:
    """A view's result may be strided rather than dense (a reshape of a strided value stays
    strided); any other op writes a dense result, so a cont of it copies nothing."""
    return REGISTRY[node.op].view is not None


x = P.any("x")


def same_shape(m):
    return m.x if m.x.type == m.node.type else None


def full_is(value):
    return lambda n: n.op == "full" and n.attrs["value"] == value


def neutral_operand(m):
    """x op c -> x when c is a full of the neutral value and x already has the result's shape."""
    a, b = m.node.inputs
    neutral = {"add": 0.0, "sub": 0.0, "mul": 1.0, "div": 1.0}[m.node.op]
    if full_is(neutral)(b) and a.type == m.node.type:
        return a
    if m.node.op in ("add", "mul") and full_is(neutral)(a) and b.type == m.node.type:
        return b
    return None


def sum_of_unit_axes(m):
    axes = m.node.attrs["axes"]
    if all(m.x.shape[a] == 1 for a in axes):
        return reshape(m.x, m.node.shape)
    return None


def nested_slice(m):
    base = m.inner.attrs["starts"]
    return slice_(m.x, tuple(o + a for o, a in zip(base, m.node.attrs["starts"])),
                  tuple(o + b for o, b in zip(base, m.node.attrs["stops"])))


RULES = [
    Rule(P("permute", x, axes=lambda a: list(a) == sorted(a)), lambda m: m.x, "identity_permute"),
    Rule(P(("reshape", "broadcast_to", "slice", "cont", "cast"), x), same_shape, "same_shape"),
    Rule(P("reshape", P("reshape", x)), lambda m: reshape(m.x, m.node.shape),
         "reshape_chain"),
    Rule(P("broadcast_to", P("broadcast_to", x)),
         lambda m: make_node("broadcast_to", (m.x,), {"shape": m.node.shape}), "broadcast_chain"),
    Rule(P("slice", P("slice", x, name="inner")), nested_slice, "slice_chain"),
    Rule(P("cont", P.any("x", pred=lambda n: not may_be_strided(n))), lambda m: m.x, "cont_of_dense"),
    Rule(P("clamp", x, min=float("-inf"), max=float("inf")), lambda m: m.x, "unbounded_clamp"),
    Rule(P("pad", x, pads=lambda p: not any(a or b for a, b in p)), lambda m: m.x, "empty_pad"),
    Rule(P("concat", x), lambda m: m.x, "single_concat"),
    Rule(P("sum", x), sum_of_unit_axes, "sum_of_unit_axes"),
    Rule(P(("add", "sub", "mul", "div"), P.any(), P.any()), neutral_operand, "neutral_operand"),
    Rule(P("tril", P("tril", x, name="inner")),
         lambda m: make_node("tril", (m.x,), {"k": min(m.node.attrs["k"], m.inner.attrs["k"])}), "tril_tril"),
]


@register_pass("remove_identities")
def remove_identities(graph: Graph) -> tuple[Graph, bool]:
    """Drop identity permutes/reshapes/conts/casts, collapse reshape, broadcast and slice chains."""
    return apply_rules(graph, RULES)
