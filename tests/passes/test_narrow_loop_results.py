"""passes/narrow_loop_results.py: a bf16 layer's loop intermediates (intra_chunk's w, u, q_decayed and
k_to_end, chunk_states' starts and v_new) stored in bf16 where its chunk_output stores a bf16 o, at
precision "tf32" on cuda, and nowhere else; o's and the final state's errors against the float64
oracle stay within 2x of the wide loop's, and the ops' references and expansions round exactly once."""
from __future__ import annotations

import numpy as np
import pytest

import dnir
from dnir import passes
from dnir.errors import DTypeError
from dnir.lowering import registry
from dnir.lowering.numpy_backend import run as reference
from dnir.models import build_delta_net, preset, random_inputs

LAYERS = [
    ("qwen3-next", dict(seq_len=150, value_heads=4)),                  # GQA, a partial last chunk
    ("kimi-linear", dict(seq_len=100, batch=2, value_heads=2)),        # a decay per key channel, 2 sequences
]


def _config(name, options, **more):
    return preset(name, heads=2, head_dim=32, value_dim=32, initial_state=True, final_state=True,
                  **{**options, **more})


def _prepared(cfg, target="cuda"):
    with registry.target_context(target):
        graph = passes.optimize(build_delta_net(cfg), "O2")
    return registry.prepare(graph, target)


def _loop(graph):
    """(intra_chunk, chunk_states, chunk_output) of a prepared layer: one of each."""
    return tuple(next(n for n in graph.topo_order() if n.op == op)
                 for op in ("intra_chunk", "chunk_states", "chunk_output"))


@pytest.mark.parametrize("name,options", LAYERS)
def test_a_bf16_layer_stores_its_loops_intermediates_in_bf16(name, options):
    cfg = _config(name, options, dtype="bf16")
    narrow = _prepared(cfg)
    intra, states, output = _loop(narrow)
    assert [t.dtype for t in intra.type] == ["bf16", "bf16", "bf16", "f32", "bf16", "f32"]
    assert states.attrs["dtype"] == "bf16" and [t.dtype for t in states.type] == ["f32", "bf16", "bf16"]
    assert [(x.inputs[0].op, x.attrs["index"]) for x in states.inputs[1:]] == [
        ("intra_chunk", 0), ("intra_chunk", 1), ("intra_chunk", 4), ("intra_chunk", 5)]
    assert [(x.inputs[0].op, x.attrs["index"]) for x in output.inputs] == [
        ("intra_chunk", 2), ("chunk_states", 1), ("intra_chunk", 3), ("chunk_states", 2)]
    assert output.dtype == "bf16"
    assert sum(n.op in ("intra_chunk", "chunk_states") for n in narrow.topo_order()) == 2   # each once

    wide = _prepared(_config(name, options, dtype="bf16", precision="highest"))
    assert [_loop(wide)[i].attrs["dtype"] for i in (0, 1)] == ["", ""]
    x = random_inputs(cfg, 11)
    oracle = dict(zip(narrow.output_names, reference(build_delta_net(cfg), x, float64=True)))
    got = dict(zip(narrow.output_names, reference(narrow, x)))
    kept = dict(zip(wide.output_names, reference(wide, x)))
    def error(out, a):                  # rms error relative to the oracle's rms
        return float(np.sqrt(np.mean((np.asarray(a, np.float64) - oracle[out]) ** 2) / np.mean(oracle[out] ** 2)))
    for out in ("o", "final_state"):
        assert not np.array_equal(got[out], kept[out]), out
        # roundings of bf16's size (unit roundoff 2**-8), as the peers' kernels make them
        assert error(out, got[out]) <= 2 ** -8, out
    assert error("o", got["o"]) <= 2 * error("o", kept["o"])      # o: within 2x of its own rounding's error


@pytest.mark.parametrize("dtype,precision", [
    ("bf16", "highest"),              # the layer asks for float32's accuracy
    ("f16", None),                    # fp16's range: a start could overflow
    ("f32", "tf32"),                  # o stored float32
])
def test_the_loop_stays_wide_elsewhere(dtype, precision):
    cfg = _config(*LAYERS[0], dtype=dtype, precision=precision)
    intra, states, _ = _loop(_prepared(cfg))
    assert intra.attrs["dtype"] == states.attrs["dtype"] == ""
    assert {t.dtype for t in intra.type + states.type} == {"f32"}


def test_a_target_whose_kernels_store_no_narrow_starts_keeps_them():
    """The pass offers the narrowed ops to the target: one with chunk_output storing bf16 but no
    chunk_states storing it keeps the loop wide, and says why."""
    from dnir.passes.context import PassContext, Target, any_node
    cfg = _config(*LAYERS[0], dtype="bf16")
    with registry.target_context("cuda"):
        graph = passes.optimize(build_delta_net(cfg), "O2")
        graph = passes.optimize(graph, [*registry.backend_for("cuda").pipeline, "fold_widening_casts",
                                        "fold_narrowing_casts"])
    kernels = {op: any_node for op in ("chunk_states", "chunk_output", "intra_chunk")}
    target = Target("o-only", kernels, narrow_results=frozenset({"chunk_output"}),
                    narrow_operands=frozenset({"chunk_output"}))
    with PassContext(target) as ctx:
        kept = passes.optimize(graph, ["narrow_loop_results"])
    assert dnir.print(kept) == dnir.print(graph)
    assert ("narrow_loop_results", "chunk_states: starts and v_new kept wide: the chunk_states kernel of "
                                   "'o-only' stores no bf16 results") in ctx.remarks


def _states_operands(rng, n=3, heads=2, C=4, K=4, V=8, Kg=1):
    shapes = dict(state=(heads, K, V), w=(n, heads, C, K), u=(n, heads, C, V), kte=(n, heads, C, K),
                  ld=(n, heads, Kg, 1))
    return {name: (rng.uniform(0.5, 1.0, s) if name == "ld" else rng.standard_normal(s)).astype(np.float32)
            for name, s in shapes.items()}


def _states_graph(x, dtype):
    b = dnir.Builder()
    ins = [b.input(name, a.shape) for name, a in x.items()]
    return b.build(list(dnir.fused.chunk_states(*ins, dtype=dtype)), names=["final", "starts", "v_new"])


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_chunk_states_rounds_starts_and_v_new_once_in_its_reference_and_expansion(dtype):
    x = _states_operands(np.random.default_rng(3))
    narrow, wide = _states_graph(x, dtype), _states_graph(x, "")
    assert [t.dtype for t in narrow.output_types] == ["f32", dtype, dtype]
    final, starts, v_new = reference(narrow, x)
    want = reference(wide, x)
    np.testing.assert_array_equal(final, want[0])
    for got, w in ((starts, want[1]), (v_new, want[2])):
        assert got.dtype == dnir.types.numpy_dtype(dtype)
        np.testing.assert_array_equal(got, w.astype(got.dtype))
    expanded = passes.optimize(narrow, ["expand_fused"])
    for got, w in zip(reference(expanded, x), (final, starts, v_new)):
        assert got.dtype == w.dtype
        np.testing.assert_allclose(got.astype(np.float32), w.astype(np.float32), rtol=1e-5, atol=1e-5)


def test_a_stored_dtype_wider_than_the_state_is_an_error():
    x = _states_operands(np.random.default_rng(4))
    with pytest.raises(DTypeError, match="attribute dtype='f64'; expected a floating-point dtype no wider than f32"):
        _states_graph(x, "f64")
