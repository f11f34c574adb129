"""The ggml backend: every op of the conformance table on ggml's CPU backend
against NumPy, whole delta-net layers against the float64 oracle, and the
lowering's errors. Skipped only where ggml cannot be built (the reason says
what is missing)."""
import numpy as np
import pytest

import dnir
import dnir.passes
from dnir.errors import BackendError
from dnir.lowering.ggml.build import GgmlUnavailable, ggml_build
from dnir.lowering.registry import prepare
from dnir.models import DeltaNetConfig, build, delta_rule_reference, random_inputs, relative_rms_error

from cases import CASES, build_all, nmse
from cases import random_inputs as case_inputs


def _ggml_or_reason():
    try:
        ggml_build()
    except GgmlUnavailable as e:
        return str(e)
    return None


_MISSING = _ggml_or_reason()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"ggml cannot be built here: {_MISSING}")

if _MISSING is None:
    from dnir.lowering.ggml.export_c import export_c
    from dnir.lowering.ggml.run import compile_ggml, run_ggml


@pytest.fixture(scope="module")
def table():
    graph = build_all()
    inputs = case_inputs(graph, np.random.default_rng())
    refs = dict(zip(graph.output_names, dnir.run(graph, inputs)))
    outs = dict(zip(graph.output_names, run_ggml(graph, inputs)))
    return refs, outs


@pytest.mark.parametrize("name", list(CASES))
def test_op_matches_numpy(table, name):
    ref, out = table[0][name], table[1][name]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if ref.dtype.kind == "f":
        assert np.isfinite(out).all()
        assert nmse(out, ref) < 1e-7, nmse(out, ref)
    else:
        np.testing.assert_array_equal(out, ref)


# Small layers: GQA, a length that is not a multiple of the chunk, several sequences, both states.
SIZES = dict(heads=2, value_heads=4, head_dim=16, value_dim=16, chunk_size=16, initial_state=True, final_state=True)
SHAPES = {"chunked": dict(seq_len=40, batch=2), "recurrent": dict(seq_len=21, batch=2),
          "decode": dict(seq_len=1, batch=3), "varlen": dict(seq_len=40, batch=1, cu_seqlens=(0, 13, 19, 40))}


