"""Where a fused op's q and k were before their GQA repeat and q before its constant scale.

The layer repeats q and k over the value heads of a head (reshape, broadcast_to, reshape) and
scales q by a constant; a backend that indexes the q/k head of a value head itself, or folds
the scale into a factor it applies anyway, reads the values from before those copies, which
then need not be made. Both TVM's CPU chunk layer and ggml's intra_chunk read them so.
"""
from __future__ import annotations


def unrepeated(x):
    """(the [R, T, H, K] value that x [R, T, H * group, K] repeats, group), or (x, 1)."""
    if x.op != "reshape" or x.inputs[0].op != "broadcast_to" or x.inputs[0].inputs[0].op != "reshape":
        return x, 1
    wide, narrow = x.inputs[0], x.inputs[0].inputs[0]
    src = narrow.inputs[0]
    if src.rank != 4 or narrow.rank != 5:
        return x, 1
    R, T, H, K = src.shape
    group = wide.shape[3]
    if narrow.shape != (R, T, H, 1, K) or wide.shape != (R, T, H, group, K) or x.shape != (R, T, H * group, K):
        return x, 1
    return src, group


def unscaled(x):
    """(the value x is a constant scalar times, the constant), or (x, None)."""
    if x.op != "mul":
        return x, None
    for a, b in (x.inputs, x.inputs[::-1]):
        if b.op == "const" and b.shape == () and b.dtype == a.dtype and a.shape == x.shape:
            return a, float(b.attrs["value"][0])
    return x, None


def head_reads(q, k):
    """(q, k, group, scale) for the operands q and k of a fused op: q and k before their repeat
    (group: value heads per head, 1 when they are not both repeated alike) and q before its
    scale (scale: the constant, else None)."""
    q0, k0 = q, k
    q, group = unrepeated(q)
    k, k_group = unrepeated(k)
    if k_group != group:
        (q, k), group = (q0, k0), 1
    q, scale = unscaled(q)
    return q, k, group, scale
