"""Fold the widening `cast` of a half input into the fused op that reads it, where the target's
kernel loads half operands itself.

A bf16/fp16 layer widens each half input with one `cast` (dnir/models/delta.py), so every op
after it computes in float32. A fused op may instead take the half value and widen it as it
loads it (dnir/fused.py: `compute_dtype`): an operand

    cast(x: bf16 -> f32)                       becomes x
    reshape(broadcast_to(cast(x)))             becomes reshape(broadcast_to(x)), in bf16

(layout ops only move values, so they commute with the cast, and a copy among them then moves
half the bytes; a pad only when its fill value is exact in the narrow dtype). The folded node is
offered to the target (`Target.rejects`): a target folds only into the ops whose kernels load
half operands (`Target.narrow_operands`), so elsewhere the cast stays a node of its own (and the
float32 values it made are read as before). The registry runs this pass after a target's
pipeline, before `expand_fused`.
"""
from __future__ import annotations

from dnir.graph import Graph, Node
from dnir.ops import REGISTRY, OpClass, make_node
from dnir.types import numpy_dtype

from .context import current
from .manager import register_pass
from .rewrite import P, Rule, apply_rules

PASS = "fold_widening_casts"
LAYOUT = ("reshape", "permute", "broadcast_to", "slice", "cont", "pad")


def narrow_source(x: Node) -> Node | None:
    """x rebuilt on the narrower value its widening cast reads (through layout ops), else None."""
    if x.op == "cast":
        src = x.inputs[0]
        return src if src.type.is_float and src.type.itemsize < x.type.itemsize else None
    if x.op in LAYOUT:
        inner = narrow_source(x.inputs[0])
        if inner is None or (x.op == "pad" and float(numpy_dtype(inner.dtype).type(x.attrs["value"]))
                             != x.attrs["value"]):
            return None
        return make_node(x.op, (inner,), x.attrs)
    return None


def fold(m) -> Node | None:
    node = m.node
    inputs = [narrow_source(x) or x for x in node.inputs]
    if all(a is b for a, b in zip(inputs, node.inputs)):
        return None
    folded = make_node(node.op, tuple(inputs), node.attrs)
    if folded.type != node.type:
        return None             # a narrower operand would change what the op computes in
    why = current().target.rejects(folded)
    current().remark(PASS, f"{node.op}: {'half operands kept as casts: ' + why if why else 'reads half operands'}")
    return folded if why is None else None


@register_pass(PASS)
def fold_widening_casts(graph: Graph) -> tuple[Graph, bool]:
    """Half inputs' widening casts folded into the fused ops whose target kernels load half operands."""
    if current().target is None:
        return graph, False
    fused = tuple(op for op, d in REGISTRY.items() if d.op_class is OpClass.FUSED)
    return apply_rules(graph, [Rule(P(fused), fold, PASS)])
