"""Type inference agrees with what NumPy actually does, on random shapes.

For each case NumPy runs on random arrays; dnir must infer exactly the
resulting shape and dtype (and the NumPy backend must produce that value),
or raise a ShapeError exactly when NumPy raises.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dnir
from dnir import Builder, DTypeError, ShapeError
from dnir.types import canonical_dtype

# Local settings (not a global profile, which would change other files' hypothesis tests too).
modest = settings(max_examples=50, deadline=None)

NUMPY_ERRORS = (ValueError, IndexError, TypeError)
dims = st.lists(st.sampled_from([0, 1, 1, 2, 3]), min_size=0, max_size=4).map(tuple)
seeds = st.integers(0, 2**32 - 1)


def arrays(seed, *shapes, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) if np.dtype(dtype).kind == "f"
            else rng.integers(-9, 9, s).astype(dtype) for s in shapes]


def agree(build, numpy_fn, values):
    """build(builder, *input nodes) -> node, numpy_fn(*arrays) -> array: both fail or both agree."""
    try:
        want = np.asarray(numpy_fn(*values))
    except NUMPY_ERRORS:
        want = None
    b = Builder()
    nodes = [b.input(f"x{i}", v.shape, v.dtype) for i, v in enumerate(values)]
    if want is None:
        with pytest.raises(ShapeError):
            build(b, *nodes)
        return
    out = build(b, *nodes)
    assert out.type == dnir.TensorType(want.shape, want.dtype)
    (got,) = dnir.run(b.build(out), values)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@modest
@given(dims, dims, st.sampled_from(["add", "sub", "mul", "div", "maximum", "minimum"]), seeds)
def test_binary_broadcasting(sa, sb, op, seed):
    ref = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
           "maximum": np.maximum, "minimum": np.minimum}[op]
    x, y = arrays(seed, sa, sb)
    agree(lambda b, p, q: getattr(b, op)(p, q), ref, [x, y + np.float32(np.sign(y) * 0.5)])


@modest
@given(st.sampled_from(["f16", "f32", "f64", "i32", "i64"]), st.sampled_from(["f16", "f32", "f64", "i32", "i64"]),
       dims, seeds)
def test_binary_dtypes(da, db, shape, seed):
    x, = arrays(seed, shape, dtype=dnir.types.numpy_dtype(da))
    y, = arrays(seed + 1, shape, dtype=dnir.types.numpy_dtype(db))
    b = Builder()
    p, q = b.input("p", shape, da), b.input("q", shape, db)
    if da != db:    # NumPy would promote; the IR asks for an explicit cast
        with pytest.raises(DTypeError, match=f"add.*{da}.*{db}"):
            b.add(p, q)
        return
    out = b.add(p, q)
    assert canonical_dtype(np.add(x, y).dtype) == out.dtype == da


@modest
@given(dims.filter(lambda s: len(s) <= 2), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3),
       st.integers(0, 3), st.booleans(), st.booleans(), dims.filter(lambda s: len(s) <= 2), seeds)
def test_matmul(batch_a, m, ka, kb, n, ta, tb, batch_b, seed):
    a_shape = batch_a + ((ka, m) if ta else (m, ka))
    b_shape = batch_b + ((n, kb) if tb else (kb, n))
    x, y = arrays(seed, a_shape, b_shape)

    def ref(p, q):
        return np.matmul(p.swapaxes(-1, -2) if ta else p, q.swapaxes(-1, -2) if tb else q)
    agree(lambda b, p, q: b.matmul(p, q, transpose_a=ta, transpose_b=tb), ref, [x, y])


@modest
@given(dims, st.lists(st.sampled_from([-1, 0, 1, 2, 3, 4, 6]), max_size=4), seeds)
def test_reshape(shape, target, seed):
    (x,) = arrays(seed, shape)
    if target.count(-1) > 1:
        target.remove(-1)
    agree(lambda b, p: b.reshape(p, target), lambda a: a.reshape(target), [x])


@modest
@given(dims.filter(lambda s: s), st.data())
def test_reshape_to_a_valid_target(shape, data):
    # Random targets mostly fail; also draw targets that reorder the same factors.
    target = data.draw(st.permutations(list(shape) + [1] * data.draw(st.integers(0, 2))))
    if data.draw(st.booleans()) and 0 not in shape:
        target[data.draw(st.integers(0, len(target) - 1))] = -1
    (x,) = arrays(data.draw(seeds), shape)
    agree(lambda b, p: b.reshape(p, target), lambda a: a.reshape(target), [x])


@modest
@given(dims, st.data())
def test_permute(shape, data):
    rank = len(shape)
    axes = data.draw(st.permutations(range(rank)))
    axes = [a - rank if data.draw(st.booleans()) else a for a in axes]          # negative axes
    if data.draw(st.booleans()):                                                # and broken ones
        axes = data.draw(st.lists(st.integers(-rank - 1, rank), max_size=rank + 1))
    (x,) = arrays(data.draw(seeds), shape)
    agree(lambda b, p: b.permute(p, axes), lambda a: np.transpose(a, axes), [x])


@modest
@given(dims, st.lists(st.integers(-5, 4), max_size=4), st.booleans(), seeds)
def test_sum(shape, axes, keepdims, seed):
    (x,) = arrays(seed, shape)
    agree(lambda b, p: b.sum(p, axis=axes, keepdims=keepdims),
          lambda a: np.sum(a, axis=tuple(axes), keepdims=keepdims), [x])


@modest
@given(dims, st.integers(-5, 4), seeds)
def test_cumsum(shape, axis, seed):
    (x,) = arrays(seed, shape)

    def ref(a):     # NumPy ravels a 0-d array into shape [1]; dnir refuses rank 0 instead
        if a.ndim == 0:
            raise ValueError
        return np.cumsum(a, axis=axis)
    agree(lambda b, p: b.cumsum(p, axis=axis), ref, [x])


@modest
@given(dims, st.integers(-5, 4), st.lists(st.integers(0, 3), min_size=1, max_size=3), st.booleans(), st.data())
def test_concat(shape, axis, sizes, broken, data):
    shapes = []
    for size in sizes:
        s = list(shape)
        if s and -len(s) <= axis < len(s):
            s[axis] = size
        if broken and s:     # change some other axis: NumPy must refuse too (unless it is the same size)
            s[data.draw(st.integers(0, len(s) - 1))] = data.draw(st.integers(0, 3))
        shapes.append(tuple(s))
    xs = arrays(data.draw(seeds), *shapes)
    agree(lambda b, *ps: b.concat(ps, axis=axis), lambda *a: np.concatenate(a, axis=axis), xs)


@modest
@given(dims, st.data())
def test_pad(shape, data):
    pads = [(data.draw(st.integers(-1, 2)), data.draw(st.integers(0, 2))) for _ in shape]
    value = data.draw(st.floats(-3, 3, width=32))
    (x,) = arrays(data.draw(seeds), shape)

    def ref(a):     # np.pad cannot read an empty pad list; padding a scalar by nothing is the scalar
        return np.pad(a, pads, constant_values=value) if a.ndim else a
    agree(lambda b, p: dnir.make_node("pad", (p,), {"pads": pads, "value": value}), ref, [x])


@modest
@given(dims, st.data())
def test_slice(shape, data):
    starts = [data.draw(st.integers(-1, d + 1)) for d in shape]
    stops = [data.draw(st.integers(-1, d + 1)) for d in shape]
    (x,) = arrays(data.draw(seeds), shape)
    in_bounds = all(0 <= a <= c <= d for a, c, d in zip(starts, stops, shape))

    def ref(a):     # NumPy clamps; the slice op asks for an exact region
        if not in_bounds:
            raise IndexError
        return a[tuple(slice(p, q) for p, q in zip(starts, stops))]
    agree(lambda b, p: b.slice(p, starts, stops), ref, [x])


@modest
@given(dims, st.data())
def test_getitem_matches_numpy_basic_slicing(shape, data):
    # Python slices on a node clamp exactly like NumPy's; integer indices keep their axis.
    index = tuple(slice(data.draw(st.none() | st.integers(-4, 4)), data.draw(st.none() | st.integers(-4, 4)))
                  for _ in shape[:data.draw(st.integers(0, len(shape)))])
    (x,) = arrays(data.draw(seeds), shape)
    agree(lambda b, p: p[index], lambda a: a[index], [x])


@modest
@given(dims, dims, seeds)
def test_broadcast_to(shape, target, seed):
    (x,) = arrays(seed, shape)
    agree(lambda b, p: b.broadcast_to(p, target), lambda a: np.broadcast_to(a, target), [x])


@modest
@given(dims.filter(lambda s: len(s) >= 2), st.integers(-3, 3), st.booleans(), seeds)
def test_tril_triu(shape, k, upper, seed):
    (x,) = arrays(seed, shape)
    op = np.triu if upper else np.tril
    agree(lambda b, p: (b.triu if upper else b.tril)(p, k), lambda a: op(a, k), [x])
