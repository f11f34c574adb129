"""Recognise the chunked form's work local to each chunk as the fused op `intra_chunk`,
where the target has a kernel for it.

The op's expansion is the chunked model's own construction (dnir/intra_chunk.py:
chunk_operands), so the rule recognises the op by building it again: at a scan over
chunks with six per-chunk operands (each a slice of the chunks of one packed sequence,
or all of them), it finds the five tensors they start from (q, k, v, g and beta, one
node each, through the decayed q, u and k_to_end) and compares the operands,
node by node, with what chunk_operands makes of those five. Equal, the operands
become the op's results; anything else (blocked scores, the factorized decay,
another model's loop) is left as it is.

The later passes of O2 rewrite this subgraph (blocks, solves by blocks, relayouts),
so the rule runs first in O2, inside the target's pass context (the functional API
optimises a graph for its target); without a target, or for one without the kernel,
nothing changes.
"""
from __future__ import annotations

from dnir.builder import Builder
from dnir.errors import DnirError
from dnir.fused import CHUNK_ROLES, intra_chunk
from dnir.graph import Node, _attr_equal
from dnir.intra_chunk import chunk_operands
from dnir.ops import make_node

from .context import current
from .manager import register_pass
from .rewrite import P, Rule, apply_rules

PASS = "fuse_intra_chunk"


def _same(a: Node, b: Node, seen: dict) -> bool:
    """a and b compute the same value: the same node, or the same op, attributes and type on
    operands that are the same, recursively."""
    if a is b:
        return True
    key = (id(a), id(b))
    if key not in seen:
        seen[key] = (a.op == b.op and a.type == b.type and len(a.inputs) == len(b.inputs)
                     and a.op != "input" and set(a.attrs) == set(b.attrs)
                     and all(_attr_equal(a.attrs[n], b.attrs[n]) for n in a.attrs)
                     and all(_same(x, y, seen) for x, y in zip(a.inputs, b.inputs)))
    return seen[key]


def _whole(x: Node) -> tuple[Node, dict | None]:
    """(x, None), or (the operand, the slice's attributes) when x slices the leading axis only."""
    if x.op == "slice" and x.inputs[0].shape[1:] == x.shape[1:]:
        return x.inputs[0], dict(x.attrs)
    return x, None


def _unchunked(x: Node) -> Node:
    """t of reshape(cont(permute(t))), the layer's tensor before it was split into chunks."""
    return x.inputs[0].inputs[0].inputs[0]


def _sources(w, u, q_decayed, aqk, k_to_end, last_decay):
    """(q, k, v, g, beta) the operands would be made from, if they are chunk_operands' results
    (each operand is chunk_major(x) = cont(permute(x)))."""
    qd = q_decayed.inputs[0].inputs[0]                       # mul(q, exp(gam))
    gam = qd.inputs[1].inputs[0]                             # cont(transpose(cumsum(g_t)))
    g_t = gam.inputs[0].inputs[0].inputs[0]                  # cont(transpose(g in chunks))
    scaled_v = u.inputs[0].inputs[0].inputs[1]               # mul(v, beta)
    kte = k_to_end.inputs[0].inputs[0]                       # mul(k, exp(suffix sums))
    return (_unchunked(qd.inputs[0]), _unchunked(kte.inputs[0]), _unchunked(scaled_v.inputs[0]),
            _unchunked(g_t.inputs[0].inputs[0]), _unchunked(scaled_v.inputs[1]))


def fuse(m) -> Node | None:
    scan = m.node
    operands = [_whole(x) for x in scan.inputs[1:1 + len(CHUNK_ROLES)]]
    xs = [x for x, _ in operands]
    try:
        sources = _sources(*xs)
        chunk_size = xs[0].shape[-2]
        expected = chunk_operands(Builder(xs[0].dtype), *sources, chunk_size)
    except (IndexError, DnirError):
        return None
    seen: dict = {}
    if not all(_same(x, e, seen) for x, e in zip(xs, expected)):
        return None
    items = intra_chunk(*sources, chunk_size)
    ctx = current()
    why = ctx.target.rejects(items[0].inputs[0])
    ctx.remark(PASS, f"intra_chunk {'not fused: ' + why if why else 'fused'} (chunks of {chunk_size})")
    if why is not None:
        return None
    new = [item if cut is None else make_node("slice", (item,), cut) for item, (_, cut) in zip(items, operands)]
    return scan.replace(inputs=(scan.inputs[0], *new, *scan.inputs[1 + len(CHUNK_ROLES):]))


@register_pass(PASS)
def fuse_intra_chunk(graph):
    """The work local to each chunk: the fused op intra_chunk, where the target has a kernel."""
    if current().target is None:
        return graph, False
    return apply_rules(graph, [Rule(P("scan", num_carry=1, num_xs=len(CHUNK_ROLES)), fuse, PASS)])
