"""Per-op tables of the analyses and the arena executor: complete, and fused ops covered."""
import numpy as np
import pytest

from dnir.analysis.memory import check_plan, plan
from dnir.analysis.ranges import RULES, analyze
from dnir.errors import DnirError
from dnir.graph import Graph
from dnir.lowering.numpy_arena import run_planned
from dnir.lowering.numpy_backend import run
from dnir.ops import REGISTRY, check_table, make_node

STEP_SHAPES = dict(state=(2, 4, 3), decay=(2, 1), k_col=(2, 4), k_row=(2, 4), q_row=(2, 4), v=(2, 3),
                   beta=(2, 1), qk=(2, 1))


def token_step_graph():
    ins = [make_node("input", (), {"name": n, "shape": s, "dtype": "f32"}) for n, s in STEP_SHAPES.items()]
    step = make_node("token_step", ins, {})
    state, o = (make_node("item", (step,), {"index": i}) for i in (0, 1))
    return Graph(ins, [make_node("exp", (state,), {}), o])


def test_a_table_without_an_op_fails_naming_the_op_and_the_table():
    with pytest.raises(DnirError, match=r"the range rules has no entry for op\(s\) exp, softplus"):
        check_table("the range rules", set(RULES) - {"exp", "softplus"} | {"input", "scan"}, fused="expansion")
    fused = sorted(op for op, d in REGISTRY.items() if d.op_class == "fused")
    assert fused, "the fused ops are registered"
    with pytest.raises(DnirError, match=", ".join(fused)):
        check_table("the range rules", set(RULES) | {"input", "scan"})


def test_a_fused_op_is_planned_checked_and_run_in_the_arena_as_the_reference_runs_it():
    graph = token_step_graph()
    rng = np.random.default_rng(5)
    inputs = {n: rng.standard_normal(s).astype(np.float32) for n, s in STEP_SHAPES.items()}
    mp = check_plan(plan(graph))
    got, _ = run_planned(graph, inputs, mp)
    for a, b in zip(got, run(graph, inputs)):
        np.testing.assert_array_equal(a, b)


def test_a_fused_op_has_the_ranges_of_its_expansion():
    graph = token_step_graph()
    bounds = {n: (-0.5, 0.75) for n in STEP_SHAPES}
    fused = analyze(graph, bounds)
    step = graph.outputs[1].inputs[0]
    state, o = REGISTRY["token_step"].expand(step)
    expansion = Graph(graph.inputs, [make_node("exp", (state,), {}), o])
    expanded = analyze(expansion, bounds)
    for a, b in zip(graph.outputs, expansion.outputs):
        assert fused.range_of(a) == expanded.range_of(b)
    assert all(np.isfinite(fused.range_of(graph.outputs[1])))
