"""Random graphs for the analyses: every op family, views (contiguous and strided
slices, reshapes), ops that can run in place, set/acc, and scans with random bodies."""
import numpy as np
from hypothesis import strategies as st

import dnir

UNARY = ["exp", "neg", "sigmoid", "softplus", "sqrt", "rsqrt", "log"]
BINARY = ["add", "sub", "mul", "div", "maximum", "minimum"]
KINDS = ["unary", "binary", "scalar", "where", "clamp", "reshape", "slice", "permute", "broadcast", "pad",
         "concat", "cont", "sum", "cumsum", "matmul", "tri", "solve", "set", "acc"]


def grow(draw, b, values, steps):
    """Append `steps` random ops on `values` (a list of nodes, rank >= 2) to builder b."""
    for _ in range(steps):
        a = draw(st.sampled_from(values))
        kind = draw(st.sampled_from(KINDS))
        *batch, n, m = a.shape
        if kind == "unary":
            v = getattr(b, draw(st.sampled_from(UNARY)))(a)
        elif kind == "binary":
            same = [x for x in values if x.shape == a.shape]
            row = b.slice_axis(a, -2, 0, 1)            # [..., 1, m]: broadcasts over rows
            other = draw(st.sampled_from(same + [row]))
            x, y = (a, other) if draw(st.booleans()) else (other, a)
            v = getattr(b, draw(st.sampled_from(BINARY)))(x, y)
        elif kind == "scalar":
            v = b.mul(a, draw(st.sampled_from([0.5, -2.0, 3.0])))
        elif kind == "where":
            mask = b.const(draw(st.lists(st.booleans(), min_size=n * m, max_size=n * m)), dtype="bool")
            other = draw(st.sampled_from([x for x in values if x.shape == a.shape]))
            v = b.where(b.reshape(mask, (n, m)), a, other) if draw(st.booleans()) else \
                b.where(b.reshape(mask, (n, m)), other, a)
        elif kind == "clamp":
            v = b.clamp(a, -1.0, 2.0)
        elif kind == "reshape":
            v = b.reshape(a, (*batch, n * m, 1)) if draw(st.booleans()) else b.reshape(a, (1, *a.shape))
        elif kind == "slice":
            axis = draw(st.integers(0, a.rank - 1))
            d = a.shape[axis]
            start = draw(st.integers(0, d - 1))
            v = b.slice_axis(a, axis, start, draw(st.integers(start + 1, d)))
        elif kind == "permute":
            v = b.permute(a, draw(st.permutations(range(a.rank))))
        elif kind == "broadcast":
            v = b.broadcast_to(a, (2, *a.shape))
        elif kind == "pad":
            v = b.pad(a, [(0, 0)] * (a.rank - 1) + [(1, 0)], value=draw(st.sampled_from([0.0, -1.0])))
        elif kind == "concat":
            v = b.concat([a, a], axis=draw(st.integers(0, a.rank - 1)))
        elif kind == "cont":
            v = b.cont(a)
        elif kind == "sum":
            v = b.sum(a, axis=-1, keepdims=True) if draw(st.booleans()) else b.sum(a, axis=0, keepdims=a.rank == 2)
        elif kind == "cumsum":
            v = b.cumsum(a, axis=draw(st.integers(0, a.rank - 1)))
        elif kind == "matmul":
            v = b.matmul(a, a, transpose_b=True)       # [..., n, n]
        elif kind == "tri":
            v = (b.tril if draw(st.booleans()) else b.triu)(a, draw(st.integers(-1, 1)))
        elif kind == "solve":
            square = b.matmul(a, a, transpose_b=True)
            lower = b.add(b.tril(square, -1), b.eye(n))
            v = b.solve_tri(lower, a, lower=True, unit_diagonal=draw(st.booleans()))
        elif kind in ("set", "acc"):
            dst = draw(st.sampled_from([x for x in values if x.shape == a.shape] + [b.zeros(a.shape)]))
            block = b.slice_axis(a, -1, 0, max(1, m // 2))
            v = getattr(b, kind)(dst, block, (0,) * (a.rank - 1) + (m - block.shape[-1],))
        if v.rank >= 2 and v.type.size <= 4096:
            values.append(v)


@st.composite
def random_graphs(draw, scans=True):
    b = dnir.Builder(draw(st.sampled_from(["f32", "f32", "f16", "bf16"])))
    n, m = draw(st.sampled_from([(2, 3), (3, 3), (4, 2)]))
    x, y = b.input("x", (3, n, m)), b.input("y", (n, m))
    values = [x, y]
    grow(draw, b, values, draw(st.integers(1, 8)))
    if scans and draw(st.booleans()):
        values.extend(scan_of(draw, b, x, y))
        grow(draw, b, values, draw(st.integers(0, 3)))
    outs = draw(st.lists(st.sampled_from(values[2:] or values), min_size=1, max_size=3, unique_by=id))
    return b.build(outs)


def scan_of(draw, b, xs, init):
    """A scan over the leading axis of xs with a random body; returns its result items."""
    bb = dnir.Builder(init.dtype)
    c = bb.input("c", init.shape)
    x = bb.input("x", xs.shape[1:])
    w = bb.input("w", init.shape)
    body_values = [c, x, w]
    grow(draw, bb, body_values, draw(st.integers(1, 6)))
    carries = [v for v in body_values if v.type == init.type]
    new_carry = draw(st.sampled_from(carries))
    ys = draw(st.sampled_from(body_values))
    body = bb.build([new_carry, ys])
    first = b.exp(init) if draw(st.booleans()) else init   # an initial value the loop may take over
    return b.scan(body, [first], [xs], [init])


def random_inputs(graph, rng):
    return {n.attrs["name"]: rng.standard_normal(n.shape).astype(np.float32) for n in graph.inputs}
