"""Layout propagation: move permutes up toward the graph inputs, where they merge.

A permute, or a permute of a reshape that only splits axes, is a layout
transform T of the value y it reads (`Layout`, below). T moves above the op
that makes y when that op treats the axes T moves alike: elementwise ops (an
operand that broadcasts gets T as well), the batch axes of matmul, solve_tri,
tril and triu, any axis of cumsum, sum, slice and concat that T keeps whole,
broadcast_to and full; over another permute it composes. A permute of a
reshape that merges axes becomes split -> permute -> merge when the permute
keeps each merged run together, and size-1 axes move by reshapes only, so
that transforms which differ only there are equal. Moved up this way, the
transforms that one input gets on several paths meet at it and merge: the
delta-net layer's "to chunks" copy and its "chunk-major for the scan" copies
become one permute per input.

Each move gives every operand of the op a permute, so the pass keeps its
result only when the graph ends with fewer permutes moving no more elements.
"""
from __future__ import annotations

import math

from dnir.graph import Graph, Node
from dnir.ops import make_node

from .construct import moves_only_unit_axes, permute, reshape, slice_
from .cse import cse
from .layout_cost import keep_if_cheaper
from .manager import register_pass
from .rewrite import P, Rule, apply_rules, derived, is_elementwise

MAX_ROUNDS = 16   # rule sweeps and merges of equal permutes, alternating


# ---------------------------------------------------------------------------
# Layout transforms: cut each axis of a value into pieces, then reorder the pieces.
# A permute, or a permute of a reshape that only splits axes, is one such transform T;
# `Layout.of` says what T is for each operand of the op that T moves above.


def split_groups(src, dst):
    """dst as src with each axis cut into pieces: the pieces per src axis (none for
    a size-1 axis dst drops), or None when dst is not such a split."""
    groups, j = [], 0
    for i, d in enumerate(src):
        group = []
        while j < len(dst) and (math.prod(group) < d or (d == 1 and not group and dst[j] == 1)):
            group, j = group + [dst[j]], j + 1
        if i == len(src) - 1:
            group, j = group + list(dst[j:]), len(dst)
        if math.prod(group) != d:
            return None
        groups.append(group)
    return groups if j == len(dst) else None


def runs(src, dst):
    """Pair runs of src and dst axes with equal products (the groups a reshape keeps together)."""
    out, i, j = [], 0, 0
    while i < len(src) and j < len(dst):
        a, b, pa, pb, i, j = [i], [j], src[i], dst[j], i + 1, j + 1
        while pa != pb:
            if pa < pb:
                a, pa, i = a + [i], pa * src[i], i + 1
            else:
                b, pb, j = b + [j], pb * dst[j], j + 1
        out.append((a, b))
    if out:
        out[-1] = (out[-1][0] + list(range(i, len(src))), out[-1][1] + list(range(j, len(dst))))
    return out


def relayout(x: Node, pieces, axes, broadcasts=True) -> Node:
    """permute(reshape(x, pieces), axes); a reshape (or x itself, for an operand that
    broadcasts) when only size-1 axes move."""
    pieces, axes = tuple(pieces), tuple(axes)
    out = tuple(pieces[a] for a in axes)
    if not moves_only_unit_axes(axes, pieces):
        return permute(reshape(x, pieces), axes)
    lead = len(out) - x.rank
    if broadcasts and lead > 0 and out[lead:] == x.shape and set(out[:lead]) == {1}:
        return x
    return reshape(x, out)


class Layout:
    """T on a value of shape `shape`: axis i cut into `groups[i]`, the pieces ordered by `axes`."""

    def __init__(self, shape, groups, axes):
        self.shape, self.groups, self.axes = tuple(shape), groups, tuple(axes)
        self.owner = [i for i, g in enumerate(groups) for _ in g]
        self.first = [sum(map(len, groups[:i])) for i in range(len(groups))]
        pieces = sum(groups, [])
        self.out = tuple(pieces[a] for a in self.axes)

    @classmethod
    def with_unit_axes(cls, shape, groups, axes) -> "Layout":
        """T, with a piece back for each size-1 axis the split dropped (an op may need
        that axis: a slice to one row, a sum), placed where it crosses the fewest pieces."""
        renumber, n = [], 0
        for g in groups:
            renumber += range(n + (not g), n + (not g) + len(g))
            n += len(g) or 1
        order = [renumber[a] for a in axes]
        for unit in sorted(set(range(n)) - set(renumber)):
            order.insert(min(range(len(order) + 1), key=lambda p: sum(a > unit for a in order[:p]) +
                             sum(a < unit for a in order[p:])), unit)
        return cls(shape, [g or [1] for g in groups], order)

    def pos(self, i):
        """Where axis i lands when T keeps it whole, else None."""
        return self.axes.index(self.first[i]) if len(self.groups[i]) == 1 else None

    def batch(self, core):
        """T on all but the last `core` axes, when it leaves those whole and in place."""
        n, k = len(self.axes), len(self.groups) - core
        if any(len(g) != 1 for g in self.groups[k:]) or self.axes[n - core:] != tuple(range(n - core, n)):
            return None
        return Layout(self.shape[:k], self.groups[:k], self.axes[:n - core])

    def of(self, x: Node, core=0, broadcasts=True):
        """Operand x of the op that makes the value, in layout T: x's axes line up with the
        value's from the right (but for its last `core`); where their sizes differ
        (broadcast, sliced, concatenated) T must keep the axis whole, else None."""
        batch = x.shape[:x.rank - core]
        lead, pieces = len(self.shape) - len(batch), []
        if lead < 0:
            return None
        for i, group in enumerate(self.groups):
            d = 1 if i < lead else batch[i - lead]
            if d == self.shape[i]:
                pieces += group
            elif d == 1:
                pieces += [1] * len(group)
            elif len(group) == 1:
                pieces.append(d)
            else:
                return None
        n = len(pieces)
        return relayout(x, pieces + list(x.shape[x.rank - core:]), self.axes + tuple(range(n, n + core)),
                        broadcasts)


