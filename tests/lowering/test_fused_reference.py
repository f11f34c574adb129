"""The NumPy reference kernels of the fused ops (chunk_states and chunk_output: a chunk_scan split
where the target has kernels for both, as NumPy has; token_step) against their expansions
into primitive ops and against the float64 recurrent oracle, on fresh random inputs: GQA, a
partial last chunk, a gate per key channel, packed sequences of different lengths, strong gates."""
import numpy as np
import pytest

from dnir import fused, passes
from dnir.builder import Builder
from dnir.lowering import registry, run
from dnir.models import build_delta_net, delta_rule_reference, preset, random_inputs, relative_rms_error

SMALL = dict(heads=2, head_dim=32, value_dim=32, initial_state=True, final_state=True)
VALUE_HEADS = {"qwen3-next": 4, "kimi-linear": 2}     # GQA for gdn
LAYERS = {
    "gqa-partial-chunk": ("qwen3-next", dict(seq_len=150)),
    "gate-per-channel": ("kimi-linear", dict(seq_len=150)),
    "varlen": ("qwen3-next", dict(seq_len=100, cu_seqlens=(0, 37, 100))),
    "two-sequences-chunk-32": ("kimi-linear", dict(seq_len=96, batch=2, chunk_size=32)),
    "decode-gqa": ("qwen3-next", dict(batch=3, seq_len=1, mode="decode")),
    "decode-gate-per-channel": ("kimi-linear", dict(batch=3, seq_len=1, mode="decode")),
    # the step with its prologue folded in (decode_step): GQA, one sequence, a gate per key channel
    "decode-gqa-folded": ("qwen3-next", dict(batch=3, seq_len=1, mode="decode")),
    "decode-one-sequence-folded": ("qwen3-next", dict(batch=1, seq_len=1, mode="decode")),
    "decode-gate-per-channel-folded": ("kimi-linear", dict(batch=2, seq_len=1, mode="decode")),
}
GATE_SCALES = (1.0, 8.0)        # as drawn, and strong gates (decays near 0)


def _layer(case):
    name, options = LAYERS[case]
    cfg = preset(name, value_heads=VALUE_HEADS[name], **SMALL, **options)
    graph = passes.optimize(build_delta_net(cfg), "O2")
    folded = case.endswith("-folded")
    with registry.target_context("numpy"):         # NumPy has a kernel for every fused op
        fused_graph = passes.optimize(graph, ["fuse_delta_steps"] + ["fold_step_prologue"] * folded)
    ops = (["decode_step"] if folded else ["token_step"]) if options.get("mode") == "decode" else [
        "chunk_states", "chunk_output"]
    for op in ops:    # a loop per sequence
        assert fused_graph.op_histogram()[op] == (cfg.num_sequences if cfg.cu_seqlens else 1)
    return cfg, fused_graph


def _inputs(cfg, rng, scale):
    x = random_inputs(cfg, rng)
    return dict(x, g=x["g"] * scale)


@pytest.mark.parametrize("scale", GATE_SCALES)
@pytest.mark.parametrize("case", sorted(LAYERS))
def test_reference_kernels_match_their_expansion(case, scale, rng):
    cfg, fused_graph = _layer(case)
    expanded, changed = passes.PASSES["expand_fused"].fn(fused_graph)
    assert changed and not {"chunk_scan", "chunk_states", "chunk_output", "token_step", "decode_step"} & set(
        expanded.op_histogram())
    x = _inputs(cfg, rng, scale)
    for out, ref in zip(run(fused_graph, x, float64=True), run(expanded, x, float64=True)):
        assert relative_rms_error(out, ref) < 1e-13
    for out, ref in zip(run(fused_graph, x), run(expanded, x)):
        assert out.dtype == np.float32 and relative_rms_error(out, ref) < 1e-6


@pytest.mark.parametrize("scale", GATE_SCALES)
@pytest.mark.parametrize("case", sorted(LAYERS))
def test_reference_kernels_match_the_oracle(case, scale, rng):
    cfg, fused_graph = _layer(case)
    x = _inputs(cfg, rng, scale)
    o, state = delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=cfg.scale,
                                    initial_state=x["initial_state"], cu_seqlens=cfg.cu_seqlens)
    for tol, float64 in ((1e-5, False), (1e-12, True)):
        got = dict(zip(fused_graph.output_names, run(fused_graph, x, float64=float64)))
        assert relative_rms_error(got["o"], o) < tol and relative_rms_error(got["final_state"], state) < tol


def _expanded_results(node_builder, operands):
    """The op's results by its reference kernel and by its expansion, in float64."""
    b = Builder()
    ins = [b.input(f"x{i}", a.shape) for i, a in enumerate(operands)]
    results = node_builder(*ins)
    graph = b.build(list(results))
    expanded, _ = passes.PASSES["expand_fused"].fn(graph)
    return run(graph, operands, float64=True), run(expanded, operands, float64=True)


@pytest.mark.parametrize("Kg", [1, 8])
def test_chunk_scan_on_random_operands(Kg, rng):
    steps, batch, C, K, V = 5, (2, 3), 4, 8, 6
    normal = lambda *shape: 0.3 * rng.standard_normal(shape)       # noqa: E731
    operands = [normal(*batch, K, V), normal(steps, *batch, C, K), normal(steps, *batch, C, V),
                normal(steps, *batch, C, K), normal(steps, *batch, C, C), normal(steps, *batch, C, K),
                rng.uniform(0.01, 1.0, (steps, *batch, Kg, 1))]
    for got, want in zip(*_expanded_results(fused.chunk_scan, operands)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("Kg", [1, 8])
def test_token_step_on_random_operands(Kg, rng):
    batch, K, V = (2, 3), 8, 6
    normal = lambda *shape: rng.standard_normal((*batch, *shape))   # noqa: E731
    # operands in the shapes the O2 graph gives them, or any other with as many values per head
    operands = [normal(K, V), rng.uniform(0.01, 1.0, (*batch, Kg, 1)), normal(K, 1), normal(1, K), normal(K),
                normal(V), rng.uniform(0.05, 0.95, (*batch, 1)), normal(1, 1)]
    for got, want in zip(*_expanded_results(fused.token_step, operands)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
