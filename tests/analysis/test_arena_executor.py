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


def _layer(name, rng, **options):
    cfg = preset(name, value_heads=2, **SMALL, seq_len=40, chunk_size=16, initial_state=True, final_state=True,
                 **options)
    return optimize(build_delta_net(cfg), "O2"), cfg


def test_compute_buffer_is_kept_between_calls_and_reused_by_smaller_graphs(rng):
    from dnir.lowering.numpy_arena import graph_plan, release_compute_buffer
    release_compute_buffer()
    big, big_cfg = _layer("kimi-linear", rng)
    small, small_cfg = _layer("qwen3-next", rng, mode="recurrent")
    assert graph_plan(big) is graph_plan(big) and graph_plan(small).peak_bytes < graph_plan(big).peak_bytes
    for graph, cfg in [(big, big_cfg), (small, small_cfg), (big, big_cfg)]:
        inputs = model_inputs(cfg, rng)       # fresh values each call: nothing stale may leak through
        for got, want in zip(run_planned(graph, inputs)[0], run(graph, inputs), strict=True):
            assert np.array_equal(got, want)
    assert release_compute_buffer() == graph_plan(big).peak_bytes    # one buffer, sized by the largest plan
    assert release_compute_buffer() == 0


def test_concurrent_calls_do_not_share_a_buffer(rng):
    from concurrent.futures import ThreadPoolExecutor
    graph, cfg = _layer("kimi-linear", rng)
    inputs = [model_inputs(cfg, np.random.default_rng(seed)) for seed in range(6)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda x: run_planned(graph, x)[0], inputs))
    for x, outs in zip(inputs, results):
        for got, want in zip(outs, run(graph, x), strict=True):
            assert np.array_equal(got, want)


def test_functional_api_runs_the_reference_arithmetic_in_the_compute_buffer(rng):
    import dnir
    from dnir.api import compiled_graph
    graph, cfg = _layer("qwen3-next", rng)
    x = model_inputs(cfg, rng)
    o, state = dnir.chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=16,
                                           initial_state=x["initial_state"], output_final_state=True)
    want = run(compiled_graph(cfg, "O2"), x)
    assert np.array_equal(o, want[0]) and np.array_equal(state, want[1])
