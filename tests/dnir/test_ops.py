"""Every op against results computed here with plain NumPy (never the backend's kernels).

Each test declares the ops it covers with @covers; the decorator checks that the
graphs the test ran really contain them, and test_every_op_is_covered checks the
declarations against the registry, so a new op without a test fails the suite.
"""
import functools

import numpy as np
import pytest

import dnir
from dnir import Builder

COVERED: set[str] = set()
_ran: set[str] = set()   # ops in the graphs the current test ran


def covers(*ops, param=None):
    """Declare the ops a test covers; with param=NAME, each case covers the op named by that argument."""
    def decorate(test):
        COVERED.update(ops)

        @functools.wraps(test)
        def wrapper(*args, **kwargs):
            _ran.clear()
            test(*args, **kwargs)
            want = {kwargs[param]} if param else set(ops)
            assert want <= _ran, f"{test.__name__} declares {sorted(want - _ran)} but never ran them"
        return wrapper
    return decorate


def run(graph, inputs=(), **kw):
    _ran.update(graph.op_histogram())
    return dnir.run(graph, inputs, **kw)


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def close(got, want, dtype=np.float32, rtol=1e-5, atol=1e-6):
    assert got.dtype == np.dtype(dtype), (got.dtype, dtype)
    assert got.shape == np.shape(want), (got.shape, np.shape(want))
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# sources


@covers("const", "full", "eye")
def test_sources():
    b = Builder()
    vals = np.array([[1.5, -2.0, np.inf], [0.25, -np.inf, 3.0]])
    outs = [b.const(vals), b.const(np.array([[3], [-7]], np.int32)), b.const(np.array([True, False, True])),
            b.const(2.5), b.full((2, 1, 3), -0.75), b.full((4,), 7, dtype="i64"), b.eye(3), b.eye(1, "f64")]
    c, ci, cb, cs, fu, fi, e3, e1 = run(b.build(outs))
    close(c, vals)
    assert ci.dtype == np.int32 and ci.tolist() == [[3], [-7]]
    assert cb.dtype == np.bool_ and cb.tolist() == [True, False, True]
    close(cs, np.float64(2.5))
    close(fu, np.full((2, 1, 3), -0.75))
    assert fi.dtype == np.int64 and fi.tolist() == [7, 7, 7, 7]
    close(e3, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    close(e1, [[1.0]], np.float64)


@covers("input")
def test_input_passes_through_and_by_position(rng):
    b = Builder()
    x, y = b.input("x", (2, 3)), b.input("y", (1,), "i32")
    g = b.build([x, y], names=["x_out", "y_out"])
    xv, yv = f32(rng, 2, 3), np.array([5], np.int32)
    for inputs in ({"y": yv, "x": xv}, [xv, yv]):
        xo, yo = run(g, inputs)
        close(xo, xv)
        assert yo.dtype == np.int32 and yo.tolist() == [5]


# ---------------------------------------------------------------------------
# elementwise

UNARY = {
    "neg": (lambda x: -x, False),
    "exp": (np.exp, False),
    "log": (np.log, True),
    "sigmoid": (lambda x: 1.0 / (1.0 + np.exp(-x)), False),
    "softplus": (lambda x: np.log(1.0 + np.exp(x)), False),
    "sqrt": (np.sqrt, True),
    "rsqrt": (lambda x: 1.0 / np.sqrt(x), True),
}


@covers(*UNARY, param="op")
@pytest.mark.parametrize("op", sorted(UNARY))
@pytest.mark.parametrize("shape", [(), (3, 1, 4), (1,)])
def test_unary(op, shape, rng):
    ref, positive = UNARY[op]
    b = Builder()
    x = b.input("x", shape)
    xv = rng.uniform(0.1, 3.0, shape) if positive else rng.uniform(-4, 4, shape)
    xv = np.asarray(xv, np.float32)
    (out,) = run(b.build(getattr(b, op)(x)), [xv])
    close(out, ref(xv.astype(np.float64)))


def test_unary_extremes_follow_ieee():
    b = Builder("f64")
    x = b.input("x", (4,))
    g = b.build([b.sigmoid(x), b.softplus(x), b.log(x), b.rsqrt(x)])
    sig, sp, lg, rs = dnir.run(g, [np.array([-800.0, 800.0, 0.0, 1e-300])])
    np.testing.assert_array_equal(sig, [0.0, 1.0, 0.5, 0.5])
    np.testing.assert_allclose(sp, [0.0, 800.0, np.log(2.0), np.log(2.0)])   # no overflow to inf
    assert lg[2] == -np.inf and rs[2] == np.inf


@covers("neg", "add", "sub", "mul", "maximum", "minimum")
def test_integer_arithmetic():
    b = Builder()
    x, y = b.input("x", (2, 3), "i32"), b.input("y", (3,), "i32")
    g = b.build([-x, x + y, x - y, x * y, b.maximum(x, y), b.minimum(x, 2), 10 - x])
    xv = np.array([[1, -2, 3], [7, 0, -5]], np.int32)
    yv = np.array([4, -4, 2], np.int32)
    outs = run(g, [xv, yv])
    want = [-xv, xv + yv, xv - yv, xv * yv, np.maximum(xv, yv), np.minimum(xv, 2), 10 - xv]
    for got, exp in zip(outs, want):
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, exp)


BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
          "maximum": np.maximum, "minimum": np.minimum}


@covers(*BINARY, param="op")
@pytest.mark.parametrize("op", sorted(BINARY))
@pytest.mark.parametrize("sa, sb", [((2, 1, 4), (3, 1)), ((5,), ()), ((1, 1), (2, 3, 1)), ((3, 4), (3, 4))])
def test_binary_broadcasts(op, sa, sb, rng):
    b = Builder()
    x, y = b.input("x", sa), b.input("y", sb)
    # y away from 0 so that div is well conditioned
    yv = (rng.uniform(0.5, 2.0, sb) * rng.choice([-1, 1], sb)).astype(np.float32)
    (out,) = run(b.build(getattr(b, op)(x, y)), [xv := f32(rng, *sa), yv])
    close(out, BINARY[op](xv.astype(np.float64), yv))


@covers("add", "sub", "mul", "div", "matmul", "neg", "const")
def test_operator_sugar_with_python_scalars(rng):
    b = Builder()
    x, w = b.input("x", (2, 3)), b.input("w", (3, 2))
    g = b.build([2.0 * x + 1, 1 - x, x / 4, 3 / (x * x + 1), x @ w, -x])
    xv, wv = f32(rng, 2, 3), f32(rng, 3, 2)
    x64 = xv.astype(np.float64)
    want = [2 * x64 + 1, 1 - x64, x64 / 4, 3 / (x64 * x64 + 1), x64 @ wv, -x64]
    for got, exp in zip(run(g, [xv, wv]), want):
        close(got, exp)


@covers("where")
def test_where_broadcasts_all_three(rng):
    b = Builder()
    c, x, y = b.input("c", (3, 1), "bool"), b.input("x", (1, 4)), b.input("y", (2, 3, 4))
    g = b.build([b.where(c, x, y), b.where(c, x, 0.5)])
    cv, xv, yv = np.array([[True], [False], [True]]), f32(rng, 1, 4), f32(rng, 2, 3, 4)
    w1, w2 = run(g, [cv, xv, yv])
    close(w1, np.where(cv, xv, yv))
    close(w2, np.where(cv, xv, np.float32(0.5)))
    assert w2.shape == (3, 4)


@covers("clamp")
def test_clamp(rng):
    b = Builder()
    x, i = b.input("x", (3, 5)), b.input("i", (4,), "i64")
    g = b.build([b.clamp(x, -0.5, 0.5), b.clamp(x, min=0.0), b.clamp(x, max=-1.0), b.clamp(i, -2, 3)])
    xv, iv = f32(rng, 3, 5), np.array([-9, -1, 2, 8])
    both, lo, hi, ints = run(g, [xv, iv])
    close(both, np.minimum(np.maximum(xv, -0.5), 0.5))
    close(lo, np.maximum(xv, 0.0))
    close(hi, np.minimum(xv, -1.0))
    assert ints.dtype == np.int64 and ints.tolist() == [-2, -1, 2, 3]


@covers("cast")
def test_cast(rng):
    b = Builder()
    x, i, c = b.input("x", (2, 3)), b.input("i", (3,), "i32"), b.input("c", (2,), "bool")
    g = b.build([b.cast(x, "i32"), b.cast(x, "f64"), b.cast(x, "f16"), b.cast(i, "f32"), b.cast(c, np.float32)])
    xv = np.array([[1.7, -1.7, 0.2], [-0.9, 3.0, 100.5]], np.float32)
    to_i, to_d, to_h, from_i, from_b = run(g, [xv, np.array([3, -4, 0], np.int32), np.array([True, False])])
    assert to_i.dtype == np.int32 and to_i.tolist() == [[1, -1, 0], [0, 3, 100]]   # truncation toward 0
    close(to_d, xv.astype(np.float64), np.float64, rtol=0, atol=0)
    close(to_h, xv.astype(np.float16), np.float16, rtol=0, atol=0)
    close(from_i, [3.0, -4.0, 0.0])
    close(from_b, [1.0, 0.0])


