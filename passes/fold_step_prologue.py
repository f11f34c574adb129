"""Fold a decode step's prologue into the step: `token_step` on the layer's raw inputs becomes
`decode_step` (dnir/fused.py), where the target has a kernel for it.

The layer (dnir/models/recurrent.py) makes token_step's vectors from q, k, g with small
elementwise ops of their own, each a kernel and a pass over memory on a GPU or a parallel
region on the CPU:

    q_s   = q * scale, then q_s and k repeated over the value heads of their group (GQA):
            reshape [.., H, 1, K] -> broadcast_to [.., H, group, K] -> reshape [.., HV, K]
    a     = exp(g)                  decay = a, k_row = k a, q_row = q_s a, k_col = k
    qk    = sum(q_s * k, -1)

The rule reads that back from the step's operands (through reshapes; the scale a scalar
constant, the repeat a broadcast of whole K vectors along one axis) and replaces the step
by decode_step(state, q, k, v, g, beta) {scale}, whose kernel computes the prologue per head
as it loads the vectors. A step made any other way is left as it is.
"""
from __future__ import annotations

import math

from dnir.errors import DnirError
from dnir.fused import decode_step
from dnir.graph import Graph, Node

from .context import current
from .fuse_delta_steps import _through_reshapes
from .manager import register_pass
from .rewrite import P, Rule, apply_rules

PASS = "fold_step_prologue"


def _scaled(x: Node) -> tuple[Node, float]:
    """(y, c) when x is y * c (through reshapes) with c a scalar constant, else (x, 1)."""
    x = _through_reshapes(x)
    if x.op == "mul":
        for i in (0, 1):
            c = x.inputs[1 - i]
            if c.op == "const" and c.type.size == 1 and x.inputs[i].shape == x.shape:
                return x.inputs[i], float(c.attrs["value"][0])
    return x, 1.0


def _repeated(x: Node, heads: int, K: int) -> tuple[Node, int] | None:
    """(y, group) when x is y's K-vectors each repeated `group` times in a row (the GQA repeat:
    one broadcast along a new axis of 1, through reshapes), or y itself (group 1); None otherwise."""
    x = _through_reshapes(x)
    if x.op != "broadcast_to":
        return (x, 1) if x.type.size == heads * K else None
    inner = x.inputs[0]
    grown = [a for a, (i, o) in enumerate(zip(inner.shape, x.shape)) if i != o]
    if inner.rank != x.rank or len(grown) != 1 or inner.shape[grown[0]] != 1 \
            or math.prod(x.shape[grown[0] + 1:]) != K or x.type.size != heads * K:
        return None
    return _through_reshapes(inner), x.shape[grown[0]]


def _same(a: Node, b: Node) -> bool:
    """The same value: one node, or the same cast of one node (a cast made twice)."""
    return a is b or (a.op == b.op == "cast" and a.inputs[0] is b.inputs[0] and a.attrs == b.attrs)


def _times_decay(x: Node, decay: Node, batch: tuple, K: int, Kg: int) -> Node | None:
    """y when x is y * decay (through reshapes), decay broadcast per head ([*batch, Kg] against
    y's [*batch, K]), else None."""
    x = _through_reshapes(x)
    if x.op != "mul" or x.shape != batch + (K,):
        return None
    for i in (0, 1):
        d = x.inputs[1 - i]
        if _through_reshapes(d) is decay and d.shape == batch + (Kg,) and x.inputs[i].shape == batch + (K,):
            return x.inputs[i]
    return None


def _source(x: Node, heads: int, K: int):
    """(raw, scale, group) of a vector made as the layer makes q's or k's, else None."""
    x, outer = _scaled(x)
    found = _repeated(x, heads, K)
    if found is None:
        return None
    raw, inner = _scaled(found[0])
    return raw, outer * inner, found[1]


def fold(m) -> Node | None:
    step = m.node
    state, decay, k_col, k_row, q_row, v, beta, qk = step.inputs
    *batch, K, V = state.shape
    batch, heads = tuple(batch), math.prod(state.shape[:-2])
    a = _through_reshapes(decay)
    if a.op != "exp":
        return None
    Kg = decay.type.size // heads
    ks = [_source(x, heads, K) for x in (k_col, _times_decay(k_row, a, batch, K, Kg))
          if x is not None]
    q = _times_decay(q_row, a, batch, K, Kg)
    q = q is not None and _source(q, heads, K)
    s = _through_reshapes(qk)
    if len(ks) != 2 or not q or s.op != "sum" or tuple(s.attrs["axes"]) not in ((-1,), (s.inputs[0].rank - 1,)):
        return None
    (k, k_scale, group), (k2, k2_scale, group2) = ks
    product = s.inputs[0]
    if product.op != "mul" or product.shape != batch + (K,) or not (_same(k, k2) and k_scale == k2_scale == 1):
        return None
    pair = [_source(x, heads, K) for x in product.inputs]
    if None in pair:
        return None
    q_raw, scale, q_group = q
    if not any(_same(p[0], q_raw) and p[1] == scale and _same(o[0], k) and o[1] == 1 and p[2] == o[2] == group
               for p, o in (pair, pair[::-1])) or not group == group2 == q_group:
        return None
    try:
        # v, g and beta as the layer holds them: the kernel reads every operand flat
        new = decode_step(state, q_raw, k, *map(_through_reshapes, (v, a.inputs[0], beta)), scale)[0].inputs[0]
    except DnirError as e:
        current().remark(PASS, f"not folded: {e}")
        return None
    why = current().target.rejects(new)
    current().remark(PASS, f"token_step {'kept: ' + why if why else 'folded with its prologue into decode_step'}")
    return new if why is None else None


@register_pass(PASS)
def fold_step_prologue(graph: Graph) -> tuple[Graph, bool]:
    """A decode step's scaling, gate exp, GQA repeat and q . k folded into the step, where the target has a kernel."""
    if current().target is None:
        return graph, False
    return apply_rules(graph, [Rule(P("token_step"), fold, PASS)])
