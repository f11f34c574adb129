"""dnir graphs as ggml graphs: one lowering for running (run.py) and for C export (export_c.py).

The lowering walks a dnir graph and calls ggml's graph-building functions
through an emitter: run.py's emitter calls them with ctypes, export_c.py's
writes them as C statements. Both see the same calls.

Conventions:
- A value is a contiguous ggml tensor holding its dnir (row-major) value, or
  a strided view of one (a slice, or a permute that keeps rows whole), which
  ggml_mul_mat and the binary ops read directly and every other op gets
  copied (ggml_cont). An op views its operands in the at most 4 ggml
  dimensions it needs. ggml lists dimensions innermost first: a NumPy
  [B, T, H, K] value is ggml [K, H, T, B]. dnir values may have more than 4
  axes: each op merges the axes it treats alike (size-1 axes dropped,
  neighbours merged where the op's pattern allows); a value that still needs
  more than 4 raises a BackendError naming the node.
- ggml broadcasts only the second operand of a binary op, and only by
  repetition: a first operand that needs broadcasting trades places with a
  full second one where the op allows, else it is repeated.
- `ggml_mul_mat(x, y)` contracts the innermost dimension of both and gives
  [x rows, y rows, y batch]: dnir's a @ b is mul_mat(b^T, a), with b^T the
  one that may broadcast over the batch.
- bool values are stored as f32 0/1 (ggml has no bool type).
- A scan is unrolled: ggml has no loop op. The graph grows with the trip
  count, as llama.cpp's own chunked graphs do. A scan over tokens whose body
  is the delta rule's step runs as one ggml_gated_delta_net instead.
- ops ggml lacks are expressed: where/maximum/minimum select with a 0/1
  mask (x*m + (y - y*m): exact for finite values, NaN where an unselected
  operand is infinite), rsqrt as 1/sqrt, tril/triu other than ggml_tri's
  four cases through a mask cut from a ggml_tri of ones, an upper or
  unit-diagonal solve through ggml's lower solve.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dnir.errors import BackendError
from dnir.graph import Graph, Node
from dnir.ops import REGISTRY, broadcast_shapes, make_node
from dnir.passes.manager import made_by

from .api import F32, F16, I32, BF16, TRI_LOWER, TRI_LOWER_DIAG, TRI_UPPER, TRI_UPPER_DIAG
from .intra_chunk import Transposed, lower_intra_chunk
from .intra_chunk import rejects as intra_chunk_rejects

# Elementwise ops that are ggml's function of the same name (ggml_<op>), of one and of two operands.
_UNARY = ("neg", "exp", "log", "sigmoid", "softplus", "sqrt")
_BINARY = ("add", "sub", "mul", "div")

STORAGE = {"f32": F32, "bool": F32, "i32": I32, "f16": F16, "bf16": BF16}
ITEM_SIZE = {F32: 4, I32: 4, F16: 2, BF16: 2}


class Emitter(Protocol):
    """What the lowering needs from its caller; handles are opaque to it."""

    def call(self, fn: str, *args): ...                      # a ggml function from api.SIGNATURES
    def input(self, node: Node, gtype: int, ne: tuple): ...  # a graph input
    def constant(self, node: Node, value: np.ndarray, gtype: int, ne: tuple): ...  # a tensor of given data
    def node(self, label: str): ...                          # the dnir node lowered next (comments)
    # An unrolled loop (over chunks, or a scan's steps): loop_begin(n), then iteration(i) before each
    # of the n iterations' calls, then loop_end(). The symbolic C export writes it as a C loop.
    def loop_begin(self, count: int): ...
    def iteration(self, i: int): ...
    def loop_end(self): ...


@dataclass(frozen=True)
class Value:
    t: object          # the emitter's handle of a tensor with this value (contiguous unless strided)
    shape: tuple       # dnir (NumPy order) shape
    ne: tuple | None   # the ggml shape t has (4 dims, innermost first)
    base: object       # the tensor owning t's memory (t unless t is a view)
    dtype: str
    # A strided view (a slice, a permute that keeps the rows): element strides in NumPy order
    # from byte `offset` of t, the innermost non-1 axis of stride 1 (ggml reads rows whole).
    strides: tuple | None = None
    offset: int = 0

    @property
    def gtype(self) -> int:
        return STORAGE[self.dtype]


def ggml_ne(shape) -> tuple:
    """A NumPy-order shape of at most 4 dims as ggml's ne (innermost first, padded with 1)."""
    assert len(shape) <= 4, shape
    return tuple(reversed(shape)) + (1,) * (4 - len(shape))


def input_values(emitter: Emitter, graph: Graph) -> list[Value]:
    """The graph's inputs as tensors of their own shape (flat where it has more than 4 axes)."""
    values = []
    for node in graph.inputs:
        ne = ggml_ne(node.shape if len(node.shape) <= 4 else (math.prod(node.shape),))
        t = emitter.input(node, STORAGE[node.dtype], ne)
        values.append(Value(t, node.shape, ne, t, node.dtype))
    return values


def merge_broadcast(out, *shapes):
    """Merge neighbouring axes that every operand treats alike (full or broadcast).

    `shapes` are broadcast to `out` (aligned on the right). Size-1 axes of `out`
    are dropped. Returns the merged out shape and each operand's merged shape.
    """
    rank = len(out)
    aligned = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    groups: list[list[int]] = []
    last = None
    for axis in range(rank):
        if out[axis] == 1:
            continue
        pattern = tuple(s[axis] == 1 for s in aligned)
        if groups and pattern == last:
            groups[-1].append(axis)
        else:
            groups.append([axis])
        last = pattern
    merged_out = tuple(math.prod(out[a] for a in g) for g in groups)
    merged = [tuple(math.prod(s[a] for a in g) for g in groups) for s in aligned]
    return merged_out, merged


def _contiguous(shape) -> list[int]:
    """Row-major element strides of a shape."""
    return [math.prod(shape[i + 1:]) for i in range(len(shape))]