@covers("tril", "triu")
@pytest.mark.parametrize("k", [-1, 0, 2])
def test_tril_triu_batched_non_square(k, rng):
    b = Builder()
    x = b.input("x", (2, 1, 4, 5))
    g = b.build([b.tril(x, k), b.triu(x, k)])
    xv = f32(rng, 2, 1, 4, 5)
    lo, up = run(g, [xv])
    rows, cols = np.arange(4)[:, None], np.arange(5)[None, :]
    close(lo, np.where(cols - rows <= k, xv, 0))
    close(up, np.where(cols - rows >= k, xv, 0))


# ---------------------------------------------------------------------------
# layout


@covers("reshape", "permute", "broadcast_to", "cont")
def test_reshape_permute_broadcast_cont(rng):
    b = Builder()
    x = b.input("x", (2, 3, 4))
    g = b.build([b.reshape(x, (4, -1)), b.reshape(x, (1, 24, 1)), b.permute(x, (2, -3, 1)),
                 b.transpose(x), b.broadcast_to(b.reshape(x, (2, 1, 3, 1, 4)), (5, 2, 6, 3, 2, 4)),
                 b.cont(b.permute(x, (1, 0, 2)))])
    xv = f32(rng, 2, 3, 4)
    r1, r2, p, t, bc, c = run(g, [xv])
    close(r1, xv.ravel().reshape(4, 6))
    close(r2, xv.ravel()[None, :, None])
    close(p, np.einsum("abc->cab", xv))
    close(t, np.einsum("abc->acb", xv))
    want = np.empty((5, 2, 6, 3, 2, 4))
    want[...] = xv[:, None, :, None, :]
    close(bc, want)
    close(c, np.einsum("abc->bac", xv))
    assert c.flags.c_contiguous


@covers("pad")
def test_pad(rng):
    b = Builder()
    x = b.input("x", (2, 1, 3))
    g = b.build([b.pad(x, [(1, 2), (0, 1), (3, 0)], value=-1.5), b.pad(x, [(0, 2)])])
    xv = f32(rng, 2, 1, 3)
    p1, p2 = run(g, [xv])
    want = np.full((5, 2, 6), -1.5)
    want[1:3, 0:1, 3:6] = xv
    close(p1, want)
    want = np.zeros((4, 1, 3))
    want[:2] = xv
    close(p2, want)


@covers("slice")
def test_slice(rng):
    b = Builder()
    x = b.input("x", (4, 5, 6))
    g = b.build([b.slice(x, (1, 0, 2), (3, 5, 2)), x[1:3, -2:], x[0], x[-1, ::1, 4:100], x[:, 2],
                 b.slice_axis(x, -1, 1, 4)])
    xv = f32(rng, 4, 5, 6)
    s1, s2, s3, s4, s5, s6 = run(g, [xv])
    close(s1, np.empty((2, 5, 0)))
    close(s2, xv[1:3, 3:5, :])
    close(s3, xv[0:1])           # an integer index keeps its axis
    close(s4, xv[3:4, :, 4:6])
    close(s5, xv[:, 2:3, :])
    close(s6, xv[:, :, 1:4])


@covers("concat")
def test_concat(rng):
    b = Builder()
    x, y, z = b.input("x", (2, 1, 3)), b.input("y", (2, 4, 3)), b.input("z", (2, 1, 3))
    g = b.build([b.concat([x, y, z], axis=-2), b.concat([x, z], axis=0), b.concat([y], axis=2)])
    xv, yv, zv = f32(rng, 2, 1, 3), f32(rng, 2, 4, 3), f32(rng, 2, 1, 3)
    c1, c2, c3 = run(g, [xv, yv, zv])
    want = np.empty((2, 6, 3))
    want[:, 0:1], want[:, 1:5], want[:, 5:6] = xv, yv, zv
    close(c1, want)
    close(c2, np.stack([xv[0], xv[1], zv[0], zv[1]]))
    close(c3, yv)


# ---------------------------------------------------------------------------
# reductions


@covers("sum")
def test_sum(rng):
    b = Builder()
    x, i = b.input("x", (2, 3, 1, 4)), b.input("i", (2, 3), "i32")
    g = b.build([b.sum(x), b.sum(x, axis=-1), b.sum(x, axis=(0, -2), keepdims=True), b.sum(x, axis=2),
                 b.sum(i, axis=0), b.sum(x, axis=())])
    xv, iv = f32(rng, 2, 3, 1, 4), rng.integers(-50, 50, (2, 3)).astype(np.int32)
    s_all, s_last, s_keep, s_one, s_int, s_none = run(g, [xv, iv])
    x64 = xv.astype(np.float64)
    total = sum(x64[a, c, 0, d] for a in range(2) for c in range(3) for d in range(4))
    close(s_all, np.float64(total), rtol=1e-5, atol=1e-5)
    close(s_last, x64[..., 0] + x64[..., 1] + x64[..., 2] + x64[..., 3])
    close(s_keep, (x64[0] + x64[1])[None])
    close(s_one, x64[:, :, 0, :])
    assert s_int.dtype == np.int32 and s_int.tolist() == (iv[0] + iv[1]).tolist()
    close(s_none, x64)


