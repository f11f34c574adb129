"""A scan lowers to one loop in TVM (translate.Translator._loop_function): the module is the
same size whatever the number of steps, and the loop runs every step in order on llvm and
on Vulkan, against the NumPy backend."""
import numpy as np
import pytest
from backends import merge_graphs, needs_vulkan
from cases import nmse
from tvm import relax

import dnir
from dnir.lowering import run
from dnir.lowering.tvm.translate import LOOP_LEAF, translate

INNER = 10   # steps of the nested scan: a loop of one block and two steps of main's


def _inner_body():
    """u' = 0.5 u + x w; stacks sigmoid(u')."""
    b = dnir.Builder()
    u, x, w = b.input("u", (4,)), b.input("x", (4,)), b.input("w", (4,))
    new = b.add(b.mul(u, 0.5), b.mul(x, w))
    return b.build([new, b.sigmoid(new)])


def _outer_body():
    """Three carries (a matrix, a vector updated by a nested scan, one passed through unchanged),
    two sequences, two loop invariants; stacks a row sum and the nested scan's stacked output."""
    b = dnir.Builder()
    s, c, keep = b.input("s", (4, 4)), b.input("c", (4,)), b.input("keep", (2,))
    x, seq = b.input("x", (4,)), b.input("seq", (INNER, 4))
    w, m = b.input("w", (4,)), b.input("m", (4, 4))
    c_new, inner_ys = b.scan(_inner_body(), [c], [seq], [w])
    s_new = b.add(b.mul(s, 0.9), b.mul(b.reshape(x, (4, 1)), b.reshape(c_new, (1, 4))))
    s_new = b.add(s_new, b.mul(m, 0.01))
    return b.build([s_new, c_new, keep, b.sum(s_new, axis=0), inner_ys])


def scan_graph(length: int):
    b = dnir.Builder()
    s0, c0, keep = b.input("s0", (4, 4)), b.input("c0", (4,)), b.input("keep", (2,))
    xs, seqs = b.input("xs", (length, 4)), b.input("seqs", (length, INNER, 4))
    w, m = b.input("w", (4,)), b.input("m", (4, 4))
    s, c, k, rows, inner = b.scan(_outer_body(), [s0, c0, keep], [xs, seqs], [w, m], length=length)
    return b.build([s, c, k, rows, inner], names=["s", "c", "keep", "rows", "inner"])


def _inputs(graph, rng):
    return {n.attrs["name"]: rng.standard_normal(n.shape).astype(np.float32) for n in graph.inputs}


def _values(expr) -> list:
    """The bound values of a Relax function body, those inside If branches included."""
    if isinstance(expr, relax.Function):
        return _values(expr.body)
    if isinstance(expr, relax.SeqExpr):
        return [v for block in expr.blocks for b in block.bindings for v in [b.value] + _values(b.value)]
    if isinstance(expr, relax.If):
        return _values(expr.true_branch) + _values(expr.false_branch)
    return []


def _sizes(mod) -> dict:
    return {gv.name_hint: len(_values(f)) for gv, f in mod.functions.items() if isinstance(f, relax.Function)}


def _callees(func) -> list[str]:
    return [v.op.name_hint for v in _values(func) if isinstance(v, relax.Call) and isinstance(v.op, relax.GlobalVar)]


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("rest", [0, 1, LOOP_LEAF - 1])
def test_module_size_does_not_depend_on_the_number_of_steps(gpu, rest):
    short, long = (translate(scan_graph(n), gpu=gpu) for n in (2 * LOOP_LEAF + rest, 1250 * LOOP_LEAF + rest))
    assert _sizes(short) == _sizes(long)
    assert set(_sizes(short)) == {"main"} | {f"scan{i}_{f}" for i in (0, 1) for f in ("loop", "block", "step")}
    assert len(short.functions) == len(long.functions)
    # The outer loop once (the nested scan is scan0), then the steps that do not fill a block.
    assert _callees(long["main"]) == ["scan1_loop"] + ["scan1_step"] * rest


def test_loop_halves_its_range():
    """Two calls of itself (the halves) or one block, whose steps are straight-line code."""
    mod = translate(scan_graph(5000))
    assert sorted(_callees(mod["scan1_loop"])) == ["scan1_block", "scan1_loop", "scan1_loop"]
    assert _callees(mod["scan1_block"]) == ["scan1_step"] * LOOP_LEAF
    assert _callees(mod["scan1_step"]) == ["scan0_loop", "scan0_step", "scan0_step"]     # the nested scan


LENGTHS = (0, 1, 8, 13, 27)   # no block, one, one and steps of main's, three blocks (uneven halves)


def _merged():
    return merge_graphs({f"n{n}": scan_graph(n) for n in LENGTHS})


def _check(target, rng):
    graph = _merged()
    inputs = _inputs(graph, rng)
    outs, refs = run(graph, inputs, target=target), run(graph, inputs)
    for name, out, ref in zip(graph.output_names, outs, refs):
        assert out.shape == ref.shape, name
        if ref.size:
            assert np.isfinite(out).all(), name
            assert nmse(out, ref) < 1e-10, (name, nmse(out, ref))
    # Each step's result differs: a loop that skipped or repeated a step would be caught.
    rows = dict(zip(graph.output_names, outs))["n27__rows"]
    assert len({tuple(r) for r in rows}) == 27


def test_loop_runs_every_step_on_llvm(rng):
    _check("llvm", rng)


@needs_vulkan
def test_loop_runs_every_step_on_vulkan(rng):
    _check("vulkan", rng)


def _rotate_graph(length: int):
    """Three carries that rotate unchanged each step; stacks the difference of two."""
    body = dnir.Builder()
    a, b, c = body.input("a", (4,)), body.input("b", (4,)), body.input("c", (4,))
    step = body.build([b, c, a, body.sub(a, b)])
    g = dnir.Builder()
    a0, b0, c0 = g.input("a0", (4,)), g.input("b0", (4,)), g.input("c0", (4,))
    a1, b1, c1, diffs = g.scan(step, [a0, b0, c0], length=length)
    return g.build([a1, b1, c1, diffs], names=["a", "b", "c", "diffs"])


def test_carries_that_rotate_on_llvm(rng):
    graph = merge_graphs({f"n{n}": _rotate_graph(n) for n in (24, 25, 26)})    # every position of the rotation
    inputs = _inputs(graph, rng)
    for name, out, ref in zip(graph.output_names, run(graph, inputs, target="llvm"), run(graph, inputs)):
        assert np.array_equal(out, ref), name


@needs_vulkan
def test_vulkan_names_a_loop_it_cannot_place():
    from dnir.errors import BackendError
    graph = _rotate_graph(16)
    with pytest.raises(BackendError, match=r"scan0_loop: carry 0 is carry [12] of the iteration before"):
        run(graph, _inputs(graph, np.random.default_rng(0)), target="vulkan")
