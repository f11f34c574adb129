"""Passes on random graphs: they keep inputs, output types and results, and a pass
that finds nothing to do returns the graph unchanged (never an exception)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnir
from dnir import passes
from dnir.passes.validate import compare

UNARY = ["exp", "neg", "sigmoid", "cont"]
BINARY = ["add", "sub", "mul", "maximum"]


@st.composite
def random_graphs(draw):
    """Small graphs of 2-D and 3-D values mixing elementwise, layout, reductions and assembly."""
    b = dnir.Builder()
    n, m = draw(st.sampled_from([(2, 3), (4, 4), (3, 2)]))
    x, y = b.input("x", (2, n, m)), b.input("g", (2, n, 1))
    values = [x, b.broadcast_to(y, (2, n, m))]
    for _ in range(draw(st.integers(2, 9))):
        a = draw(st.sampled_from(values))
        kind = draw(st.sampled_from(["unary", "binary", "permute", "cumsum", "matmul", "tril", "sum_mul",
                                     "acc", "bcast"]))
        if kind == "unary":
            v = getattr(b, draw(st.sampled_from(UNARY)))(a)
        elif kind == "binary":
            other = draw(st.sampled_from([v for v in values if v.shape == a.shape] or [a]))
            v = getattr(b, draw(st.sampled_from(BINARY)))(a, other)
        elif kind == "permute":
            axes = draw(st.permutations(range(a.rank)))
            v = b.permute(b.permute(a, axes), [list(axes).index(i) for i in range(a.rank)]) \
                if draw(st.booleans()) else b.permute(a, axes)
            if v.shape != a.shape:
                values.append(v)
                continue
        elif kind == "cumsum":
            v = b.permute(b.cumsum(b.permute(a, (0, 2, 1)), axis=-1), (0, 2, 1))
        elif kind == "matmul":
            v = b.matmul(a, b.permute(a, (0, 2, 1)))
            values.append(v)
            continue
        elif kind == "tril":
            v = b.tril(a, draw(st.integers(-1, 0)))
        elif kind == "sum_mul":
            v = b.sum(b.mul(a, b.reshape(b.sum(a, axis=-2), (a.shape[0], 1, a.shape[2]))), axis=-1, keepdims=True)
            v = b.broadcast_to(v, a.shape)
        elif kind == "acc":
            z = b.zeros(a.shape)
            h = a.shape[1] // 2
            top, bottom = a[:, :h], a[:, h:]
            v = b.acc(b.acc(z, top, (0, 0, 0)), bottom, (0, h, 0))
        elif a.shape[:2] == y.shape[:2]:
            v = b.add(b.broadcast_to(y, a.shape), a)
        else:
            continue
        values.append(v)
    outs = draw(st.lists(st.sampled_from(values[2:] or values), min_size=1, max_size=2, unique_by=id))
    return b.build(outs)


NAMES = sorted(passes.PASSES)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(graph=random_graphs(), name=st.sampled_from(NAMES + ["O1", "O2"]), seed=st.integers(0, 2**16))
def test_passes_keep_signature_and_results(graph, name, seed):
    pipeline = passes.PIPELINES.get(name, [name])
    options = {"block_tril": {"block": 2}, "block_solve": {"block": 2}}
    out, _ = passes.run_pipeline(graph, pipeline, options=options)
    assert out.input_types == graph.input_types and out.output_types == graph.output_types
    dnir.verify(out)
    assert compare(graph, out, np.random.default_rng(seed)) == []


@SETTINGS
@given(graph=random_graphs())
def test_a_second_run_of_o2_changes_nothing_it_cannot_improve(graph):
    once = passes.optimize(graph, "O2")
    twice = passes.optimize(once, "O2")
    assert twice.node_count() <= once.node_count()


@pytest.mark.parametrize("name", NAMES)
def test_a_pass_with_nothing_to_do_returns_the_same_graph(name):
    b = dnir.Builder()
    x = b.input("x", (3, 5))
    graph = b.build(b.exp(x))
    out, changed = passes.PASSES[name].fn(graph)
    assert not changed and out is graph
