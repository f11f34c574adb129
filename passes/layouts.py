"""Layout transforms: cut each axis of a value into pieces, then reorder the pieces.

A permute, or a permute of a reshape that only splits axes, is one such
transform T. The layout propagation pass moves T above the op that makes the
value; `Layout.of` says what T is for each operand of that op.
"""
from __future__ import annotations

import math

from dnir.graph import Node
from dnir.ops import make_node

from .construct import reshape
from .transposes import moves_only_unit_axes


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
        return make_node("permute", (reshape(x, pieces),), {"axes": axes})
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
