"""Set versus acc: block assembly without read-modify-write.

- acc into a zero-initialised tensor, at a region no earlier write touched,
  is a set (the sum with zero is the block itself);
- a chain of sets whose blocks tile the whole target (or tile it with the
  untouched rest still the base's `full` value) is one concat of blocks;
- an acc that remains is marked `inplace` when its destination has no other
  reader, so a backend may accumulate into the destination's buffer.
"""
from __future__ import annotations

from dnir.graph import Graph, Node
from dnir.ops import make_node

from .manager import register_pass
from .rewrite import P, Rule, apply_rules


def region(node: Node):
    return tuple((o, o + s) for o, s in zip(node.attrs["offsets"], node.inputs[1].shape))


def overlaps(r1, r2) -> bool:
    return all(a < d and c < b for (a, b), (c, d) in zip(r1, r2))


def chain(node: Node):
    """(base, [(region, block)]) of a chain of set/acc, earliest write first."""
    writes = []
    while node.op in ("set", "acc"):
        writes.append((node.op, region(node), node.inputs[1]))
        node = node.inputs[0]
    return node, writes[::-1]


def acc_to_set(m):
    base, writes = chain(m.node)
    if base.op != "full" or base.attrs["value"] != 0.0:
        return None
    if any(overlaps(r, region(m.node)) for _, r, _ in writes[:-1]):
        return None
    return make_node("set", m.node.inputs, {"offsets": m.node.attrs["offsets"]})


def tile(shape, blocks, fill: Node | None, axis: int = 0):
    """Assemble `blocks` [(region, value)] covering a box of `shape` as nested concats, or None.
    Holes are cut from `fill` (a full), when given."""
    if len(blocks) == 1 and all(b - a == d for (a, b), d in zip(blocks[0][0], shape)):
        return blocks[0][1]
    if not blocks:
        return None if fill is None else make_node("full", (), {**fill.attrs, "shape": shape})
    while axis < len(shape):
        cuts = sorted({0, shape[axis]} | {r[axis][i] for r, _ in blocks for i in (0, 1)})
        if len(cuts) > 2:
            break
        axis += 1
    else:
        return None
    parts = []
    for lo, hi in zip(cuts, cuts[1:]):
        inside = [(r, v) for r, v in blocks if lo <= r[axis][0] and r[axis][1] <= hi]
        if any(r[axis][0] < hi and lo < r[axis][1] and (r, v) not in inside for r, v in blocks):
            return None    # a block straddles a cut
        sub_shape = tuple(hi - lo if i == axis else d for i, d in enumerate(shape))
        shifted = [(tuple((a - lo, b - lo) if i == axis else (a, b) for i, (a, b) in enumerate(r)), v)
                   for r, v in inside]
        part = tile(sub_shape, shifted, fill, axis + 1)
        if part is None:
            return None
        parts.append(part)
    return make_node("concat", parts, {"axis": axis})


def sets_to_concat(m):
    """A chain of sets, from its end (the last set: none writes into it), as concats of its blocks."""
    if any(u.node.op in ("set", "acc") and u.operand == 0 for u in m.users(m.node)):
        return None     # a later write builds on this one: the chain goes on
    base, writes = chain(m.node)
    if any(op != "set" for op, _, _ in writes) or len(writes) < 2:
        return None
    if any(overlaps(r1, r2) for i, (_, r1, _) in enumerate(writes) for _, r2, _ in writes[i + 1:]):
        return None
    return tile(m.node.shape, [(r, v) for _, r, v in writes], base if base.op == "full" else None)


def mark_inplace(m):
    if m.node.attrs["inplace"] or m.uses(m.node.inputs[0]) != 1 or m.node.inputs[0].op == "input":
        return None
    return make_node("acc", m.node.inputs, {**m.node.attrs, "inplace": True})


@register_pass("set_vs_acc")
def set_vs_acc(graph: Graph) -> tuple[Graph, bool]:
    """Replace acc into zeros by set, tiling sets by concat; mark the remaining accs in-place."""
    graph, changed = apply_rules(graph, [Rule(P("acc"), acc_to_set, "acc_into_zeros_is_set")])
    graph, tiled = apply_rules(graph, [Rule(P("set"), sets_to_concat, "tiling_sets_are_concat")])
    graph, marked = apply_rules(graph, [Rule(P("acc"), mark_inplace, "inplace_acc")])
    return graph, changed or tiled or marked
