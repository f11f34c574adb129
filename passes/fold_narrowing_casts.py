"""Fold the narrowing `cast` of a fused op's result into the op, where the target's kernel stores
half results itself.

A bf16/fp16 layer computes its o in float32 and narrows it with one `cast` at the end
(dnir/models/delta.py), after the layout ops that trim it (a partial last chunk's slice):

    cast(slice(chunk_output(...)): f32 -> bf16)    becomes slice(chunk_output(...) {dtype=bf16})

so that the kernel rounds each float32 value once as it stores it, which is what the cast did
(layout ops only move values, so they commute with it), and no kernel of its own reads the
float32 o back to write it again, half as wide. Only the fused ops with a `dtype` attribute
(dnir/fused.py: chunk_output) take it, and only where nothing else reads the wide values (the
op and each layout op between it and the cast read once). The folded node is offered to the
target (`Target.rejects`): a target folds only into the ops whose kernels store half results
(`Target.narrow_results`), so elsewhere the cast stays a node of its own. The registry runs this
pass after fold_widening_casts, before `expand_fused`.
"""
from __future__ import annotations

from dnir.graph import Graph
from dnir.ops import REGISTRY, OpClass, make_node
from dnir.types import numpy_dtype

from .context import current
from .fold_widening_casts import LAYOUT
from .manager import register_pass
from .rewrite import P, Rule, apply_rules

PASS = "fold_narrowing_casts"


def fold(m):
    cast = m.node
    x = cast.inputs[0]
    if not (x.type.is_float and cast.type.itemsize < x.type.itemsize):
        return None                                 # a widening cast, or one to an integer
    chain = []                                      # the layout ops between the op and the cast
    while x.op in LAYOUT and m.uses(x) == 1:
        if x.op == "pad" and float(numpy_dtype(cast.dtype).type(x.attrs["value"])) != x.attrs["value"]:
            return None                             # a fill value the narrow dtype does not hold
        chain.append(x)
        x = x.inputs[0]
    op = REGISTRY.get(x.op)
    if op is None or op.op_class is not OpClass.FUSED or "dtype" not in op.attrs or x.attrs["dtype"] \
            or m.uses(x) != 1:
        return None                                 # no op that stores narrower, or its wide o is read elsewhere
    folded = make_node(x.op, x.inputs, {**x.attrs, "dtype": cast.dtype})
    why = current().target.rejects(folded)
    current().remark(PASS, f"{x.op}: {'result kept wide, then cast: ' + why if why else 'stores ' + cast.dtype}")
    if why is not None:
        return None
    for layout in reversed(chain):
        folded = make_node(layout.op, (folded,), layout.attrs)
    return folded


@register_pass(PASS)
def fold_narrowing_casts(graph: Graph) -> tuple[Graph, bool]:
    """Narrowing casts of fused results folded into the ops whose target kernels store half results."""
    if current().target is None:
        return graph, False
    return apply_rules(graph, [Rule(P("cast"), fold, PASS)])
