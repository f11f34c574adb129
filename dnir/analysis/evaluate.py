"""Values computed from constants alone, for the analyses and passes that reason about them
(constant folding, the masks the range analysis reads).

`evaluate(node, operands)` computes one op on concrete NumPy operands in the node's
dtype, with the arithmetic the NumPy reference backend uses, so a folded constant is
the value the graph would compute. It covers the ops constant-only values are made
of; an op outside `EVALUATORS` (loops, triangular solves, fused ops) gives None, and
the caller keeps the op computed at run time.
"""
from __future__ import annotations

import numpy as np

from ..graph import Node
from ..types import numpy_dtype


def _regions(node, src):
    return tuple(slice(o, o + s) for o, s in zip(node.attrs["offsets"], src.shape))


def _written(node, dt, dst, src):
    out = np.array(dst, dtype=dt, copy=True)
    if node.op == "set":
        out[_regions(node, src)] = src
    else:
        out[_regions(node, src)] += src
    return out


def matmul_operands(node, a, b):
    """A matmul's operands as [.., m, k] and [.., k, n] (views, for the transpose flags)."""
    return (np.swapaxes(a, -1, -2) if node.attrs["transpose_a"] else a,
            np.swapaxes(b, -1, -2) if node.attrs["transpose_b"] else b)


def _matmul(node, dt, a, b):
    return np.matmul(*matmul_operands(node, a, b))


# op -> fn(node, result dtype, *operands); the caller casts the result to the dtype.
EVALUATORS = {
    "const": lambda n, dt: np.asarray(n.attrs["value"], dtype=dt).reshape(n.shape),
    "full": lambda n, dt: np.full(n.shape, n.attrs["value"], dtype=dt),
    "eye": lambda n, dt: np.eye(n.attrs["n"], dtype=dt),
    "neg": lambda n, dt, x: np.negative(x),
    "exp": lambda n, dt, x: np.exp(x),
    "log": lambda n, dt, x: np.log(x),
    "sigmoid": lambda n, dt, x: 0.5 * (np.tanh(0.5 * x) + 1.0),
    "softplus": lambda n, dt, x: np.logaddexp(np.zeros((), x.dtype), x),
    "sqrt": lambda n, dt, x: np.sqrt(x),
    "rsqrt": lambda n, dt, x: 1.0 / np.sqrt(x),
    "add": lambda n, dt, a, b: np.add(a, b),
    "sub": lambda n, dt, a, b: np.subtract(a, b),
    "mul": lambda n, dt, a, b: np.multiply(a, b),
    "div": lambda n, dt, a, b: np.divide(a, b),
    "maximum": lambda n, dt, a, b: np.maximum(a, b),
    "minimum": lambda n, dt, a, b: np.minimum(a, b),
    "cast": lambda n, dt, x: x,
    "clamp": lambda n, dt, x: np.clip(x, n.attrs["min"], n.attrs["max"]),
    "where": lambda n, dt, c, a, b: np.where(c, a, b),
    "reshape": lambda n, dt, x: x.reshape(n.shape),
    "permute": lambda n, dt, x: np.transpose(x, n.attrs["axes"]),
    "broadcast_to": lambda n, dt, x: np.broadcast_to(x, n.shape),
    "pad": lambda n, dt, x: np.pad(x, n.attrs["pads"], constant_values=n.attrs["value"]) if x.ndim else x,
    "slice": lambda n, dt, x: x[tuple(slice(a, b) for a, b in zip(n.attrs["starts"], n.attrs["stops"]))],
    "concat": lambda n, dt, *xs: np.concatenate(xs, axis=n.attrs["axis"]),
    "cont": lambda n, dt, x: x,
    "sum": lambda n, dt, x: np.sum(x, axis=tuple(n.attrs["axes"]), keepdims=n.attrs["keepdims"], dtype=dt),
    "cumsum": lambda n, dt, x: np.cumsum(x, axis=n.attrs["axis"], dtype=dt),
    "matmul": _matmul,
    "tril": lambda n, dt, x: np.tril(x, n.attrs["k"]),
    "triu": lambda n, dt, x: np.triu(x, n.attrs["k"]),
    "set": _written,
    "acc": _written,
}


def evaluate(node: Node, operands) -> np.ndarray | None:
    """The value of `node` from its operands' values (dense, C order), or None when the
    op is not one `EVALUATORS` covers."""
    fn = EVALUATORS.get(node.op)
    if fn is None:
        return None
    dt = numpy_dtype(node.dtype)
    with np.errstate(all="ignore"):     # inf/nan follow IEEE, as in the reference backend
        return np.ascontiguousarray(fn(node, dt, *operands)).astype(dt, copy=False)
