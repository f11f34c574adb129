"""The op registry: the one place that says what each op is.

An `OpDef` owns an op's arity, attribute schema, type inference, FLOP count
and the facts other layers ask about an op: its class, whether it commutes,
which view it is, which operands its result may overwrite. Other concerns
(NumPy kernels, TVM legalisations, value ranges) keep their own tables keyed by
op name, each checked complete against this registry.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import numpy as np

from .errors import AttrError, DnirError, DTypeError, ShapeError, user_call_site
from .graph import Graph, Node, _freeze, install
from .types import FLOAT_DTYPES, TensorType, canonical_dtype, type_str

REQUIRED = object()

# Attribute kinds: a name -> predicate on the (frozen) value.
_KINDS: dict[str, Callable[[object], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "dtype": lambda v: isinstance(v, str),
    "ints": lambda v: isinstance(v, tuple) and all(_KINDS["int"](x) for x in v),
    "pads": lambda v: isinstance(v, tuple) and all(
        isinstance(p, tuple) and len(p) == 2 and all(_KINDS["int"](x) for x in p) for p in v),
    "scalars": lambda v: isinstance(v, tuple) and all(isinstance(x, (int, float, bool)) for x in v),
    "graph": lambda v: isinstance(v, Graph),
}


class OpClass(str, Enum):
    """What kind of work an op does (the viz colours and the cost model group by it)."""
    SOURCE = "source"             # makes a value from its attributes alone
    ELEMENTWISE = "elementwise"   # each output element from the same-index (broadcast) operand elements
    LAYOUT = "layout"             # moves elements without arithmetic
    REDUCTION = "reduction"       # sums or scans along axes
    MATMUL = "matmul"             # contractions and triangular solves
    ASSEMBLY = "assembly"         # builds a value from blocks
    CONTROL = "control"           # loops and reading a multi-result node
    FUSED = "fused"               # a unit of work defined by its expansion into other ops

    def __str__(self):
        return self.value


VIEWS = ("reshape", "slice", "permute", "broadcast")


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: int | None                     # None: variadic
    infer: Callable                       # (input types, attrs) -> TensorType | tuple
    attrs: dict = field(default_factory=dict)   # name -> (kind, default or REQUIRED)
    flops: Callable = lambda ins, out, attrs: 0
    op_class: OpClass | str | None = None     # required; a string is checked and turned into an OpClass
    pure: bool = True
    commutative: bool = False             # a binary op whose operands may be swapped
    view: str | None = None               # which view of its operand the result is (one of VIEWS), or
                                          # None for an op that makes its own values
    inplace: tuple[int, ...] = ()         # operands whose buffer the result may take over when the
                                          # operand dies there (and has the result's type)
    expand: Callable | None = None        # a fused op: node -> its results rebuilt from other ops
                                          # (a tuple for a multi-result op), for backends without a kernel

    def __post_init__(self):
        try:
            object.__setattr__(self, "op_class", OpClass(self.op_class))
        except ValueError:
            raise AttrError(f"op {self.name!r}: op_class={self.op_class!r}; expected one of "
                            f"{[c.value for c in OpClass]}") from None
        if self.view is not None and self.view not in VIEWS:
            raise AttrError(f"op {self.name!r}: view={self.view!r}; expected None or one of {list(VIEWS)}")
        if self.commutative and self.arity != 2:
            raise AttrError(f"op {self.name!r}: commutative needs two operands, arity is {self.arity}")
        if (self.op_class is OpClass.FUSED) != (self.expand is not None):
            raise AttrError(f"op {self.name!r}: a fused op, and only a fused op, has an expand")
        if self.arity is not None and any(not 0 <= i < self.arity for i in self.inplace):
            raise AttrError(f"op {self.name!r}: inplace operands {list(self.inplace)} out of range "
                            f"for arity {self.arity}")

    @property
    def elementwise(self) -> bool:
        return self.op_class is OpClass.ELEMENTWISE


REGISTRY: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    REGISTRY[opdef.name] = opdef
    return opdef


def get_op(name: str) -> OpDef:
    try:
        return REGISTRY[name]
    except KeyError:
        raise AttrError(f"unknown op {name!r}; known ops: {', '.join(sorted(REGISTRY))}") from None


class _Fail(Exception):
    """Raised by inference rules; make_node turns it into a located DnirError."""

    def __init__(self, cls, message):
        self.cls, self.message = cls, message


def fail(message: str, cls=ShapeError):
    raise _Fail(cls, message)


def make_node(op: str, inputs, attrs) -> Node:
    """Create a typed node, or raise a DnirError that names the op, operand
    types, what was expected and the call site that built it."""
    inputs = tuple(inputs)
    try:
        opdef = get_op(op)
    except AttrError as e:
        _raise(AttrError, op, inputs, str(e))
    in_types = []
    for i, x in enumerate(inputs):
        if not isinstance(x, Node):
            _raise(AttrError, op, inputs, f"operand {i} is {type(x).__name__}, expected a dnir Node")
        in_types.append(x.type)
    if opdef.arity is not None and len(inputs) != opdef.arity:
        _raise(ShapeError, op, inputs, f"takes {opdef.arity} operand(s), got {len(inputs)}")
    if op not in ("item",) and any(isinstance(t, tuple) for t in in_types):
        _raise(ShapeError, op, inputs, "an operand is a multi-result node; read one result with item()")
    attrs = _check_attrs(opdef, dict(attrs), inputs)
    try:
        out = opdef.infer(tuple(in_types), attrs)
    except _Fail as f:
        _raise(f.cls, op, inputs, f.message)
    except DnirError as e:
        _raise(type(e), op, inputs, str(e))
    return Node(op, inputs, attrs, out)


def _raise(cls, op, inputs, message):
    types = ", ".join(type_str(x.type) if isinstance(x, Node) else repr(x) for x in inputs)
    site = user_call_site()
    where = f" [built at {site}]" if site else ""
    raise cls(f"{op}({types}): {message}{where}") from None  # hide inference internals


def _check_attrs(opdef: OpDef, attrs: dict, inputs) -> dict:
    unknown = set(attrs) - set(opdef.attrs)
    if unknown:
        _raise(AttrError, opdef.name, inputs,
               f"unknown attribute(s) {sorted(unknown)}; expected {sorted(opdef.attrs) or 'none'}")
    out = {}
    for name, (kind, default) in opdef.attrs.items():
        if name in attrs:
            value = _freeze(attrs[name])
        elif default is REQUIRED:
            _raise(AttrError, opdef.name, inputs, f"missing attribute {name!r} ({kind})")
        else:
            value = default
        if kind == "float" and _KINDS["int"](value):
            value = float(value)
        if not _KINDS[kind](value):
            _raise(AttrError, opdef.name, inputs, f"attribute {name}={value!r} is not of kind {kind}")
        out[name] = value
    return out


def as_node_like(value, like: Node) -> Node:
    """Python scalars next to a node become scalar consts of its dtype."""
    if isinstance(value, Node):
        return value
    if isinstance(value, (int, float, bool, np.generic)):
        return make_node("const", (), {"value": (value,), "shape": (), "dtype": like.dtype})
    raise DnirError(f"cannot use {type(value).__name__} {value!r} as a dnir operand")


def slice_by_index(x: Node, index) -> Node:
    """x[1:3, :, 0:4] (basic slices only; an integer index keeps its axis)."""
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > x.rank:
        _raise(ShapeError, "slice", (x,), f"index {index} has more entries than rank {x.rank}")
    starts, stops = [], []
    for axis, d in enumerate(x.shape):
        sl = index[axis] if axis < len(index) else slice(None)
        if isinstance(sl, (int, np.integer)):
            if not -d <= sl < d:
                _raise(ShapeError, "slice", (x,), f"index {int(sl)} is out of range for axis {axis} of size {d}")
            i = int(sl) + (d if sl < 0 else 0)
            sl = slice(i, i + 1)
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            _raise(ShapeError, "slice", (x,), f"axis {axis}: only unit-step slices and integers are supported, "
                                              f"got {sl!r}")
        a, b, _ = sl.indices(d)
        starts.append(a)
        stops.append(max(a, b))
    return make_node("slice", (x,), {"starts": starts, "stops": stops})


# ---------------------------------------------------------------------------
# Shape helpers

def broadcast_shapes(*shapes) -> tuple[int, ...]:
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        dims = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0}
        dims.discard(1)
        if len(dims) > 1:
            fail(f"shapes {[list(s) for s in shapes]} do not broadcast (axis {axis - rank}: sizes {sorted(dims)})")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < rank:
        fail(f"{what} {axis} is out of range for rank {rank} (expected {-rank}..{rank - 1})")
    return axis % rank


def _same_dtype(ts, what="operands"):
    dtypes = {t.dtype for t in ts}
    if len(dtypes) > 1:
        fail(f"{what} have different dtypes {[t.dtype for t in ts]}; expected one dtype (insert a cast)",
             DTypeError)
    return ts[0].dtype


def _need_float(t: TensorType):
    if t.dtype not in FLOAT_DTYPES:
        fail(f"expected a floating-point operand, got {t.dtype}", DTypeError)


def _size(t) -> int:
    return math.prod(t.shape)


def _elementwise_flops(ins, out, attrs):
    return _size(out)


# ---------------------------------------------------------------------------
# Sources

def _infer_input(ins, attrs):
    # The text format names an input %name; anything but an identifier would not parse back.
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", attrs["name"]):
        fail(f"input name {attrs['name']!r} is not an identifier (letters, digits, _)", AttrError)
    return TensorType(attrs["shape"], attrs["dtype"])


_INT_RANGE = {"i32": (-2**31, 2**31 - 1), "i64": (-2**63, 2**63 - 1), "bool": (0, 1)}


def _infer_const(ins, attrs):
    t = TensorType(attrs["shape"], canonical_dtype(attrs["dtype"]))
    if len(attrs["value"]) != _size(t):
        fail(f"value has {len(attrs['value'])} elements, expected {_size(t)} for shape {list(t.shape)}")
    # An integer const must hold its values exactly: NumPy would truncate 1.5 silently
    # (x_i32 + 1.5 == x_i32 + 1) or overflow at run time.
    if t.dtype in _INT_RANGE:
        lo, hi = _INT_RANGE[t.dtype]
        for v in attrs["value"]:
            if not (float(v).is_integer() and lo <= v <= hi):
                fail(f"value {v!r} is not representable as {t.dtype} (expected an integer in {lo}..{hi})",
                     DTypeError)
    return t


def _infer_full(ins, attrs):
    return TensorType(attrs["shape"], canonical_dtype(attrs["dtype"]))


def _infer_eye(ins, attrs):
    if attrs["n"] < 0:
        fail(f"n={attrs['n']} must be >= 0")
    return TensorType((attrs["n"], attrs["n"]), canonical_dtype(attrs["dtype"]))


register(OpDef("input", 0, _infer_input, {"name": ("str", REQUIRED), "shape": ("ints", REQUIRED),
                                           "dtype": ("dtype", REQUIRED)}, op_class="source"))
register(OpDef("const", 0, _infer_const, {"value": ("scalars", REQUIRED), "shape": ("ints", REQUIRED),
                                           "dtype": ("dtype", REQUIRED)}, op_class="source"))
register(OpDef("full", 0, _infer_full, {"value": ("float", REQUIRED), "shape": ("ints", REQUIRED),
                                         "dtype": ("dtype", "f32")}, op_class="source"))
register(OpDef("eye", 0, _infer_eye, {"n": ("int", REQUIRED), "dtype": ("dtype", "f32")}, op_class="source"))

# ---------------------------------------------------------------------------
# Elementwise


def _infer_unary_float(ins, attrs):
    _need_float(ins[0])
    return ins[0]


def _infer_unary(ins, attrs):
    if ins[0].dtype == "bool":
        fail("expected a numeric operand, got bool", DTypeError)
    return ins[0]


UNARY = ("neg", "exp", "log", "sigmoid", "softplus", "sqrt", "rsqrt")
for _name in UNARY:
    register(OpDef(_name, 1, _infer_unary if _name == "neg" else _infer_unary_float,
                   flops=_elementwise_flops, op_class="elementwise", inplace=(0,)))


def _infer_cast(ins, attrs):
    return ins[0].with_dtype(canonical_dtype(attrs["dtype"]))


register(OpDef("cast", 1, _infer_cast, {"dtype": ("dtype", REQUIRED)}, op_class="elementwise",
               inplace=(0,)))


def _infer_clamp(ins, attrs):
    _infer_unary(ins, attrs)
    if attrs["min"] > attrs["max"]:
        fail(f"min={attrs['min']} > max={attrs['max']}", AttrError)
    return ins[0]


register(OpDef("clamp", 1, _infer_clamp, {"min": ("float", float("-inf")), "max": ("float", float("inf"))},
               flops=_elementwise_flops, op_class="elementwise", inplace=(0,)))


def _infer_binary(ins, attrs):
    dtype = _same_dtype(ins)
    if dtype == "bool":
        fail("expected numeric operands, got bool", DTypeError)
    return TensorType(broadcast_shapes(*(t.shape for t in ins)), dtype)


def _infer_div(ins, attrs):
    # NumPy's true division of integers gives floats, which an integer result type cannot hold.
    if ins[0].dtype not in FLOAT_DTYPES or ins[1].dtype not in FLOAT_DTYPES:
        fail(f"expected floating-point operands, got {ins[0].dtype} and {ins[1].dtype} (cast first)",
             DTypeError)
    return _infer_binary(ins, attrs)


BINARY = ("add", "sub", "mul", "div", "maximum", "minimum")
for _name in BINARY:
    register(OpDef(_name, 2, _infer_div if _name == "div" else _infer_binary, flops=_elementwise_flops,
                   op_class="elementwise", commutative=_name in ("add", "mul", "maximum", "minimum"),
                   inplace=(0, 1)))


def _infer_where(ins, attrs):
    if ins[0].dtype != "bool":
        fail(f"condition must be bool, got {ins[0].dtype}", DTypeError)
    dtype = _same_dtype(ins[1:], "branches")
    return TensorType(broadcast_shapes(*(t.shape for t in ins)), dtype)


register(OpDef("where", 3, _infer_where, flops=_elementwise_flops, op_class="elementwise", inplace=(1, 2)))

# ---------------------------------------------------------------------------
# Layout


def _infer_reshape(ins, attrs):
    shape = attrs["shape"]
    if any(d < 0 for d in shape):
        fail(f"shape {list(shape)} has a negative size (the builder resolves -1)")
    if math.prod(shape) != _size(ins[0]):
        fail(f"cannot reshape {_size(ins[0])} elements to {list(shape)} ({math.prod(shape)} elements)")
    return ins[0].with_shape(shape)


def _infer_permute(ins, attrs):
    axes, rank = attrs["axes"], ins[0].rank
    if sorted(a % rank if -rank <= a < rank else a for a in axes) != list(range(rank)):
        fail(f"axes {list(axes)} are not a permutation of 0..{rank - 1}")
    return ins[0].with_shape(tuple(ins[0].shape[a] for a in axes))


def _infer_broadcast_to(ins, attrs):
    shape = attrs["shape"]
    if len(shape) < ins[0].rank or broadcast_shapes(ins[0].shape, shape) != tuple(shape):
        fail(f"cannot broadcast {list(ins[0].shape)} to {list(shape)}")
    return ins[0].with_shape(shape)


def _infer_pad(ins, attrs):
    pads = attrs["pads"]
    if len(pads) != ins[0].rank:
        fail(f"pads has {len(pads)} (before, after) pairs, expected one per axis ({ins[0].rank})")
    if any(p < 0 for pair in pads for p in pair):
        fail(f"pads {[list(p) for p in pads]} must be >= 0")
    return ins[0].with_shape(tuple(d + a + b for d, (a, b) in zip(ins[0].shape, pads)))


def _infer_slice(ins, attrs):
    starts, stops, shape = attrs["starts"], attrs["stops"], ins[0].shape
    if len(starts) != len(shape) or len(stops) != len(shape):
        fail(f"starts/stops need one entry per axis ({len(shape)}), got {list(starts)} / {list(stops)}")
    for axis, (a, b, d) in enumerate(zip(starts, stops, shape)):
        if not 0 <= a <= b <= d:
            fail(f"axis {axis}: [{a}:{b}] is not within 0..{d} with start <= stop")
    return ins[0].with_shape(tuple(b - a for a, b in zip(starts, stops)))


def _infer_concat(ins, attrs):
    if not ins:
        fail("needs at least one operand")
    dtype = _same_dtype(ins)
    rank = ins[0].rank
    axis = norm_axis(attrs["axis"], rank)
    for t in ins:
        if t.rank != rank or any(d != e for i, (d, e) in enumerate(zip(t.shape, ins[0].shape)) if i != axis):
            fail(f"operand shapes {[list(t.shape) for t in ins]} differ outside axis {axis}")
    shape = list(ins[0].shape)
    shape[axis] = sum(t.shape[axis] for t in ins)
    return TensorType(shape, dtype)


register(OpDef("reshape", 1, _infer_reshape, {"shape": ("ints", REQUIRED)}, op_class="layout", view="reshape"))
register(OpDef("permute", 1, _infer_permute, {"axes": ("ints", REQUIRED)}, op_class="layout", view="permute"))
register(OpDef("broadcast_to", 1, _infer_broadcast_to, {"shape": ("ints", REQUIRED)}, op_class="layout",
               view="broadcast"))
register(OpDef("pad", 1, _infer_pad, {"pads": ("pads", REQUIRED), "value": ("float", 0.0)}, op_class="layout"))
register(OpDef("slice", 1, _infer_slice, {"starts": ("ints", REQUIRED), "stops": ("ints", REQUIRED)},
               op_class="layout", view="slice"))
register(OpDef("concat", None, _infer_concat, {"axis": ("int", REQUIRED)}, op_class="assembly"))
register(OpDef("cont", 1, lambda ins, attrs: ins[0], op_class="layout"))

# ---------------------------------------------------------------------------
# Reductions and scans along an axis


def _infer_sum(ins, attrs):
    t = ins[0]
    if t.dtype == "bool":
        fail("cannot sum bool", DTypeError)
    axes = sorted({norm_axis(a, t.rank) for a in attrs["axes"]})
    if len(axes) != len(attrs["axes"]):
        fail(f"axes {list(attrs['axes'])} repeat an axis")
    if attrs["keepdims"]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(t.shape))
    else:
        shape = tuple(d for i, d in enumerate(t.shape) if i not in axes)
    return t.with_shape(shape)


def _infer_cumsum(ins, attrs):
    if ins[0].dtype == "bool":
        fail("cannot cumsum bool", DTypeError)
    if ins[0].rank == 0:
        fail("cumsum needs rank >= 1")
    norm_axis(attrs["axis"], ins[0].rank)
    return ins[0]


register(OpDef("sum", 1, _infer_sum, {"axes": ("ints", REQUIRED), "keepdims": ("bool", False)},
               flops=lambda ins, out, attrs: _size(ins[0]), op_class="reduction"))
# inplace: each running sum reads its own element before writing it (the segment sums' masked
# gates [.., C, C, K] need no second buffer).
register(OpDef("cumsum", 1, _infer_cumsum, {"axis": ("int", REQUIRED)},
               flops=lambda ins, out, attrs: _size(out), op_class="reduction", inplace=(0,)))

# ---------------------------------------------------------------------------
# Matrix ops


def matmul_dims(ins, attrs):
    """(batch shape, m, k, n) of a matmul, or fail."""
    a, b = ins
    if a.rank < 2 or b.rank < 2:
        fail("operands need rank >= 2 (add a size-1 axis for a vector)")
    m, ka = (a.shape[-1], a.shape[-2]) if attrs["transpose_a"] else a.shape[-2:]
    kb, n = (b.shape[-1], b.shape[-2]) if attrs["transpose_b"] else b.shape[-2:]
    if ka != kb:
        fail(f"contracted dimensions differ: {ka} (a{'^T' if attrs['transpose_a'] else ''}) vs "
             f"{kb} (b{'^T' if attrs['transpose_b'] else ''}); expected a [..., m, k] @ b [..., k, n]")
    return broadcast_shapes(a.shape[:-2], b.shape[:-2]), m, ka, n


def _infer_matmul(ins, attrs):
    dtype = _same_dtype(ins)
    if dtype == "bool":
        fail("cannot multiply bool matrices", DTypeError)
    batch, m, _, n = matmul_dims(ins, attrs)
    return TensorType(batch + (m, n), dtype)


def _matmul_flops(ins, out, attrs):
    batch, m, k, n = matmul_dims(ins, attrs)
    return 2 * math.prod(batch) * m * n * k


def _infer_tri(ins, attrs):
    if ins[0].rank < 2:
        fail("needs rank >= 2 (masks the last two axes)")
    return ins[0]


def _infer_solve_tri(ins, attrs):
    a, b = ins
    _need_float(a)
    _same_dtype(ins)
    if a.rank < 2 or a.shape[-1] != a.shape[-2]:
        fail(f"A must be [..., n, n], got {list(a.shape)}")
    if b.rank < 2 or b.shape[-2] != a.shape[-1]:
        fail(f"B must be [..., {a.shape[-1]}, m] to match A, got {list(b.shape)}")
    return TensorType(broadcast_shapes(a.shape[:-2], b.shape[:-2]) + b.shape[-2:], a.dtype)


def _solve_tri_flops(ins, out, attrs):
    n, m = out.shape[-2:]
    return math.prod(out.shape[:-2]) * n * n * m


register(OpDef("matmul", 2, _infer_matmul, {"transpose_a": ("bool", False), "transpose_b": ("bool", False)},
               flops=_matmul_flops, op_class="matmul"))
register(OpDef("tril", 1, _infer_tri, {"k": ("int", 0)}, flops=_elementwise_flops, op_class="elementwise",
               inplace=(0,)))
register(OpDef("triu", 1, _infer_tri, {"k": ("int", 0)}, flops=_elementwise_flops, op_class="elementwise",
               inplace=(0,)))
register(OpDef("solve_tri", 2, _infer_solve_tri, {"lower": ("bool", True), "unit_diagonal": ("bool", False)},
               flops=_solve_tri_flops, op_class="matmul"))

# ---------------------------------------------------------------------------
# Block assembly: write or add a block at offsets


def _infer_region(ins, attrs):
    dst, src = ins
    _same_dtype(ins)
    offsets = attrs["offsets"]
    if src.rank != dst.rank or len(offsets) != dst.rank:
        fail(f"block rank {src.rank}, destination rank {dst.rank} and {len(offsets)} offsets must agree")
    for axis, (o, s, d) in enumerate(zip(offsets, src.shape, dst.shape)):
        if o < 0 or o + s > d:
            fail(f"axis {axis}: block [{o}:{o + s}] does not fit in destination size {d}")
    return dst


register(OpDef("set", 2, _infer_region, {"offsets": ("ints", REQUIRED)}, op_class="assembly", inplace=(0,)))
# inplace: the destination has no other reader, so a backend may add into its buffer (set by set_vs_acc).
register(OpDef("acc", 2, _infer_region, {"offsets": ("ints", REQUIRED), "inplace": ("bool", False)},
               flops=lambda ins, out, attrs: _size(ins[1]), op_class="assembly", inplace=(0,)))

# ---------------------------------------------------------------------------
# Control: scan over a leading axis, and item to read one result


def scan_signature(ins, attrs):
    """Check a scan's operands against its body; return the result types.

    Operands: carries (num_carry), sequences sliced along axis 0 (num_xs), then
    loop-invariant operands. Body inputs: the same, with a sequence's leading
    axis removed. Body outputs: new carries, then per-step outputs that the
    scan stacks along a new leading axis of size `length`.
    """
    body: Graph = attrs["body"]
    nc, nx, length = attrs["num_carry"], attrs["num_xs"], attrs["length"]
    if nc < 0 or nx < 0 or nc + nx > len(ins) or length < 0:
        fail(f"num_carry={nc}, num_xs={nx}, length={length} do not fit {len(ins)} operands", AttrError)
    if len(body.inputs) != len(ins):
        fail(f"body takes {len(body.inputs)} inputs, scan has {len(ins)} operands")
    expected = list(ins[:nc])
    for i, t in enumerate(ins[nc:nc + nx]):
        if t.rank == 0 or t.shape[0] != length:
            fail(f"sequence operand {nc + i} has shape {list(t.shape)}; expected leading axis {length}")
        expected.append(t.with_shape(t.shape[1:]))
    expected += list(ins[nc + nx:])
    for i, (want, got) in enumerate(zip(expected, body.input_types)):
        if want != got:
            fail(f"body input {i} ({body.input_names[i]}) has type {got}, expected {want}")
    outs = body.output_types
    if len(outs) < nc:
        fail(f"body returns {len(outs)} values, expected at least the {nc} carries")
    for i in range(nc):
        if outs[i] != ins[i]:
            fail(f"carry {i}: body returns {outs[i]}, expected the carried type {ins[i]}")
    return tuple(ins[:nc]) + tuple(t.with_shape((length,) + t.shape) for t in outs[nc:])


def _scan_flops(ins, out, attrs):
    return attrs["length"] * graph_flops(attrs["body"])


def _infer_item(ins, attrs):
    (t,) = ins
    if not isinstance(t, tuple):
        fail("operand is a single value; item() reads one result of a multi-result node")
    if not 0 <= attrs["index"] < len(t):
        fail(f"index {attrs['index']} out of range for {len(t)} results")
    return t[attrs["index"]]


register(OpDef("scan", None, scan_signature,
               {"body": ("graph", REQUIRED), "length": ("int", REQUIRED),
                "num_carry": ("int", REQUIRED), "num_xs": ("int", REQUIRED)},
               flops=_scan_flops, op_class="control"))
register(OpDef("item", 1, _infer_item, {"index": ("int", REQUIRED)}, op_class="control"))


def table_entry(table: dict):
    """A decorator maker for a per-op table: @entry("add", "sub") enters a function for both ops."""
    def entry(*ops):
        def register(fn):
            for op in ops:
                table[op] = fn
            return fn
        return register
    return entry


def check_table(table: str, entries, fused: str | None = None):
    """Raise DnirError unless `entries` (the op names a per-op table of another module has)
    covers every registered op; `fused` names the rule that covers fused ops, if one does.
    Tables call this when their module is imported, so an op added without its entry
    fails at once, naming the op and the table."""
    missing = sorted(op for op, d in REGISTRY.items()
                     if op not in entries and not (fused and d.op_class is OpClass.FUSED))
    if missing:
        covered = f"; fused ops are covered by {fused}" if fused else "; fused ops need one too"
        raise DnirError(f"{table} has no entry for op(s) {', '.join(missing)}: add one for each{covered}")


def op_flops(node: Node) -> int:
    return REGISTRY[node.op].flops(tuple(i.type for i in node.inputs), node.type, node.attrs)


def graph_flops(graph: Graph) -> int:
    """A graph's FLOPs by its ops' own counts (a scan counts its body once per step)."""
    return sum(op_flops(n) for n in graph.topo_order())


install(build=make_node, operand=as_node_like, index=slice_by_index)