@pytest.mark.parametrize("level", ["O0", "O2"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_layer_matches_oracle(variant, shape, level, rng):
    mode = "chunked" if shape == "varlen" else shape
    cfg = DeltaNetConfig(variant, mode=mode, **SIZES, **SHAPES[shape])
    graph = prepare(dnir.passes.optimize(build(variant, mode=mode, **SIZES, **SHAPES[shape]), level), "ggml")
    compiled = compile_ggml(graph)
    for gate_scale in (1.0, 8.0):      # as drawn, then strong gates
        x = random_inputs(cfg, rng)
        x["g"] = x["g"] * gate_scale
        o, state = compiled(x)
        o_ref, state_ref = delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=cfg.scale,
                                                initial_state=x["initial_state"], cu_seqlens=cfg.cu_seqlens)
        for name, out, ref in (("o", o, o_ref), ("final_state", state, state_ref)):
            assert out.shape == ref.shape and np.isfinite(out).all(), name
            assert relative_rms_error(out, ref) < 1e-5, (name, gate_scale, relative_rms_error(out, ref))


def test_compute_buffer_holds_the_outputs():
    graph = build("gdn", mode="chunked", seq_len=40, **SIZES)
    compiled = compile_ggml(graph)
    outputs = sum(4 * int(np.prod(t.shape)) for t in graph.output_types)
    assert compiled.compute_buffer_bytes >= outputs


def test_too_many_dimensions_names_the_node():
    b = dnir.Builder()
    x = b.input("x", (2, 1, 2, 1, 2))
    y = b.input("y", (1, 2, 1, 2, 1))
    graph = b.build(b.add(x, y))
    with pytest.raises(BackendError, match=r"node %0 = add: .*ggml has 4 dims"):
        compile_ggml(graph)


def test_registered_as_a_target(rng):
    from dnir.lowering import run
    from dnir.lowering.registry import backend_for
    assert backend_for("ggml").name == "ggml"
    graph = build("kda", mode="chunked", seq_len=20, **SIZES)
    x = random_inputs(DeltaNetConfig.from_meta(graph.meta), rng)
    for out, ref in zip(run(graph, x, target="ggml"), run(graph, x)):
        assert nmse(out, ref) < 1e-7


@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_token_loops_run_as_ggmls_fused_op(variant):
    """Recurrent and decode layers (the step recognised at O2) run as ggml_gated_delta_net, one
    call; a chunked layer's loop over chunks is unrolled (ggml has no kernel for it)."""
    def calls(mode, **shape):
        graph = dnir.passes.optimize(build(variant, mode=mode, **SIZES, **shape), "O2")
        return export_c(prepare(graph, "ggml")).count("ggml_gated_delta_net(")
    assert calls("recurrent", seq_len=21) == 1
    assert calls("decode", seq_len=1, batch=3) == 1
    assert calls("chunked", seq_len=40) == 0


@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_a_state_without_initial_value_runs_as_ggmls_fused_op_too(variant, rng):
    """O2 carries a state that starts at zero transposed; the ggml pipeline (carry_for_fused_steps)
    carries it untransposed again so that the decode step is recognised: one ggml_gated_delta_net."""
    sizes = dict(SIZES, initial_state=False)
    cfg = DeltaNetConfig(variant, mode="recurrent", seq_len=21, batch=2, **sizes)
    graph = prepare(dnir.passes.optimize(build(variant, mode="recurrent", seq_len=21, batch=2, **sizes), "O2"), "ggml")
    assert export_c(graph).count("ggml_gated_delta_net(") == 1
    x = random_inputs(cfg, rng)
    o, state = compile_ggml(graph)(x)
    o_ref, state_ref = delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=cfg.scale)
    assert relative_rms_error(o, o_ref) < 1e-5 and relative_rms_error(state, state_ref) < 1e-5


@pytest.mark.parametrize("variant", ["gdn", "kda"])
@pytest.mark.parametrize("level", ["O0", "O2"])
def test_the_loop_over_chunks_copies_nothing_per_chunk(variant, level):
    """The chunk_scan (recognised by the target's pipeline at any level) is unrolled with the state
    kept transposed: a chunk's products read their operands as they are, without a ggml_cont."""
    graph = prepare(dnir.passes.optimize(build(variant, mode="chunked", seq_len=64, **SIZES), level), "ggml")
    assert graph.op_histogram()["chunk_scan"] == 1
    source = export_c(graph)
    chunk = source[source.index(" chunk 1\n"):source.index(" chunk 2\n")]
    assert chunk.count("ggml_mul_mat(") == 4 and "ggml_cont(" not in chunk


@pytest.mark.parametrize("mode,shape", [("decode", dict(seq_len=1, batch=3)), ("recurrent", dict(seq_len=9, batch=2))])
def test_steps_ggml_cannot_run_fused_are_expanded(rng, mode, shape):
    """ggml_gated_delta_net needs K == V: with V != K the recognised step is expanded (and a scan
    over it unrolled), and the layer still matches the oracle."""
    sizes = dict(SIZES, value_dim=8)
    cfg = DeltaNetConfig("gdn", mode=mode, **sizes, **shape)
    graph = prepare(dnir.passes.optimize(build("gdn", mode=mode, **sizes, **shape), "O2"), "ggml")
    assert graph.op_histogram()["token_step"] == 1
    assert "ggml_gated_delta_net(" not in export_c(graph)
    x = random_inputs(cfg, rng)
    o, state = compile_ggml(graph)(x)
    o_ref, state_ref = delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=cfg.scale,
                                            initial_state=x["initial_state"])
    assert relative_rms_error(o, o_ref) < 1e-5 and relative_rms_error(state, state_ref) < 1e-5
