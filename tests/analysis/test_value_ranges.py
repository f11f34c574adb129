"""Value ranges: sound on random graphs, exact enough that the delta-net graphs
(mask before exp) come out clean, and the factorised decay is flagged."""
import math

import numpy as np
import pytest
from analysis_graphs import random_graphs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnir
from dnir.analysis.ranges import analyze
from dnir.lowering.numpy_backend import execute, prepare_inputs
from dnir.models import build
from dnir.passes import optimize

SMALL = dict(heads=2, head_dim=16, value_dim=16, seq_len=100)


@pytest.mark.parametrize("name,value_heads", [("qwen3-next", 4), ("kimi-linear", 2)])
@pytest.mark.parametrize("options", [
    dict(), dict(chunk_size=16), dict(block_size=16), dict(l2norm=True, initial_state=True, final_state=True),
    dict(mode="recurrent", seq_len=6), dict(mode="decode", seq_len=1, batch=2, initial_state=True),
])
def test_exact_delta_net_graphs_are_clean(name, value_heads, options):
    graph = build(name, **{**SMALL, "value_heads": value_heads, **options})
    assert analyze(graph).findings == []
    if options.get("mode") is None:
        assert analyze(optimize(graph, "O2")).findings == []


@pytest.mark.parametrize("name,value_heads", [("qwen3-next", 4), ("kimi-linear", 2)])
def test_factorised_decay_is_flagged(name, value_heads):
    graph = build(name, **{**SMALL, "value_heads": value_heads}, factorized_decay=True)
    findings = analyze(graph).findings
    assert findings and all(f.op == "exp" for f in findings)
    (lo, hi), = findings[0].ranges
    assert hi == pytest.approx(20 * 64) and lo == 0      # -gam over a 64-token chunk of gates >= -20
    # With gentle gates the same graph is safe: 64 * 1 < log(max f32) ~ 88.7.
    assert analyze(graph, {"g": (-1.0, 0.0)}).findings == []


def _decay(mask_first: bool):
    b = dnir.Builder()
    g = b.input("g", (2, 3, 32))                              # heads, chunks, tokens
    gam = b.cumsum(g, axis=-1)
    diff = b.sub(b.reshape(gam, (2, 3, 32, 1)), b.reshape(gam, (2, 3, 1, 32)))
    decay = b.exp(b.tril(diff)) if mask_first else b.tril(b.exp(diff))
    return b.build(decay), decay


def test_mask_before_exp_is_clean_mask_after_is_flagged():
    graph, decay = _decay(True)
    report = analyze(graph)
    assert report.findings == []
    assert report.range_of(decay) == (pytest.approx(math.exp(-20 * 31)), 1.0)
    graph, decay = _decay(False)
    (finding,) = analyze(graph).findings
    assert finding.node is decay.inputs[0] and finding.ranges == [(-20 * 31, 20 * 31)]


def test_where_with_a_constant_mask_and_a_reference_row():
    b = dnir.Builder()
    g = b.input("g", (4, 16))
    gam = b.cumsum(g, axis=1)
    diff = b.sub(b.reshape(gam, (4, 16, 1)), b.reshape(gam, (4, 1, 16)))
    causal = b.const(np.tri(16, dtype=bool))
    masked = b.exp(b.where(causal, diff, -math.inf))          # upper triangle -> exp(-inf) = 0
    ref = b.slice_axis(gam, 1, 8, 9)                         # row 8 as reference
    rows_after = b.exp(b.sub(b.slice_axis(gam, 1, 8, 16), ref))      # rows >= 8: <= 0
    rows_before = b.exp(b.sub(ref, b.slice_axis(gam, 1, 0, 8)))      # columns < 8: <= 0
    rows_wrong = b.exp(b.sub(b.slice_axis(gam, 1, 0, 8), ref))       # >= 0: can overflow
    graph = b.build([masked, rows_after, rows_before, rows_wrong])
    assert [f.node for f in analyze(graph).findings] == [rows_wrong]


def test_div_log_sqrt_findings():
    b = dnir.Builder()
    beta, v = b.input("beta", (4,)), b.input("v", (4,))
    bad_div = b.div(v, beta)                                  # beta in [0, 1] reaches 0
    good_div = b.div(v, b.add(beta, 1.0))
    bad_log = b.log(beta)
    bad_sqrt = b.sqrt(b.sub(beta, 0.5))
    good_rsqrt = b.rsqrt(b.add(b.mul(v, v), 1e-6))            # a square plus eps is positive
    graph = b.build([bad_div, good_div, bad_log, bad_sqrt, good_rsqrt])
    found = {f.node for f in analyze(graph).findings}
    assert found == {bad_div, bad_log, bad_sqrt}


def test_scan_carries_reach_a_fixpoint_or_widen():
    bb = dnir.Builder()
    c, x = bb.input("c", (3,)), bb.input("x", (3,))
    body = bb.build([bb.maximum(bb.minimum(bb.add(c, x), 5.0), -5.0), bb.exp(c)])
    b = dnir.Builder()
    c0, xs = b.input("c0", (3,)), b.input("xs", (50, 3))
    final, ys = b.scan(body, [c0], [xs])
    graph = b.build([final, ys])
    report = analyze(graph, {"c0": (0.0, 1.0), "xs": (-1.0, 2.0)})
    assert report.range_of(final) == (-5.0, 5.0)              # the clamp bounds the carry
    assert report.range_of(ys) == (pytest.approx(math.exp(-5)), pytest.approx(math.exp(5)))
    assert report.findings == []
    growing = b.build([b.scan(bb.build([bb.add(c, x), c]), [c0], [xs])[0]])
    lo, hi = analyze(growing, {"c0": (0.0, 1.0), "xs": (0.0, 2.0)}).range_of(growing.outputs[0])
    assert lo == 0.0 and hi >= 101.0                          # 1 + 50 * 2, widened or exact


def _values(graph, args):
    """id(node) -> array for every top-level value."""
    probe = dnir.Graph(graph.inputs, [n for n in graph.topo_order() if not isinstance(n.type, tuple)])
    return {id(n): a for n, a in zip(probe.outputs, execute(probe, args, float64=True))}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=random_graphs(), seed=st.integers(0, 2**16),
       x_range=st.sampled_from([(-1.0, 1.0), (0.0, 2.0), (-3.0, -0.5)]))
def test_ranges_hold_every_computed_value(graph, seed, x_range):
    rng = np.random.default_rng(seed)
    declared = {"x": x_range, "y": (-0.5, 0.5)}
    inputs = {name: rng.uniform(*declared[name], size=n.shape) for name, n in zip(graph.input_names, graph.inputs)}
    values = _values(graph, prepare_inputs(graph, inputs, float64=True))
    report = analyze(graph, declared)
    for node in graph.topo_order():
        if isinstance(node.type, tuple) or node.type.size == 0:
            continue
        lo, hi = report.range_of(node)
        v = values[id(node)].astype(np.float64)
        v = v[~np.isnan(v)]
        slack = 1e-9 * (1 + np.abs(v))
        assert np.all(v >= lo - slack) and np.all(v <= hi + slack), (node, lo, hi, v.min(), v.max())
