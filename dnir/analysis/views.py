"""View arithmetic: where a view's elements lie in its operand's bytes, and a type's size.

A view (an op whose OpDef names a `view`) shares its operand's bytes instead of
writing new ones. `view_offset` answers for a dense operand (a reshape, or a slice
that is one contiguous run); `view_layout` also follows strided operands (any
slice or permute, a reshape that needs no copy). The memory plan lays values out
with them, the schedule and the cost model count what they move by them.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ..graph import Node
from ..ops import REGISTRY


@functools.lru_cache(maxsize=None)
def nbytes(t) -> int:
    """A TensorType's size in bytes (cached: planning asks for it often)."""
    return math.prod(t.shape) * t.itemsize


def view_offset(node: Node) -> int | None:
    """Byte offset of a view into its operand's bytes, or None when the op writes new bytes."""
    if node.op == "reshape":
        return 0
    if node.op != "slice":
        return None
    shape, starts, stops = node.inputs[0].shape, node.attrs["starts"], node.attrs["stops"]
    if math.prod(node.shape) == 0:
        return 0
    partial = [a for a, (s, e, d) in enumerate(zip(starts, stops, shape)) if e - s != d]
    if partial and any(stops[a] - starts[a] != 1 for a in range(partial[-1])):
        return None
    strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
    return sum(s * st for s, st in zip(starts, strides)) * node.type.itemsize


# The views the plan lays out in their operand's bytes (a broadcast's zero strides would let one
# element stand for many, which no kernel here writes or reads as rows).
PLANNED_VIEWS = ("reshape", "slice", "permute")


def is_planned_view(node: Node) -> bool:
    return REGISTRY[node.op].view in PLANNED_VIEWS


def dense_strides(shape) -> tuple:
    return tuple(math.prod(shape[a + 1:]) for a in range(len(shape)))


def _dense(shape, strides) -> bool:
    return all(s == d for n, s, d in zip(shape, strides, dense_strides(shape)) if n != 1)


def _reshaped_strides(shape, strides, new_shape) -> tuple | None:
    """Strides of a reshape without copy of a [shape] value with these strides (NumPy's own
    rule, on a one-byte stand-in that is never read), or None when it needs a copy."""
    stand_in = np.lib.stride_tricks.as_strided(np.empty(1, np.uint8), shape, strides)
    try:
        return stand_in.reshape(new_shape, copy=False).strides
    except ValueError:
        return None
    except TypeError:       # NumPy < 2.1 has no copy= argument: setting the shape refuses a copy
        view = stand_in.view()
        try:
            view.shape = new_shape
        except AttributeError:
            return None
        return view.strides


def view_layout(node: Node, src_strides: tuple | None) -> tuple[int, tuple | None] | None:
    """(byte offset into the operand, element strides, None when dense) of `node` as a view
    of its operand laid out with `src_strides` (None: dense); None when it needs a copy."""
    if not is_planned_view(node):
        return None
    src = node.inputs[0]
    if src_strides is None:
        if (delta := view_offset(node)) is not None:
            return delta, None
        src_strides = dense_strides(src.shape)
    if node.op == "slice":
        delta = sum(a * st for a, st in zip(node.attrs["starts"], src_strides)) * node.type.itemsize
        strides = src_strides
    elif node.op == "permute":
        delta, strides = 0, tuple(src_strides[a] for a in node.attrs["axes"])
    else:
        delta, strides = 0, _reshaped_strides(src.shape, src_strides, node.shape)
        if strides is None:
            return None
    if _dense(node.shape, strides):
        return delta, None
    if node.shape and node.shape[-1] != 1 and strides[-1] != 1:
        return None       # columns apart: a copy keeps the readers' rows contiguous
    return delta, tuple(strides)