@covers("cumsum")
def test_cumsum(rng):
    b = Builder()
    x, i = b.input("x", (3, 4, 1)), b.input("i", (5,), "i64")
    g = b.build([b.cumsum(x, axis=1), b.cumsum(x, axis=-3), b.cumsum(x, axis=-1), b.cumsum(i, axis=0)])
    xv, iv = f32(rng, 3, 4, 1), np.array([3, -1, 4, -1, 5])
    c1, c0, c_one, ci = run(g, [xv, iv])
    x64 = xv.astype(np.float64)
    want = x64.copy()
    for t in range(1, 4):
        want[:, t] = want[:, t - 1] + x64[:, t]
    close(c1, want)
    close(c0, np.stack([x64[0], x64[0] + x64[1], x64[0] + x64[1] + x64[2]]))
    close(c_one, x64)
    assert ci.tolist() == [3, 2, 6, 5, 10]


# ---------------------------------------------------------------------------
# matrices



@covers("matmul")
@pytest.mark.parametrize("ta, tb", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_transposes_and_batch_broadcasting(ta, tb, rng):
    a_shape = (2, 1, 4, 3) if ta else (2, 1, 3, 4)
    b_shape = (5, 2, 4) if tb else (5, 4, 2)
    b = Builder()
    x, y = b.input("a", a_shape), b.input("b", b_shape)
    av, bv = f32(rng, *a_shape), f32(rng, *b_shape)
    (out,) = run(b.build(b.matmul(x, y, transpose_a=ta, transpose_b=tb)), [av, bv])
    a2 = av.swapaxes(-1, -2) if ta else av       # [2, 1, 3, 4]
    b2 = bv.swapaxes(-1, -2) if tb else bv       # [5, 4, 2]
    want = np.zeros((2, 5, 3, 2))
    for i in range(2):
        for j in range(5):
            for m in range(3):
                for n in range(2):
                    want[i, j, m, n] = sum(float(a2[i, 0, m, k]) * float(b2[j, k, n]) for k in range(4))
    close(out, want)


@covers("matmul")
def test_matmul_integers_and_size_one_dims():
    b = Builder()
    x, y = b.input("x", (1, 2, 1), "i64"), b.input("y", (3, 1, 2), "i64")
    (out,) = run(b.build(b.matmul(x, y)), [np.array([[[2], [-3]]]), np.array([[[1, 4]], [[0, 5]], [[-1, 1]]])])
    assert out.dtype == np.int64
    assert out.tolist() == [[[2, 8], [-3, -12]], [[0, 10], [0, -15]], [[-2, 2], [3, -3]]]


def _triangular(rng, shape, lower, unit):
    """A random matrix whose used triangle is well conditioned, and the matrix the solve really uses."""
    a = rng.uniform(-0.5, 0.5, shape)
    n = shape[-1]
    diag = rng.uniform(1.0, 2.0, shape[:-1]) * rng.choice([-1, 1], shape[:-1])
    a[..., np.arange(n), np.arange(n)] = diag
    used = np.tril(a) if lower else np.triu(a)
    if unit:   # the diagonal is not read: 1 is used whatever A holds there
        used[..., np.arange(n), np.arange(n)] = 1.0
    return a, used


@covers("solve_tri")
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("unit", [False, True])
def test_solve_tri_batched_broadcasting(lower, unit, rng):
    b = Builder("f64")
    a, rhs = b.input("a", (2, 1, 5, 5)), b.input("b", (3, 5, 2))
    av, used = _triangular(rng, (2, 1, 5, 5), lower, unit)
    bv = rng.standard_normal((3, 5, 2))
    (x,) = run(b.build(b.solve_tri(a, rhs, lower=lower, unit_diagonal=unit)), [av, bv])
    assert x.shape == (2, 3, 5, 2) and x.dtype == np.float64
    np.testing.assert_allclose(used @ x, np.broadcast_to(bv, x.shape), atol=1e-12)    # multiplied back
    np.testing.assert_allclose(x, np.linalg.solve(np.broadcast_to(used, (2, 3, 5, 5)), np.broadcast_to(bv, x.shape)),
                               rtol=1e-10, atol=1e-12)


@covers("solve_tri")
def test_solve_tri_float32_and_identity(rng):
    b = Builder()
    a, rhs = b.input("a", (4, 4)), b.input("b", (4, 3))
    av, used = _triangular(rng, (4, 4), True, False)
    bv = f32(rng, 4, 3)
    x, ident = run(b.build([b.solve_tri(a, rhs), b.solve_tri(b.eye(4), rhs, lower=False)]), [av, bv])
    close(x, np.linalg.solve(np.tril(av.astype(np.float32)).astype(np.float64), bv), rtol=1e-4, atol=1e-5)
    close(ident, bv)


@covers("set", "acc")
def test_set_acc_4d_regions(rng):
    b = Builder()
    dst, s1, s2 = b.input("dst", (3, 4, 5, 6)), b.input("s1", (2, 2, 3, 6)), b.input("s2", (1, 3, 1, 2))
    g = b.build([b.set(dst, s1, (1, 2, 0, 0)), b.acc(dst, s1, (0, 1, 2, 0)), b.set(dst, s2, (2, 0, 4, 4)),
                 b.acc(b.acc(dst, s2, (0, 1, 1, 1)), s2, (0, 1, 1, 1)), b.set(dst, dst, (0, 0, 0, 0))])
    dv, v1, v2 = f32(rng, 3, 4, 5, 6), f32(rng, 2, 2, 3, 6), f32(rng, 1, 3, 1, 2)
    set1, acc1, set2, acc2, whole = run(g, [dv, v1, v2])
    d64 = dv.astype(np.float64)
    want = d64.copy()
    want[1:3, 2:4, 0:3, 0:6] = v1
    close(set1, want)
    want = d64.copy()
    want[0:2, 1:3, 2:5, 0:6] += v1
    close(acc1, want)
    want = d64.copy()
    want[2:3, 0:3, 4:5, 4:6] = v2
    close(set2, want)
    want = d64.copy()
    want[0:1, 1:4, 1:2, 1:3] += 2 * v2.astype(np.float64)
    close(acc2, want)
    close(whole, d64)


# ---------------------------------------------------------------------------
# scan


def _delta_body():
    """One step of a decayed outer-product recurrence: two carries, three sequence slices, two
    loop invariants; it returns the new carries and two per-step outputs."""
    b = Builder()
    s, n = b.input("s", (4, 3)), b.input("n", ())
    k, v, beta = b.input("k", (4,)), b.input("v", (3,)), b.input("beta", ())
    w, decay = b.input("w", (3,)), b.input("decay", ())
    s2 = s * decay + b.matmul(b.reshape(k, (4, 1)), b.reshape(v * beta, (1, 3)))
    y1 = b.reshape(b.matmul(b.reshape(k, (1, 4)), s2), (3,))
    y2 = b.sum(s2 * w)
    return b.build([s2, n + 1.0, y1, y2])


@covers("scan", "item")
def test_scan_carries_sequences_invariants_outputs(rng):
    T = 5
    b = Builder()
    s0, n0 = b.input("s0", (4, 3)), b.input("n0", ())
    ks, vs, betas = b.input("ks", (T, 4)), b.input("vs", (T, 3)), b.input("betas", (T,))
    w, decay = b.input("w", (3,)), b.input("decay", ())
    s_fin, n_fin, y1, y2 = b.scan(_delta_body(), [s0, n0], [ks, vs, betas], [w, decay])
    assert [t.shape for t in (s_fin, n_fin, y1, y2)] == [(4, 3), (), (T, 3), (T,)]
    g = b.build([s_fin, n_fin, y1, y2], names=["s", "n", "y1", "y2"])
    vals = [f32(rng, 4, 3), np.float32(rng.standard_normal()), f32(rng, T, 4), f32(rng, T, 3),
            rng.uniform(0, 1, T).astype(np.float32), f32(rng, 3), np.float32(rng.uniform(0.5, 1))]
    got = run(g, vals)
    s, n, kv, vv, bv, wv, dv = (np.asarray(v, np.float64) for v in vals)
    y1_want, y2_want = np.zeros((T, 3)), np.zeros(T)
    for t in range(T):
        s = s * dv + np.outer(kv[t], vv[t] * bv[t])
        n = n + 1
        y1_want[t] = kv[t] @ s
        y2_want[t] = (s * wv).sum()
    for out, want in zip(got, [s, n, y1_want, y2_want]):
        close(out, want, rtol=1e-5, atol=1e-5)


@covers("scan", "item")
def test_scan_without_sequences_and_of_length_zero(rng):
    bb = Builder()
    h, c = bb.input("h", (2,)), bb.input("c", (2,))
    body = bb.build([h * 0.5 + c, h])
    b = Builder()
    h0, c = b.input("h0", (2,)), b.input("c", (2,))
    g = b.build(b.scan(body, [h0], [], [c], length=4) + b.scan(body, [h0], [], [c], length=0))
    hv, cv = f32(rng, 2), f32(rng, 2)
    h4, hs, h_empty, hs_empty = run(g, [hv, cv])
    want, hist = hv.astype(np.float64), []
    for _ in range(4):
        hist.append(want)
        want = want * 0.5 + cv
    close(h4, want)
    close(hs, np.stack(hist))
    close(h_empty, hv)
    close(hs_empty, np.zeros((0, 2)))


def _nested_scan_graph(T, U):
    inner = Builder()
    h, x, a = inner.input("h", (3,)), inner.input("x", (3,)), inner.input("a", ())
    h2 = h * a + x
    inner_body = inner.build([h2, h2 * 2.0])
    outer = Builder()
    h, xs, a = outer.input("h", (3,)), outer.input("xs", (U, 3)), outer.input("a", ())
    h_fin, ys = outer.scan(inner_body, [h], [xs], [a])
    outer_body = outer.build([h_fin, ys, outer.sum(ys)])
    b = Builder()
    h0, xss, a = b.input("h0", (3,)), b.input("xss", (T, U, 3)), b.input("a", ())
    return b.build(b.scan(outer_body, [h0], [xss], [a]), names=["h", "ys", "totals"])


@covers("scan", "item")
def test_nested_scan(rng):
    T, U = 3, 4
    g = _nested_scan_graph(T, U)
    assert g.op_histogram()["scan"] == 2
    hv, xv, av = f32(rng, 3), f32(rng, T, U, 3), np.float32(0.7)
    h_fin, ys, totals = run(g, [hv, xv, av])
    h = hv.astype(np.float64)
    ys_want, totals_want = np.zeros((T, U, 3)), np.zeros(T)
    for t in range(T):
        for u in range(U):
            h = h * float(av) + xv[t, u]
            ys_want[t, u] = 2 * h
        totals_want[t] = ys_want[t].sum()
    close(h_fin, h)
    close(ys, ys_want)
    close(totals, totals_want, atol=1e-5)


# ---------------------------------------------------------------------------
# fused delta-rule ops (dnir/fused.py; tests/lowering/test_fused_reference.py checks them against
# their expansions and the float64 oracle on whole layers)


@covers("chunk_scan", "item")
def test_chunk_scan(rng):
    n, H, C, K, V = 3, 2, 4, 5, 3
    ops = [f32(rng, H, K, V), f32(rng, n, H, C, K), f32(rng, n, H, C, V), f32(rng, n, H, C, K),
           f32(rng, n, H, C, C), f32(rng, n, H, C, K), rng.uniform(0.1, 1, (n, H, K, 1)).astype(np.float32)]
    b = Builder()
    final, o = dnir.fused.chunk_scan(*[b.input(f"x{i}", a.shape) for i, a in enumerate(ops)])
    got_final, got_o = run(b.build([final, o]), ops)
    S0, W, U, Qd, A, Kte, LD = (a.astype(np.float64) for a in ops)
    S, want_o = S0.copy(), np.zeros((n, H, C, V))
    for t in range(n):
        for h in range(H):
            v_new = U[t, h] - W[t, h] @ S[h]
            want_o[t, h] = Qd[t, h] @ S[h] + A[t, h] @ v_new
            S[h] = S[h] * LD[t, h] + Kte[t, h].T @ v_new
    close(got_final, S, rtol=1e-4, atol=1e-5)
    close(got_o, want_o, rtol=1e-4, atol=1e-5)


@covers("chunk_states", "chunk_output", "item")
def test_chunk_states_and_output(rng):
    """The loop over chunks split in two: its sequential part, then every chunk's output at once."""
    n, H, C, K, V = 3, 2, 4, 5, 3
    ops = [f32(rng, H, K, V), f32(rng, n, H, C, K), f32(rng, n, H, C, V), f32(rng, n, H, C, K),
           rng.uniform(0.1, 1, (n, H, K, 1)).astype(np.float32), f32(rng, n, H, C, K), f32(rng, n, H, C, C)]
    b = Builder()
    s0, w, u, kte, ld, qd, aqk = (b.input(f"x{i}", a.shape) for i, a in enumerate(ops))
    final, starts, v_new = dnir.fused.chunk_states(s0, w, u, kte, ld)
    o = dnir.fused.chunk_output(qd, starts, aqk, v_new)
    token_major = dnir.fused.chunk_output(*(b.reshape(x, (x.shape[0], 1) + x.shape[1:]) for x in (qd, starts, aqk, v_new)),
                                          token_major=True)
    got = run(b.build([final, starts, v_new, o, token_major]), ops)
    S0, W, U, Kte, LD, Qd, A = (a.astype(np.float64) for a in ops)
    S, want = S0.copy(), [np.zeros((n, H, K, V)), np.zeros((n, H, C, V)), np.zeros((n, H, C, V))]
    for t in range(n):
        for h in range(H):
            want[0][t, h] = S[h]
            want[1][t, h] = v_new = U[t, h] - W[t, h] @ S[h]
            want[2][t, h] = Qd[t, h] @ S[h] + A[t, h] @ v_new
            S[h] = S[h] * LD[t, h] + Kte[t, h].T @ v_new
    want.append(want[2][:, None].transpose(1, 0, 3, 2, 4).reshape(1, n * C, H, V))     # [R=1, n C, HV, V]
    for g, w_ in zip(got, [S] + want):
        close(g, w_, rtol=1e-4, atol=1e-5)


@covers("intra_chunk", "item")
@pytest.mark.parametrize("Kg", [1, 3])          # a gate per head (GDA) or per key channel (KDA)
def test_intra_chunk(rng, Kg):
    R, NC, C, HV, K, V = 1, 2, 4, 2, 3, 4
    q, k = f32(rng, R, NC * C, HV, K), f32(rng, R, NC * C, HV, K)
    v, beta = f32(rng, R, NC * C, HV, V), rng.uniform(0.1, 1, (R, NC * C, HV, 1)).astype(np.float32)
    g = -rng.uniform(0.01, 2, (R, NC * C, HV, Kg)).astype(np.float32)
    b = Builder()
    res = dnir.fused.intra_chunk(*(b.input(n, a.shape) for n, a in zip("qkvgb", (q, k, v, g, beta))), chunk_size=C)
    got = run(b.build(list(res)), [q, k, v, g, beta])
    want = [np.zeros(x.shape) for x in got]
    for n, r, h in np.ndindex(NC, R, HV):
        rows = slice(n * C, (n + 1) * C)
        Q, Kc, Vc, G, B = (x[r, rows, h].astype(np.float64) for x in (q, k, v, g, beta))
        gam = np.cumsum(G, axis=0) * np.ones((1, K))                 # [C, K] from the chunk start
        A_kk, A_qk = np.zeros((C, C)), np.zeros((C, C))
        for i, j in np.ndindex(C, C):
            decay = np.exp(gam[i] - gam[j])
            A_kk[i, j] = B[i, 0] * np.sum(Kc[i] * Kc[j] * decay) if j < i else 0.0
            A_qk[i, j] = np.sum(Q[i] * Kc[j] * decay) if j <= i else 0.0
        solve = np.linalg.inv(np.eye(C) + A_kk)
        outs = (solve @ (B * Kc * np.exp(gam)), solve @ (B * Vc), Q * np.exp(gam), A_qk,
                Kc * np.exp(gam[-1] - gam), np.exp(gam[-1, :Kg])[:, None])
        for w_, o in zip(want, outs):
            w_[n, r, h] = o
    for got_x, want_x in zip(got, want):
        close(got_x, want_x, rtol=1e-4, atol=1e-5)


@covers("token_step", "item")
def test_token_step(rng):
    H, K, V = 3, 4, 5
    ops = [f32(rng, H, K, V), rng.uniform(0.1, 1, (H, 1, 1)).astype(np.float32), f32(rng, H, K, 1),
           f32(rng, H, 1, K), f32(rng, H, K), f32(rng, H, V), f32(rng, H, 1), f32(rng, H)]
    b = Builder()
    new_state, o = dnir.fused.token_step(*[b.input(f"x{i}", a.shape) for i, a in enumerate(ops)])
    got_state, got_o = run(b.build([new_state, o]), ops)
    S, a, kc, kr, qr, v, beta, qk = (x.astype(np.float64) for x in ops)
    want_state, want_o = np.zeros((H, K, V)), np.zeros((H, V))
    for h in range(H):
        u = (v[h] - kr[h, 0] @ S[h]) * beta[h, 0]
        want_o[h] = qr[h] @ S[h] + u * qk[h]
        want_state[h] = S[h] * a[h, 0, 0] + np.outer(kc[h, :, 0], u)
    close(got_state, want_state, rtol=1e-5, atol=1e-6)
    close(got_o, want_o, rtol=1e-5, atol=1e-6)


@covers("decode_step")
def test_decode_step(rng):
    """token_step on raw q, k (2 sequences, 2 q/k heads read by 6 value heads), a gate per key channel."""
    N, H, HV, K, V = 2, 2, 6, 4, 5
    S, q, k, v = f32(rng, N, HV, K, V), f32(rng, N, H, K), f32(rng, N, H, K), f32(rng, N, HV, V)
    g, beta = -rng.uniform(0, 3, (N, HV, K)).astype(np.float32), rng.uniform(0, 1, (N, HV)).astype(np.float32)
    b = Builder()
    new_state, o = dnir.fused.decode_step(*[b.input(f"x{i}", a.shape) for i, a in enumerate((S, q, k, v, g, beta))],
                                          scale=0.7)
    got_state, got_o = run(b.build([new_state, o]), [S, q, k, v, g, beta])
    want_state, want_o = np.zeros((N, HV, K, V)), np.zeros((N, HV, V))
    for n in range(N):
        for j in range(HV):
            s, a = S[n, j].astype(np.float64), np.exp(g[n, j].astype(np.float64))
            qj, kj = 0.7 * q[n, j // 3].astype(np.float64), k[n, j // 3].astype(np.float64)
            u = (v[n, j] - (kj * a) @ s) * beta[n, j]
            want_o[n, j] = (qj * a) @ s + u * (qj @ kj)
            want_state[n, j] = s * a[:, None] + np.outer(kj, u)
    close(got_state, want_state, rtol=1e-5, atol=1e-6)
    close(got_o, want_o, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# precision


@covers("add", "sub", "cumsum", "scan")
def test_float64_mode_is_float64_and_more_accurate(rng):
    b = Builder()
    x, i = b.input("x", (2000,)), b.input("i", (3,), "i32")
    lost = (x + 1e4) - 1e4                 # in float32 this drops ~1e-3 of every value
    bb = Builder()
    acc, xt = bb.input("acc", ()), bb.input("xt", ())
    body = bb.build([acc + xt])
    (total,) = b.scan(body, [b.full((), 0.0)], [x])
    g = b.build([lost, b.cumsum(x, axis=0), total, i + 1])
    xv = rng.uniform(0, 1, 2000).astype(np.float32)
    iv = np.array([1, 2, 3], np.int32)
    x64 = xv.astype(np.float64)
    want = [x64, np.cumsum(x64), x64.sum()]
    low = run(g, [xv, iv])
    high = run(g, [xv, iv], float64=True)
    for lo, hi, exp in zip(low, high, want):
        assert lo.dtype == np.float32 and hi.dtype == np.float64
        err_lo, err_hi = np.max(np.abs(lo - exp)), np.max(np.abs(hi - exp))
        assert err_hi < 1e-9 and err_lo > 1e3 * err_hi, (err_lo, err_hi)
    assert high[3].dtype == np.int32 and high[3].tolist() == [2, 3, 4]      # integers stay integers


@pytest.mark.parametrize("dtype, rtol", [("f16", 5e-3), ("bf16", 4e-2)])
def test_half_precision(dtype, rtol, rng):
    np_dtype = dnir.types.numpy_dtype(dtype) if dtype == "f16" else pytest.importorskip("ml_dtypes").bfloat16
    b = Builder(dtype)
    x, y, a = b.input("x", (3, 4)), b.input("y", (4, 2)), b.input("a", (3, 3))
    outs = [b.exp(x), b.sigmoid(x), b.matmul(x, y), b.sum(x, axis=-1), b.cumsum(x, axis=1),
            b.solve_tri(a, b.matmul(x, y)), b.acc(x, y[0:2, :], (1, 2))]
    av, _ = _triangular(rng, (3, 3), True, False)
    vals = [rng.uniform(-1, 1, (3, 4)).astype(np_dtype), rng.uniform(-1, 1, (4, 2)).astype(np_dtype),
            av.astype(np_dtype)]
    got = run(b.build(outs), vals)
    xv, yv, av = (v.astype(np.float64) for v in vals)
    acc = xv.copy()
    acc[1:3, 2:4] += yv[0:2]
    want = [np.exp(xv), 1 / (1 + np.exp(-xv)), xv @ yv, xv.sum(-1), np.cumsum(xv, 1),
            np.linalg.solve(np.tril(av), xv @ yv), acc]
    for out, exp in zip(got, want):
        assert out.dtype == np.dtype(np_dtype)
        scale = np.max(np.abs(exp))
        np.testing.assert_allclose(out.astype(np.float64), exp, rtol=rtol, atol=rtol * scale)
    highs = run(b.build(outs), vals, float64=True)
    assert all(h.dtype == np.float64 for h in highs)


def test_every_op_is_covered():
    assert set(dnir.REGISTRY) - COVERED == set(), "ops without a test here"
    assert COVERED <= set(dnir.REGISTRY), "tests declare ops that do not exist"
