"""The arena executor follows the memory plan and computes exactly what the NumPy backend does."""
import numpy as np
import pytest
from analysis_graphs import random_graphs, random_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnir.analysis.memory import check_plan, plan
from dnir.lowering.numpy_arena import run_planned
from dnir.lowering.numpy_backend import run
from dnir.models import build_delta_net, preset, random_inputs as model_inputs
from dnir.passes import optimize

SMALL = dict(heads=2, head_dim=16, value_dim=16)


def assert_identical(graph, inputs):
    mp = check_plan(plan(graph))
    outs, used = run_planned(graph, inputs, mp)
    assert used == mp.peak_bytes
    for got, want in zip(outs, run(graph, inputs), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want, equal_nan=True)


@pytest.mark.parametrize("name,value_heads", [("qwen3-next", 4), ("kimi-linear", 2)])
@pytest.mark.parametrize("options", [
    dict(seq_len=70, chunk_size=32),
    dict(seq_len=40, chunk_size=16, initial_state=True, final_state=True, l2norm=True),
    dict(seq_len=64, block_size=16),
    dict(seq_len=5, mode="recurrent", initial_state=True, final_state=True),
])
@pytest.mark.parametrize("level", ["O0", "O2"])
def test_presets_identical_to_numpy(name, value_heads, options, level, rng):
    cfg = preset(name, value_heads=value_heads, **SMALL, **options)
    graph = build_delta_net(cfg)
    if level == "O2":
        graph = optimize(graph, "O2")
    assert_identical(graph, model_inputs(cfg, rng))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=random_graphs(), seed=st.integers(0, 2**16))
def test_random_graphs_identical_to_numpy(graph, seed):
    assert_identical(graph, random_inputs(graph, np.random.default_rng(seed)))


def test_plan_for_another_graph_is_refused(rng):
    import dnir
    from dnir.errors import BackendError
    b = dnir.Builder()
    x = b.input("x", (4, 4))
    g1, g2 = b.build(b.exp(x)), b.build(b.neg(x))
    with pytest.raises(BackendError, match="another graph"):
        run_planned(g1, {"x": rng.standard_normal((4, 4))}, plan(g2))