# ---------------------------------------------------------------------------
# Moving a transform above the op that makes its value


def aligned(core=0):
    """Operands line up with the result axis by axis (broadcasting), but for `core` trailing axes."""
    def push(y, t):
        t = t.batch(core) if core else t
        operands = [t.of(x, core) for x in y.inputs] if t else [None]
        return None if None in operands else make_node(y.op, operands, y.attrs)
    return push


def whole_axes(attr):
    """cumsum, concat, sum: T must keep the axes `attr` names whole; they get their new places."""
    def push(y, t):
        value = y.attrs[attr]
        axes = [t.pos(a % y.rank) for a in (value if isinstance(value, tuple) else (value,))]
        operands = [t.of(x, broadcasts=False) for x in y.inputs]
        if None in axes or None in operands:
            return None
        return make_node(y.op, operands, {**y.attrs, attr: tuple(axes) if isinstance(value, tuple) else axes[0]})
    return push


def push_slice(y, t):
    x = t.of(y.inputs[0], broadcasts=False)
    if x is None:
        return None
    starts = [y.attrs["starts"][t.owner[a]] if len(t.groups[t.owner[a]]) == 1 else 0 for a in t.axes]
    return slice_(x, starts, [s + d for s, d in zip(starts, t.out)])


def push_permute(y, t):
    """T after permute(z, p) is one transform of z."""
    z, perm = y.inputs[0], y.attrs["axes"]
    groups = [t.groups[perm.index(a)] for a in range(z.rank)]
    first = [sum(map(len, groups[:a])) for a in range(z.rank)]
    fine = [first[perm[i]] + k for i, g in enumerate(t.groups) for k in range(len(g))]
    return relayout(z, sum(groups, []), [fine[a] for a in t.axes], broadcasts=False)


PUSH = {"matmul": aligned(2), "solve_tri": aligned(2), "tril": aligned(2), "triu": aligned(2),
        "broadcast_to": lambda y, t: make_node("broadcast_to", (t.of(y.inputs[0]),), {"shape": t.out}),
        "full": lambda y, t: make_node("full", (), {**y.attrs, "shape": t.out}),
        "cumsum": whole_axes("axis"), "concat": whole_axes("axis"), "sum": whole_axes("axes"),
        "slice": push_slice, "permute": push_permute}
FREE = ("permute", "full")   # moving T above these repeats no work when they keep other readers


def push_up(m):
    """permute(y) or permute(split(y)) -> y's op on its operands in the new layout."""
    inner = m.node.inputs[0]
    y = inner.inputs[0] if inner.op == "reshape" else inner
    push = PUSH.get(y.op) or (aligned() if y.op != "input" and is_elementwise(y) else None)
    if push is None or (y.op not in FREE and (m.uses(y) > 1 or m.uses(inner) > 1)):
        return None
    if y.op == "sum" and not y.attrs["keepdims"]:   # as a sum that keeps its axes, then a reshape
        y = make_node("sum", y.inputs, {**y.attrs, "keepdims": True})
    groups = split_groups(y.shape, inner.shape)
    out = None if groups is None else push(y, Layout.with_unit_axes(y.shape, groups, m.node.attrs["axes"]))
    return None if out is None else reshape(derived(out, y), m.node.shape)


def split_merged(m):
    """permute(reshape(x)) where the reshape merges axes -> merge(permute(split(x)))."""
    x, shape, axes = m.x, m.node.inputs[0].shape, m.node.attrs["axes"]
    if split_groups(x.shape, shape) is not None or 0 in x.shape:
        return None
    pieces, fine = [], {}
    for a, b in runs(x.shape, shape):
        where = [axes.index(k) for k in b]
        block = len(a) > 1
        if block and where != list(range(where[0], where[0] + len(b))):
            return None    # the permute tears a merged run apart
        for k in ([b[0]] if block else b):
            fine[k] = list(range(len(pieces), len(pieces) + (len(a) if block else 1)))
            pieces += [x.shape[i] for i in a] if block else [shape[k]]
    order = [f for k in axes for f in fine.get(k, [])]
    return reshape(relayout(x, pieces, order, broadcasts=False), m.node.shape)


def without_unit_axes(m):
    """The permute acts on the axes longer than 1; reshapes place the others."""
    big = [a for a in m.node.attrs["axes"] if m.x.shape[a] != 1]
    order = [sorted(big).index(a) for a in big]
    return reshape(relayout(m.x, [d for d in m.x.shape if d != 1], order, broadcasts=False), m.node.shape)


RULES = [
    Rule(P("reshape", P("reshape", P.any("x"))), lambda m: reshape(m.x, m.node.shape), "reshape_chain"),
    Rule(P("permute", P.any("x", pred=lambda x: 1 in x.shape)), without_unit_axes, "permute_without_unit_axes"),
    Rule(P("permute", P.any()), push_up, "push_permute_up"),
    Rule(P("permute", P("reshape", P.any("x"))), split_merged, "split_merged_axes"),
]


@register_pass("propagate_layout")
def propagate_layout(graph: Graph) -> tuple[Graph, bool]:
    """Move permutes up to the inputs and merge them (kept when that leaves fewer)."""
    new = graph
    for _ in range(MAX_ROUNDS):
        new, moved = apply_rules(new, RULES)
        new, merged = cse(new)
        if not (moved or merged):
            break
    return keep_if_cheaper(new, graph)