def _rows_whole(shape, strides) -> bool:
    """Whether the innermost axis of more than one element has stride 1 (ggml reads rows whole)."""
    inner = [st for d, st in zip(shape, strides) if d != 1]
    return not inner or inner[-1] == 1


def _viewable(shape, strides) -> bool:
    """Whether one ggml view can read this strided value: whole rows, at most 4 dims."""
    return _rows_whole(shape, strides) and len(merge_strided(shape, strides)) <= 4


def _padded_nb(shape, strides, size) -> list[int]:
    """ggml's nb (bytes, innermost first) of a view of `shape` with element `strides`, 4 entries."""
    nb = [st * size for st in reversed(strides)] or [size]
    ne = list(reversed(shape)) or [1]
    while len(nb) < 4:
        nb.append(nb[-1] * ne[len(nb) - 1] if len(nb) <= len(ne) else nb[-1])
    return nb


def merge_strided(shape, strides) -> list[list[int]]:
    """Axes of more than one element, neighbours merged where their strides allow."""
    groups: list[list[int]] = []
    for axis, (d, st) in enumerate(zip(shape, strides)):
        if d == 1:
            continue
        if groups and strides[groups[-1][-1]] == st * d:
            groups[-1].append(axis)
        else:
            groups.append([axis])
    return groups


def reshape_strides(shape, strides, new_shape) -> tuple | None:
    """Element strides that read a strided value in `new_shape` (same elements, same order),
    or None where that needs a copy (NumPy's no-copy reshape)."""
    old = [(d, st) for d, st in zip(shape, strides) if d != 1]
    new = [i for i, d in enumerate(new_shape) if d != 1]
    result = [1] * len(new_shape)
    a = b = 0
    while a < len(old):
        a2, b2 = a + 1, b + 1
        p_old, p_new = old[a][0], new_shape[new[b]]
        while p_old != p_new:
            if p_old < p_new:
                p_old *= old[a2][0]
                a2 += 1
            else:
                p_new *= new_shape[new[b2]]
                b2 += 1
        if any(old[i][1] != old[i + 1][1] * old[i + 1][0] for i in range(a, a2 - 1)):
            return None
        stride = old[a2 - 1][1]
        for i in reversed(range(b, b2)):
            result[new[i]] = stride
            stride *= new_shape[new[i]]
        a, b = a2, b2
    return tuple(result)


def merge_runs(sizes, full) -> list[list[int]]:
    """Axes grouped into runs that one strided view can address: in a run every
    axis but the outermost is `full` (untouched by a slice, pad or block)."""
    groups: list[list[int]] = []
    for axis in reversed(range(len(sizes))):
        if groups and all(full[a] for a in groups[0]):
            groups[0].insert(0, axis)
        else:
            groups.insert(0, [axis])
    return groups


