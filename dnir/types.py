"""TensorType: the one value type of the IR (static shape, dtype)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import DTypeError, InputError, ShapeError

# Short name -> NumPy dtype name. bfloat16 needs ml_dtypes (NumPy has none).
DTYPES = {
    "f16": "float16", "bf16": "bfloat16", "f32": "float32", "f64": "float64",
    "i32": "int32", "i64": "int64", "bool": "bool",
}
_LONG = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset({"f16", "bf16", "f32", "f64"})
# The largest relative error of rounding to nearest into each float dtype (half an ulp at 1):
# the error a result stored in it carries however exactly it was computed.
UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "f16": 2.0 ** -11, "f32": 2.0 ** -24, "f64": 2.0 ** -53}
HALF_DTYPES = frozenset({"f16", "bf16"})


def accumulation_dtype(dtype: str) -> str:
    """The dtype a reduction over `dtype` values (sum, cumsum, matmul, solve_tri) adds in: float32
    for half precision, rounded once into the result, as GPUs compute (a product of two bf16 or
    fp16 values is exact in float32; 64 sums in half precision would lose most of its bits)."""
    return "f32" if dtype in HALF_DTYPES else dtype
INT_DTYPES = frozenset({"i32", "i64"})


def canonical_dtype(dtype) -> str:
    """'float32', np.float32, np.dtype('float32') or 'f32' -> 'f32'."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name in _LONG:
        return _LONG[name]
    raise DTypeError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")


def numpy_dtype(dtype: str) -> np.dtype:
    if dtype == "bf16":
        try:
            import ml_dtypes
        except ImportError as e:  # pragma: no cover - depends on the install
            raise DTypeError("bf16 needs the ml_dtypes package (NumPy has no bfloat16)") from e
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(DTYPES[dtype])


@dataclass(frozen=True)
class TensorType:
    shape: tuple[int, ...]
    dtype: str

    def __init__(self, shape, dtype="f32"):
        try:
            shape = tuple(int(d) for d in shape)
        except TypeError:
            raise ShapeError(f"shape must be a sequence of ints, got {shape!r}") from None
        if any(d < 0 for d in shape):
            raise ShapeError(f"shape {list(shape)} has a negative dimension")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", canonical_dtype(dtype))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)     # exact Python int (executors ask for it per value and step)

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bf16" else np.dtype(DTYPES[self.dtype]).itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def with_shape(self, shape) -> "TensorType":
        return TensorType(shape, self.dtype)

    def with_dtype(self, dtype) -> "TensorType":
        return TensorType(self.shape, dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"

    __repr__ = __str__


def type_str(t) -> str:
    """A TensorType or a tuple of them (multi-result ops) as text."""
    if isinstance(t, tuple):
        return "(" + ", ".join(map(str, t)) + ")"
    return str(t)


# The tensor-core products on CUDA (lowering/tvm/mma.py): "highest" runs each as three TF32
# products (3xTF32, float32's accuracy), "tf32" as one (about 1e-3 relative, faster). Half inputs
# are exact in TF32, so "tf32" is their default; a bf16 layer at "tf32" also stores the chunked
# loop's intermediates in bf16 (passes/narrow_loop_results.py). Every other target computes in
# float32 either way.
# A layer's option (DeltaNetConfig.precision), kept in its graph's metadata for the lowering.
PRECISIONS = ("highest", "tf32")


def default_precision(dtype: str) -> str:
    """The tensor-core precision of a layer whose activations are `dtype`: "tf32" for half ones
    (exactly representable in TF32), "highest" for float32."""
    return "tf32" if dtype in ("bf16", "f16") else "highest"


def precision_of(meta) -> str:
    """The tensor-core precision a graph with metadata `meta` asks for: its `precision`, else by its
    delta-net dtype (a file written before the option), else "highest"."""
    precision = meta.get("precision")
    if precision is None:
        return default_precision(meta.get("dtype")) if meta.get("model") == "delta_net" else "highest"
    if precision not in PRECISIONS:
        raise InputError(f"meta precision={precision!r}; expected one of {', '.join(PRECISIONS)}")
    return precision