class Lowerer:
    def __init__(self, emitter: Emitter):
        self.e = emitter
        self.where = ""            # the node being lowered, for errors
        self.readers: dict[int, list] = {}   # of the graph being lowered: id(node) -> its readers
        self.kept: set[int] = set()          # ... and its outputs
        self.values: dict[int, object] = {}  # ... and the values lowered so far

    # -- the graph walk ---------------------------------------------------------------------
    def lower(self, graph: Graph, inputs: list[Value], path: str = "") -> list[Value]:
        values: dict[int, object] = {id(n): v for n, v in zip(graph.inputs, inputs)}
        outer = self.readers, self.kept, self.values
        self.readers, self.kept, self.values = graph.uses(), {id(n) for n in graph.outputs}, values
        counter = 0
        for node in graph.topo_order():
            if id(node) in values:
                continue
            maker = made_by(node)
            label = f"{path}%{counter} = {node.op}" + (f"  [made by {maker}]" if maker else "")
            counter += 1
            self.where = label
            self.e.node(label)
            operands = [self.operand(node.op, values[id(i)]) for i in node.inputs]
            for i, v in zip(node.inputs, operands):
                if isinstance(v, Value) and node.op not in _ANY_DTYPE and v.dtype not in ("f32", "bool"):
                    self.fail(f"operand of dtype {v.dtype}: the lowering handles f32 (and casts) only")
            method = self.lowering(node.op)
            if method is None and getattr(REGISTRY[node.op], "expand", None) is None:
                self.fail("no ggml lowering for this op")
            values[id(node)] = method(node, *operands) if method else self.expanded(node, operands)
        self.readers, self.kept, self.values = outer
        return [self.dense(values[id(n)]) for n in graph.outputs]

    def operand(self, op: str, v):
        """v as an operand of an `op` node: as it is where the op reads it so (a strided view, a
        Transposed value), else copied contiguous."""
        if isinstance(v, Transposed):
            return v if op in _READS_TRANSPOSED else self.dense(v)
        return v if op in _READS_STRIDED else self.dense(v)

    def dies_at(self, node: Node) -> bool:
        """Whether `node`'s bytes can be overwritten by its one reader: nothing else reads
        them, following reshapes (and permutes or broadcasts, which may not copy) back to the
        op that wrote them; never an input, a constant or a scan's result."""
        while True:
            if id(node) in self.kept or len(self.readers[id(node)]) != 1 or node.op in _SHARED:
                return False
            if node.op not in ("reshape", "permute", "broadcast_to", "slice"):
                return True
            node = node.inputs[0]

    def lowering(self, op: str):
        """The method lowering `op` (called with the node and its operands), or None: ggml's
        function of the same name for the ops in _UNARY and _BINARY, else the method op_<op>."""
        if op in _UNARY:
            return lambda node, x: self.unary("ggml_" + op, node, x)
        if op in _BINARY:
            return lambda node, a, b: self.binary("ggml_" + op, a, b, node.shape)
        return getattr(self, "op_" + op, None)

    def fail(self, message: str):
        raise BackendError(f"ggml: node {self.where}: {message}")

    # -- helpers on values --------------------------------------------------------------------
    def call(self, fn, *args):
        return self.e.call(fn, *args)

    def view(self, v: Value, shape) -> object:
        """v's tensor with a NumPy-order shape of at most 4 dims: a free reshape of a contiguous
        value, a ggml view of a strided one (copied first if the shape does not fit its strides)."""
        shape = tuple(shape)
        if len(shape) > 4:
            self.fail(f"a value of shape {list(v.shape)} needs {len(shape)} ggml dimensions "
                      f"{list(shape)} here; ggml has 4")
        if v.strides is not None:
            strides = reshape_strides(v.shape, v.strides, shape)
            if strides is None:
                return self.view(self.dense(v), shape)
            size = ITEM_SIZE[v.gtype]
            return self.call("ggml_view_4d", v.t, *ggml_ne(shape), *_padded_nb(shape, strides, size)[1:], v.offset)
        ne = ggml_ne(shape)
        if ne == v.ne:
            return v.t
        return self.call("ggml_reshape_4d", v.t, *ne)

    def dense(self, v):
        """v as a contiguous tensor (a strided view copied with ggml_cont, a Transposed one
        transposed back)."""
        if isinstance(v, Transposed):
            return self.dense(self.permute(v.value, _swap_last(v.value.shape)))
        if not isinstance(v, Value) or v.strides is None:
            return v
        groups = merge_strided(v.shape, v.strides)
        if len(groups) > 4:
            self.fail(f"a strided value of shape {list(v.shape)} spans {len(groups)} groups of axes; ggml has 4 dims")
        shape = tuple(math.prod(v.shape[a] for a in g) for g in groups)
        t = self.call("ggml_cont", self.view(v, shape))
        return self.made(t, shape, v.shape, v.dtype)

    def strided(self, v: Value, shape, strides, offset=0) -> Value:
        """A view of v's bytes (v contiguous or strided) with element `strides` from element `offset`."""
        if v.strides is None and offset == 0 and math.prod(shape) == math.prod(v.shape) \
                and list(strides) == _contiguous(shape):
            return self.as_shape(v, shape)
        return Value(v.t, tuple(shape), None, v.base, v.dtype, tuple(strides),
                     v.offset + offset * ITEM_SIZE[v.gtype])

    def made(self, t, shape_used, shape, dtype) -> Value:
        """A fresh tensor `t` (ggml shape from `shape_used`) holding a value of dnir `shape`."""
        return Value(t, tuple(shape), ggml_ne(shape_used), t, dtype)

    def as_shape(self, v: Value, shape) -> Value:
        """The same data read with another dnir shape (reshape: no copy)."""
        return Value(v.t, tuple(shape), v.ne, v.base, v.dtype)

    def flat(self, v: Value) -> object:
        return self.view(v, (math.prod(v.shape),))

    def new(self, shape, gtype=F32) -> object:
        """A fresh scratch tensor of a NumPy-order shape (allocated by ggml's allocator)."""
        ne = [d for d in reversed(shape)] or [1]
        return self.call(f"ggml_new_tensor_{len(ne)}d", gtype, *ne)

    def fill(self, shape, value) -> Value:
        merged = (math.prod(shape),)
        t = self.call("ggml_fill_inplace", self.new(merged), float(value))
        return self.made(t, merged, shape, "f32")

    def permute(self, v: Value, axes) -> Value:
        """v with axes permuted: a strided view where its rows stay whole, else a copy
        (ggml_permute + ggml_cont)."""
        shape = v.shape
        out_shape = tuple(shape[a] for a in axes)
        strides = [(v.strides or _contiguous(shape))[a] for a in axes]
        if _viewable(out_shape, strides):
            return self.strided(v, out_shape, strides)
        v = self.dense(v)
        groups: list[list[int]] = []
        for a in axes:
            if shape[a] == 1:
                continue
            if groups and groups[-1][-1] + 1 == a:
                groups[-1].append(a)
            else:
                groups.append([a])
        in_groups = sorted(groups)
        perm = [in_groups.index(g) for g in groups]
        if perm == sorted(perm):
            return self.as_shape(v, out_shape)      # the same order in memory
        if len(perm) > 4:
            # In steps of at most 4 groups: bring the first misplaced axis forward, then the rest.
            i = next(i for i, a in enumerate(axes) if a != i)
            step = list(range(i)) + [axes[i]] + [a for a in range(i, len(axes)) if a != axes[i]]
            return self.permute(self.permute(v, step), [step.index(a) for a in axes])
        pad = 4 - len(perm)
        in4 = (1,) * pad + tuple(math.prod(shape[a] for a in g) for g in in_groups)
        perm4 = list(range(pad)) + [p + pad for p in perm]
        ax = [0] * 4
        for j in range(4):
            ax[3 - perm4[j]] = 3 - j
        t = self.call("ggml_permute", self.view(v, in4), *ax)
        t = self.call("ggml_cont", t)
        return self.made(t, tuple(in4[p] for p in perm4), out_shape, v.dtype)

    def broadcast(self, v: Value, shape) -> Value:
        shape = tuple(shape)
        if v.shape == shape:
            return v
        v = self.dense(v)
        out_m, (x_m,) = merge_broadcast(shape, v.shape)
        if x_m == out_m:
            return self.as_shape(v, shape)
        self.check_rank(out_m, "broadcast")
        t = self.call("ggml_repeat_4d", self.view(v, x_m), *ggml_ne(out_m))
        return self.made(t, out_m, shape, v.dtype)

    def check_rank(self, merged, what):
        if len(merged) > 4:
            self.fail(f"{what} over {len(merged)} groups of axes {list(merged)}; ggml has 4 dims")

    def binary(self, fn, a: Value, b: Value, shape, dtype="f32") -> Value:
        """ggml's binary op on NumPy-broadcast operands. ggml broadcasts only the second: a first
        operand that needs it swaps with a full second one where the op allows (a + b = b + a,
        a * b = b * a, a - b = (-b) + a, all exact), else it is repeated to the full shape."""
        out_m, (a_m, b_m) = merge_broadcast(shape, a.shape, b.shape)
        self.check_rank(out_m, fn)
        if a_m != out_m and b_m == out_m and fn in ("ggml_add", "ggml_mul", "ggml_sub"):
            if fn == "ggml_sub":
                flat = (math.prod(shape),)
                b = self.made(self.call("ggml_neg", self.view(b, flat)), flat, shape, dtype)
            return self.binary("ggml_mul" if fn == "ggml_mul" else "ggml_add", b, a, shape, dtype)
        if a_m != out_m:
            a = self.broadcast(a, shape)
            out_m, (a_m, b_m) = merge_broadcast(shape, a.shape, b.shape)
        t = self.call(fn, self.view(a, a_m), self.view(b, b_m))
        return self.made(t, out_m, shape, dtype)

    def select(self, mask: Value, x: Value, y: Value, shape) -> Value:
        """x where mask is 1 else y (mask 0/1): x*m + (y - y*m), exact for finite values."""
        m = self.broadcast(mask, shape)
        xm = self.binary("ggml_mul", m, x, shape)
        ym = self.binary("ggml_mul", m, y, shape)
        rest = self.binary("ggml_sub", self.broadcast(y, shape), ym, shape)
        return self.binary("ggml_add", xm, rest, shape)

    def tri(self, v: Value, kind: int) -> Value:
        """ggml_tri over the last two (square) axes."""
        n, m = v.shape[-2:]
        merged = (math.prod(v.shape[:-2]), n, m)
        t = self.call("ggml_tri", self.view(v, merged), kind)
        return self.made(t, merged, v.shape, v.dtype)

    def matmul(self, a: Value, b: Value, ta=False, tb=False) -> Value:
        m, k = (a.shape[-1], a.shape[-2]) if ta else a.shape[-2:]
        batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
        rows_a = self.permute(a, _swap_last(a.shape)) if ta else a       # [..., m, k]
        rows_b = b if tb else self.permute(b, _swap_last(b.shape))       # [..., n, k]
        out_b, (ab, bb) = merge_broadcast(batch, rows_a.shape[:-2], rows_b.shape[:-2])
        # mul_mat(x, y): y must hold the whole batch, x may be broadcast over it.
        swap = ab != out_b and bb == out_b
        x, y = (rows_a, rows_b) if swap else (rows_b, rows_a)
        xb, yb = (ab, bb) if swap else (bb, ab)
        if yb != out_b:
            y = self.broadcast(y, batch + y.shape[-2:])
        if len(out_b) > 2 and xb != out_b:
            x = self.broadcast(x, batch + x.shape[-2:])
            xb = out_b
        if len(out_b) > 2:
            xb = out_b = (math.prod(out_b),)
        t = self.call("ggml_mul_mat", self.view(x, xb + x.shape[-2:]), self.view(y, out_b + y.shape[-2:]))
        rows_x, rows_y = x.shape[-2], y.shape[-2]
        out = self.made(t, out_b + (rows_y, rows_x), batch + (rows_y, rows_x), a.dtype)
        return self.permute(out, _swap_last(out.shape)) if swap else out

    def reverse_rows(self, v: Value) -> Value:
        """v with the order of the rows (axis -2) reversed: J @ v, J the exchange matrix (exact)."""
        n = v.shape[-2]
        # ggml_arange counts up only: n-1 .. 0 as (n-1) - (0 .. n-1).
        down = self.call("ggml_scale_bias", self.call("ggml_arange", 0.0, float(n), 1.0), -1.0, float(n - 1))
        idx = self.call("ggml_cast", down, I32)
        j = self.call("ggml_get_rows", self.op_eye_n(n).t, idx)
        return self.matmul(self.made(j, (n, n), (n, n), "f32"), v)

    def op_eye_n(self, n) -> Value:
        ones = self.fill((n, n), 1.0)
        t = self.call("ggml_tri", self.call("ggml_tri", self.view(ones, (n, n)), TRI_LOWER_DIAG), TRI_UPPER_DIAG)
        return self.made(t, (n, n), (n, n), "f32")

    # -- sources ------------------------------------------------------------------------------
    def op_const(self, node):
        values = np.asarray(node.attrs["value"])
        if node.dtype == "f32" and values.size and np.all(values == values.flat[0]):
            return self.fill(node.shape, float(values.flat[0]))
        array = np.asarray(values.reshape(node.shape), dtype=_numpy_storage(node.dtype))
        shape = (array.size,)
        return self.made(self.e.constant(node, array, STORAGE[node.dtype], ggml_ne(shape)), shape,
                         node.shape, node.dtype)

    def op_full(self, node):
        if node.dtype != "f32":
            self.fail(f"full of dtype {node.dtype}: ggml_fill makes f32")
        return self.fill(node.shape, node.attrs["value"])

    def op_eye(self, node):
        if node.dtype != "f32":
            self.fail(f"eye of dtype {node.dtype}: the lowering makes f32")
        return self.op_eye_n(node.attrs["n"])

    # -- elementwise ----------------------------------------------------------------------------
    def unary(self, fn, node, x: Value) -> Value:
        flat = (math.prod(x.shape),)
        return self.made(self.call(fn, self.view(x, flat)), flat, node.shape, node.dtype)

    def op_rsqrt(self, node, x):
        root = self.unary("ggml_sqrt", node, x)
        ones = self.made(self.call("ggml_fill", root.t, 1.0), (math.prod(x.shape),), node.shape, "f32")
        return self.binary("ggml_div", ones, root, node.shape)

    def op_maximum(self, node, a, b):
        return self.select(self.unary("ggml_step", node, self.binary("ggml_sub", a, b, node.shape)), a, b, node.shape)

    def op_minimum(self, node, a, b):
        return self.select(self.unary("ggml_step", node, self.binary("ggml_sub", b, a, node.shape)), a, b, node.shape)

    def op_where(self, node, c, x, y):
        return self.select(c, x, y, node.shape)

    def op_cast(self, node, x):
        src, dst = x.dtype, node.dtype
        if dst == "bool" or dst not in STORAGE:
            self.fail(f"cast {src} -> {dst}: not expressible in ggml (no bool type)")
        if STORAGE[src] == STORAGE[dst]:     # f32 <-> a bool stored as f32 0/1: the same numbers
            return self.made(self.call("ggml_cont", x.t), _shape_of(x.ne), node.shape, dst)
        flat = (math.prod(x.shape),)
        return self.made(self.call("ggml_cast", self.view(x, flat), STORAGE[dst]), flat, node.shape, dst)

    def op_clamp(self, node, x):
        flat = (math.prod(x.shape),)
        t = self.call("ggml_clamp", self.view(x, flat), node.attrs["min"], node.attrs["max"])
        return self.made(t, flat, node.shape, node.dtype)

    def op_tril(self, node, x): return self.triangle(node, x, lower=True)
    def op_triu(self, node, x): return self.triangle(node, x, lower=False)

    def triangle(self, node, x: Value, lower: bool) -> Value:
        k = node.attrs["k"]
        n, m = x.shape[-2:]
        native = {(True, 0): TRI_LOWER_DIAG, (True, -1): TRI_LOWER, (False, 0): TRI_UPPER_DIAG, (False, 1): TRI_UPPER}
        if n == m and (lower, k) in native:
            return self.tri(x, native[(lower, k)])
        # A 0/1 mask: the n x m block of a ggml_tri of ones that starts k rows below the diagonal.
        r, c = max(k, 0), max(-k, 0)
        size = max(n + r, m + c)
        ones = self.fill((size, size), 1.0)
        tri = self.call("ggml_tri", self.view(ones, (size, size)), TRI_LOWER_DIAG if lower else TRI_UPPER_DIAG)
        block = self.call("ggml_view_4d", tri, m, n, 1, 1, size * 4, size * n * 4, size * n * 4, (r * size + c) * 4)
        mask = self.made(self.call("ggml_cont", block), (n, m), (n, m), "f32")
        return self.binary("ggml_mul", x, mask, node.shape)

    # -- layout ----------------------------------------------------------------------------------
    def op_reshape(self, node, x):
        if x.strides is None:
            return self.as_shape(x, node.shape)
        strides = reshape_strides(x.shape, x.strides, node.shape)
        if strides is None:
            return self.as_shape(self.dense(x), node.shape)
        return Value(x.t, node.shape, None, x.base, x.dtype, strides, x.offset)

    def op_permute(self, node, x):
        return self.permute(x, [a % len(x.shape) for a in node.attrs["axes"]])

    def op_broadcast_to(self, node, x):
        return self.broadcast(x, node.shape)

    def op_cont(self, node, x):
        if x.strides is not None:
            return self.dense(x)
        t = self.call("ggml_cont", x.t)
        return Value(t, x.shape, x.ne, t, x.dtype)

    def op_pad(self, node, x):
        pads, value = node.attrs["pads"], node.attrs["value"]
        groups = merge_runs(x.shape, [p == (0, 0) for p in pads])
        self.check_rank(groups, "pad")
        merged = tuple(math.prod(x.shape[a] for a in g) for g in groups)
        inner = [math.prod(x.shape[a] for a in g[1:]) for g in groups]
        mpads = [(pads[g[0]][0] * s, pads[g[0]][1] * s) for g, s in zip(groups, inner)]
        out_m = tuple(d + a + b for d, (a, b) in zip(merged, mpads))
        flat = [p for pair in reversed(mpads) for p in pair] + [0, 0] * (4 - len(mpads))
        t = self.call("ggml_pad_ext", self.view(x, merged), *flat)
        out = self.made(t, out_m, node.shape, x.dtype)
        if value == 0:
            return out
        # value outside x: value - value * pad(ones) is 0 inside and value outside, added exactly.
        ones = self.call("ggml_fill", self.view(x, merged), 1.0)
        border = self.call("ggml_scale_bias", self.call("ggml_pad_ext", ones, *flat), -float(value), float(value))
        return self.made(self.call("ggml_add", t, border), out_m, node.shape, x.dtype)

    def op_slice(self, node, x):
        starts, stops = node.attrs["starts"], node.attrs["stops"]
        strides = x.strides or _contiguous(x.shape)
        if _viewable(node.shape, strides):
            return self.strided(x, node.shape, strides, sum(a * st for a, st in zip(starts, strides)))
        x = self.dense(x)
        full = [a == 0 and b == d for a, b, d in zip(starts, stops, x.shape)]
        groups = merge_runs(x.shape, full)
        self.check_rank(groups, "slice")
        size = ITEM_SIZE[x.gtype]
        dims = [math.prod(x.shape[a] for a in g) for g in groups]       # merged input dims
        inner = [math.prod(x.shape[a] for a in g[1:]) for g in groups]
        lens = [(stops[g[0]] - starts[g[0]]) * s for g, s in zip(groups, inner)]
        offs = [starts[g[0]] * s for g, s in zip(groups, inner)]
        strides = [size * math.prod(dims[i + 1:]) for i in range(len(dims))]   # bytes, NumPy order
        offset = sum(o * s for o, s in zip(offs, strides))
        pad = 4 - len(dims)
        ne = ggml_ne(tuple(lens))
        nb = list(reversed(strides)) + [strides[0] * dims[0]] * pad        # ggml order nb0..nb3
        t = self.call("ggml_view_4d", x.t, *ne, nb[1], nb[2], nb[3], offset)
        return self.made(self.call("ggml_cont", t), tuple(lens), node.shape, x.dtype)

    def op_concat(self, node, *xs):
        axis = node.attrs["axis"] % len(node.shape)
        outer, inner = math.prod(node.shape[:axis]), math.prod(node.shape[axis + 1:])
        t = None
        for x in xs:
            part = self.view(x, (outer, x.shape[axis], inner))
            t = part if t is None else self.call("ggml_concat", t, part, 1)
        if len(xs) == 1:
            t = self.call("ggml_cont", t)
        return self.made(t, (outer, node.shape[axis], inner), node.shape, node.dtype)

    # -- reductions --------------------------------------------------------------------------------
    def op_sum(self, node, x):
        axes = sorted(a % len(x.shape) for a in node.attrs["axes"])
        rest = [a for a in range(len(x.shape)) if a not in axes]
        x = self.permute(x, rest + axes)
        rows = (math.prod(x.shape[:len(rest)]), math.prod(x.shape[len(rest):]))
        t = self.call("ggml_sum_rows", self.view(x, rows))
        return self.made(t, (rows[0], 1), node.shape, node.dtype)

    def op_cumsum(self, node, x):
        axis = node.attrs["axis"] % len(x.shape)
        outer, d, inner = math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1:])
        if inner == 1:
            t = self.call("ggml_cumsum", self.view(x, (outer, d)))
            return self.made(t, (outer, d), node.shape, node.dtype)
        moved = self.permute(self.as_shape(x, (outer, d, inner)), (0, 2, 1))
        summed = self.made(self.call("ggml_cumsum", self.view(moved, (outer * inner, d))), (outer * inner, d),
                           (outer, inner, d), node.dtype)
        return self.as_shape(self.permute(summed, (0, 2, 1)), node.shape)

    # -- matrices ----------------------------------------------------------------------------------
    def op_matmul(self, node, a, b):
        return self.matmul(a, b, node.attrs["transpose_a"], node.attrs["transpose_b"])

    def op_solve_tri(self, node, a, b):
        n, m = b.shape[-2:]
        batch = node.shape[:-2]
        a = self.broadcast(a, batch + (n, n))
        b = self.broadcast(b, batch + (n, m))
        lower = node.attrs["lower"]
        if node.attrs["unit_diagonal"]:
            # ggml's solve reads the diagonal: make it 1.
            strict = self.tri(a, TRI_LOWER if lower else TRI_UPPER)
            a = self.binary("ggml_add", strict, self.op_eye_n(n), a.shape)
        if not lower:
            # An upper system read bottom-up is lower: (J A J)(J X) = J B, J reversing the order.
            a = self.reverse_rows(self.permute(self.reverse_rows(self.permute(a, _swap_last(a.shape))),
                                               _swap_last(a.shape)))
            b = self.reverse_rows(b)
        nb = math.prod(batch)
        t = self.call("ggml_solve_tri", self.view(a, (nb, n, n)), self.view(b, (nb, n, m)), True, True, False)
        x = self.made(t, (nb, n, m), node.shape, node.dtype)
        return x if lower else self.reverse_rows(x)

    # -- assembly ----------------------------------------------------------------------------------
    def op_set(self, node, dst, src): return self.region("ggml_set", node, dst, src)
    def op_acc(self, node, dst, src): return self.region("ggml_acc", node, dst, src)

    # ggml's allocator reuses a dying operand's memory for elementwise ops, not for set and acc.

    def region(self, fn, node, dst: Value, src: Value) -> Value:
        offsets = node.attrs["offsets"]
        full = [s == d for s, d in zip(src.shape, dst.shape)]
        groups = merge_runs(dst.shape, full)
        self.check_rank(groups, fn)
        size = ITEM_SIZE[dst.gtype]
        dims = [math.prod(dst.shape[a] for a in g) for g in groups]
        sdims = [math.prod(src.shape[a] for a in g) for g in groups]
        inner = [math.prod(dst.shape[a] for a in g[1:]) for g in groups]
        strides = [size * math.prod(dims[i + 1:]) for i in range(len(dims))]
        offset = sum(offsets[g[0]] * s * st for g, s, st in zip(groups, inner, strides))
        nb = list(reversed(strides)) + [strides[0] * dims[0]] * (4 - len(dims))
        if self.dies_at(node.inputs[0]):
            fn += "_inplace"            # written over the destination, as dnir's memory plan does
        t = self.call(fn, self.view(dst, dims), self.view(src, sdims), nb[1], nb[2], nb[3], offset)
        return Value(t, node.shape, ggml_ne(dims), dst.base if fn.endswith("_inplace") else t, node.dtype)

    # -- control -----------------------------------------------------------------------------------
    def op_item(self, node, results):
        return results[node.attrs["index"]]

    def op_scan(self, node, *operands):
        body: Graph = node.attrs["body"]
        nc, nx, length = node.attrs["num_carry"], node.attrs["num_xs"], node.attrs["length"]
        if length == 0:
            self.fail("a scan of length 0 (ggml has no empty tensors)")
        fused = self.token_scan(node, operands)
        if fused is not None:
            return fused
        label = self.where
        carries, xs, consts = list(operands[:nc]), operands[nc:nc + nx], list(operands[nc + nx:])
        ys_types = body.output_types[nc:]
        bufs = [self.new((length * math.prod(t.shape),)) for t in ys_types]
        stacks = list(bufs)
        self.e.loop_begin(length)
        for step in range(length):
            self.e.iteration(step)
            sliced = [self.step_slice(x, step) for x in xs]
            outs = self.lower(body, carries + sliced + consts, f"{label} step {step}: ")
            carries = outs[:nc]
            for j, y in enumerate(outs[nc:]):
                size = math.prod(y.shape)
                stacks[j] = self.call("ggml_set_1d_inplace", stacks[j], self.flat(y),
                                      step * size * ITEM_SIZE[y.gtype])
        self.e.loop_end()
        self.where = label
        ys = [Value(s, (length,) + t.shape, ggml_ne((length * math.prod(t.shape),)), buf, t.dtype)
              for s, buf, t in zip(stacks, bufs, ys_types)]
        return tuple(carries) + tuple(ys)

    # -- the loop over chunks, unrolled in ggml's layouts --------------------------------------------
    def op_chunk_scan(self, node, state, w, u, q_decayed, aqk, k_to_end, last_decay):
        """dnir/fused.py's chunk_scan unrolled with the state kept transposed, R = S^T [V, K] per
        head (ggml_gated_delta_net's layout). ggml_mul_mat(x, y) is y @ x^T, both read with the
        contracted axis innermost; with R, v_new^T and k_to_end^T every product of a chunk reads
        its operands as they are, so a chunk costs no copy. The scan's expansion instead copies
        S^T twice, v_new^T twice and k_to_end^T once per chunk (a third of its time at T=4096).

            (w S)^T = mul_mat(w, R)          v_new^T = u^T - (w S)^T
            o = mul_mat(R, q_decayed) + mul_mat(v_new^T, aqk)
            R' = R last_decay^T + mul_mat(k_to_end^T, v_new^T)
        u^T and k_to_end^T are made once for all chunks, R from the state once and back once."""
        n, *batch, c, k = w.shape
        v = u.shape[-1]
        p, kg = math.prod(batch), last_decay.shape[-2]
        r = self.permute(self.as_shape(state, (p, k, v)), (0, 2, 1))
        u_t = self.chunks_transposed(u, (n, p, c, v))
        k_t = self.chunks_transposed(k_to_end, (n, p, c, k))
        o_size = p * c * v
        o_buf = o = self.new((n * o_size,))
        r_t = self.view(r, (p, v, k))
        if kg == 1 < k:     # one decay per head: a row of k copies, so that R's multiply runs by rows
            # (ggml multiplies by a broadcast scalar one element at a time: 116 of 500 ms at T=4096)
            last_decay = self.made(self.call("ggml_repeat_4d", self.view(last_decay, (n * p, 1)), k, n * p, 1, 1),
                                   (n * p, k), (n, p, k, 1), last_decay.dtype)
            kg = k
        label = self.where
        self.e.loop_begin(n)
        for i in range(n):
            self.e.iteration(i)
            self.where = f"{label} chunk {i}"
            self.e.node(self.where)
            w_i, qd_i, aqk_i, u_ti, k_ti = (self.chunk(x, i) for x in (w, q_decayed, aqk, u_t, k_t))
            decay_i = self.chunk(self.as_shape(last_decay, (n, p, 1, kg)), i)
            v_new_t = self.call("ggml_sub", u_ti, self.call("ggml_mul_mat", w_i, r_t))
            o_i = self.call("ggml_add", self.call("ggml_mul_mat", r_t, qd_i), self.call("ggml_mul_mat", v_new_t, aqk_i))
            o = self.call("ggml_set_1d_inplace", o, self.call("ggml_reshape_4d", o_i, o_size, 1, 1, 1),
                          i * o_size * ITEM_SIZE[F32])
            r_t = self.call("ggml_add", self.call("ggml_mul", r_t, decay_i), self.call("ggml_mul_mat", k_ti, v_new_t))
        self.e.loop_end()
        self.where = label
        self.e.node(f"{label}: the final state back from S^T")
        r = self.made(r_t, (p, v, k), (p, v, k), state.dtype)
        final = self.as_shape(self.permute(r, (0, 2, 1)), state.shape)
        return final, Value(o, node.type[1].shape, ggml_ne((n * o_size,)), o_buf, node.type[1].dtype)

    def chunks_transposed(self, x, shape) -> Value:
        """x of `shape` [n, p, c, d] as a contiguous [n, p, d, c]: free where x is Transposed
        (ggml's intra_chunk made it so), else a copy."""
        n, p, c, d = shape
        if isinstance(x, Transposed):
            return self.as_shape(self.dense(x.value), (n, p, d, c))
        return self.permute(self.as_shape(x, shape), (0, 1, 3, 2))

    def op_intra_chunk(self, node, *operands):
        """Through ggml's batched ops where the target's check takes the node (one gate per
        head, float32), else through its expansion."""
        if intra_chunk_rejects(node) is not None:
            return self.expanded(node, operands)
        return lower_intra_chunk(self, node, *operands)

    def chunk(self, x: Value, i: int) -> object:
        """Chunk i of a contiguous [n, ...] value as a ggml view of x's last 3 (merged) dnir axes."""
        rest = x.shape[1:]
        shape = (math.prod(rest[:-2]), *rest[-2:])
        size = math.prod(shape) * ITEM_SIZE[x.gtype]
        nb = _padded_nb(shape, _contiguous(shape), ITEM_SIZE[x.gtype])
        return self.call("ggml_view_4d", x.t, *ggml_ne(shape), *nb[1:], x.offset + i * size)

    # -- the delta rule through ggml_gated_delta_net ---------------------------------------------
    # ggml's fused op runs the delta rule token by token over a whole sequence, from the raw
    # q, k, v, log-gate g and beta. A token_step (dnir/fused.py, recognised by the target's
    # pipeline) whose operands are made from such raw values (delta_rule_roles) lowers to it;
    # so does a scan over tokens whose body is that step. Anything else is expanded (the step)
    # or unrolled (the scan).

    def op_token_step(self, node, *operands):
        roles = delta_rule_roles(node)
        state = operands[0]
        if roles is not None and state.shape[-1] == state.shape[-2]:
            raw = {role: self.dense(self.values[id(n)]) for role, n in roles.items()}
            return self.gated_delta_net(raw, state, 1, node.type[1].shape)
        return self.expanded(node, operands)

    def expanded(self, node, operands):
        """A fused op through its expansion into primitive ops (dnir/fused.py): its results, or
        its one value for an op of one result (chunk_output)."""
        params = [make_node("input", (), {"name": f"x{i}", "shape": x.shape, "dtype": x.dtype})
                  for i, x in enumerate(node.inputs)]
        results = REGISTRY[node.op].expand(node.replace(inputs=params))
        single = isinstance(results, Node)
        body = Graph(params, [results] if single else results)
        values = self.lower(body, list(operands), f"{self.where} expanded: ")
        return values[0] if single else tuple(values)

    def token_scan(self, node, operands):
        """The results of a scan over tokens through ggml_gated_delta_net, or None if its body is not
        one delta-rule step on the scan's per-token slices (carrying only the state)."""
        body: Graph = node.attrs["body"]
        nc, nx = node.attrs["num_carry"], node.attrs["num_xs"]
        if nc != 1 or len(body.outputs) != 2 or body.outputs[0].op != "item":
            return None
        step = body.outputs[0].inputs[0]
        o = _through_reshapes(body.outputs[1])
        if step.op != "token_step" or o.op != "item" or o.inputs[0] is not step or step.inputs[0] is not body.inputs[0]:
            return None
        roles = delta_rule_roles(step)
        slices = {id(n): i for i, n in enumerate(body.inputs[1:1 + nx], 1)}
        state = operands[0]
        if roles is None or any(id(n) not in slices for n in roles.values()) or state.shape[-1] != state.shape[-2]:
            return None
        raw = {role: operands[slices[id(n)]] for role, n in roles.items()}
        return self.gated_delta_net(raw, state, node.attrs["length"], node.type[1].shape)

    def gated_delta_net(self, raw: dict, state: Value, tokens: int, o_shape) -> tuple:
        """(final state, o) of `tokens` delta-rule steps from raw per-token values, each laid out
        [tokens, *heads, n] (heads: the state's leading axes, any number of them)."""
        *heads, k, v = state.shape
        p = math.prod(heads)
        size = math.prod(raw["g"].shape) // (tokens * p)       # 1 (a gate per head) or k (per channel)
        # ggml scales q by 1/sqrt(k) itself; dnir's graph has scaled it already.
        q = self.call("ggml_scale", self.view(raw["q"], (1, tokens, p, k)), math.sqrt(k))
        args = [q, self.view(raw["k"], (1, tokens, p, k)), self.view(raw["v"], (1, tokens, p, v)),
                self.view(raw["g"], (1, tokens, p, size)), self.view(raw["beta"], (1, tokens, p, 1))]
        # ggml keeps each head's state transposed ([v, k] rows).
        s0 = self.permute(self.as_shape(state, (p, k, v)), (0, 2, 1))
        out = self.call("ggml_gated_delta_net", *args, self.view(s0, (1, p, v, k)), 1)
        o = self.call("ggml_view_1d", out, tokens * p * v, 0)
        s1 = self.call("ggml_view_1d", out, p * v * k, tokens * p * v * 4)
        s1 = self.permute(self.made(s1, (p * v * k,), (p, v, k), "f32"), (0, 2, 1))
        return (self.as_shape(s1, state.shape),
                Value(o, tuple(o_shape), ggml_ne((tokens * p * v,)), out, "f32"))

    def step_slice(self, x: Value, step: int) -> Value:
        size = math.prod(x.shape[1:])
        t = self.call("ggml_view_1d", x.t, size, step * size * ITEM_SIZE[x.gtype])
        return Value(t, x.shape[1:], ggml_ne((size,)), x.base, x.dtype)


def _through_reshapes(node: Node) -> Node:
    while node.op == "reshape":
        node = node.inputs[0]
    return node


def _product_of(node: Node, x: Node, y: Node) -> bool:
    """Whether `node` is mul(x, y) or mul(y, x), reshapes aside."""
    return node.op == "mul" and sorted(id(_through_reshapes(i)) for i in node.inputs) == sorted((id(x), id(y)))


def delta_rule_roles(step: Node) -> dict | None:
    """The raw q, k, v, g, beta a token_step is made of, when it is made of them the way
    ggml_gated_delta_net computes (decay = exp(g), k_row = k decay, q_row = q decay,
    qk = sum(q k) over the last axis; reshapes aside), else None."""
    _, decay, k_col, k_row, q_row, v, beta, qk = (_through_reshapes(i) for i in step.inputs)
    dot = qk.inputs[0] if qk.op == "sum" and tuple(qk.attrs["axes"]) in ((-1,), (qk.inputs[0].rank - 1,)) else None
    if decay.op != "exp" or dot is None or dot.op != "mul" or step.inputs[0].dtype != "f32":
        return None
    q, k = (_through_reshapes(i) for i in dot.inputs)
    if id(k) != id(k_col):
        q, k = k, q
    if id(k) != id(k_col) or not _product_of(k_row, k, decay) or not _product_of(q_row, q, decay):
        return None
    return {"q": q, "k": k, "v": v, "g": decay.inputs[0], "beta": beta}


# Ops that read strided operands (views): ggml's binary ops and mul_mat read rows with any
# strides, and the layout ops only make new views. Every other op gets contiguous operands.
_READS_STRIDED = {"add", "sub", "mul", "div", "matmul", "reshape", "permute", "slice", "cont", "item"}

# Ops that take a Transposed operand as it is (item passes it on, chunk_scan reads the transpose).
_READS_TRANSPOSED = {"item", "chunk_scan"}

# Values whose bytes are not the node's own to overwrite.
_SHARED = {"input", "const", "item", "scan"}

# Ops that move or convert values of any dtype; every other op computes on f32 (bool as f32 0/1).
_ANY_DTYPE = {"cast", "reshape", "item", "scan"}


def _swap_last(shape):
    r = len(shape)
    return tuple(range(r - 2)) + (r - 1, r - 2)


def _shape_of(ne):
    return tuple(reversed(ne))


def _numpy_storage(dtype: str):
    return {"f32": np.float32, "bool": np.float32, "i32": np.int32, "f16": np.float16}[dtype]
