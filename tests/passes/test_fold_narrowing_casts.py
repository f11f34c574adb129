"""passes/fold_narrowing_casts.py: a bf16/fp16 o's cast folded into the chunk_output making it, where
the target's kernel stores half results (Target.narrow_results: cuda), and nowhere else; the folded
op computes what the cast after it did, on the NumPy reference and in its expansion."""
from __future__ import annotations

import numpy as np
import pytest

import dnir
from dnir import passes
from dnir.errors import DTypeError
from dnir.lowering import registry
from dnir.lowering.numpy_backend import run as reference
from dnir.models import build_delta_net, preset, random_inputs
from dnir.passes.context import PassContext, Target, any_node

HALF_O = Target("half-o", {"chunk_output": any_node}, narrow_results=frozenset({"chunk_output"}))
FLOAT32_O = Target("float32-o", {"chunk_output": any_node})

# A token-major chunk_output of 2 chunks of 4 (K=4, V=8), trimmed to 6 tokens and narrowed to bf16.
BEFORE = """graph(%qd: f32[2,1,2,4,4], %starts: f32[2,1,2,4,8], %aqk: f32[2,1,2,4,4], %vn: f32[2,1,2,4,8]) {
  %0: f32[1,8,2,8] = chunk_output(%qd, %starts, %aqk, %vn) {token_major=true, dtype=""}
  %1: f32[1,6,2,8] = slice(%0) {starts=[0, 0, 0, 0], stops=[1, 6, 2, 8]}
  %2: bf16[1,6,2,8] = cast(%1) {dtype=bf16}
  return %2 as o
}"""

EXPECTED = """graph(%qd: f32[2,1,2,4,4], %starts: f32[2,1,2,4,8], %aqk: f32[2,1,2,4,4], %vn: f32[2,1,2,4,8]) {
  %0: bf16[1,8,2,8] = chunk_output(%qd, %starts, %aqk, %vn) {token_major=true, dtype=bf16}
  %1: bf16[1,6,2,8] = slice(%0) {starts=[0, 0, 0, 0], stops=[1, 6, 2, 8]}
  return %1 as o
}"""


def _fold(graph, target):
    with PassContext(target) as ctx:
        folded = passes.optimize(graph, ["fold_narrowing_casts"])
    return folded, ctx.remarks


def _operands(graph, rng):
    return {n: rng.standard_normal(t.shape).astype(np.float32) for n, t in zip(graph.input_names, graph.input_types)}


def test_the_cast_folds_into_a_kernel_that_stores_half_results():
    folded, remarks = _fold(dnir.parse(BEFORE), HALF_O)
    assert dnir.print(folded) == dnir.print(dnir.parse(EXPECTED))
    assert ("fold_narrowing_casts", "chunk_output: stores bf16") in remarks


def test_the_cast_stays_where_the_kernel_stores_only_its_own_dtype():
    graph = dnir.parse(BEFORE)
    kept, remarks = _fold(graph, FLOAT32_O)
    assert dnir.print(kept) == dnir.print(graph)
    assert ("fold_narrowing_casts", "chunk_output: result kept wide, then cast: the chunk_output kernel of "
                                     "'float32-o' stores no bf16 results") in remarks
    assert dnir.print(_fold(graph, None)[0]) == dnir.print(graph)         # no target: nothing to ask


def test_the_cast_stays_where_the_wide_o_is_read_too():
    graph = dnir.parse(BEFORE.replace("return %2 as o", "return %2 as o, %1 as wide"))
    assert dnir.print(_fold(graph, HALF_O)[0]) == dnir.print(graph)       # the float32 o is still needed


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_folded_reference_and_expansion_round_once_as_the_cast_did(dtype):
    graph = dnir.parse(BEFORE.replace("bf16", dtype))
    folded, _ = _fold(graph, HALF_O)
    x = _operands(graph, np.random.default_rng(5))
    (want,) = reference(graph, x)
    (got,) = reference(folded, x)                 # the reference kernel honours the op's dtype
    assert got.dtype == want.dtype == dnir.types.numpy_dtype(dtype)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    # its expansion narrows with a cast of its own, before the layout ops move the values
    expanded = passes.optimize(folded, ["expand_fused"])
    assert [(n.inputs[0].dtype, n.dtype) for n in expanded.topo_order() if n.op == "cast"] == [("f32", dtype)]
    (again,) = reference(expanded, x)
    np.testing.assert_array_equal(again.view(np.uint16), reference(passes.optimize(graph, ["expand_fused"]), x)[0]
                                  .view(np.uint16))


def test_a_dtype_wider_than_the_op_computes_in_is_an_error():
    b = dnir.Builder()
    qd, starts = b.input("qd", (1, 2, 4, 4)), b.input("starts", (1, 2, 4, 8))
    aqk, vn = b.input("aqk", (1, 2, 4, 4)), b.input("vn", (1, 2, 4, 8))
    with pytest.raises(DTypeError, match="attribute dtype='f64'; expected a floating-point dtype no wider than f32"):
        dnir.fused.chunk_output(qd, starts, aqk, vn, dtype="f64")
    assert dnir.fused.chunk_output(qd, starts, aqk, vn, dtype="f16").dtype == "f16"


LAYERS = [
    ("qwen3-next", dict(seq_len=150, value_heads=4)),                  # GQA, a partial last chunk
    ("kimi-linear", dict(seq_len=100, batch=2, value_heads=2)),        # a decay per key channel, 2 sequences
]


@pytest.mark.parametrize("name,options", LAYERS)
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_a_half_layer_on_cuda_stores_o_in_chunk_output_with_the_same_values(name, options, dtype):
    """The cuda-prepared layer (T not a multiple of 64, an initial state): chunk_output stores o in
    the layer's dtype and no cast of it is left; run by the NumPy reference kernels its outputs are
    bit for bit those of the same graph with the cast kept (one rounding of the same float32 o)."""
    cfg = preset(name, heads=2, head_dim=32, value_dim=32, initial_state=True, final_state=True, dtype=dtype,
                 **options)
    with registry.target_context("cuda"):
        graph = passes.optimize(build_delta_net(cfg), "O2")
        kept = passes.optimize(graph, [*registry.backend_for("cuda").pipeline, "fold_widening_casts"])
        folded = passes.optimize(kept, ["fold_narrowing_casts"])
        after = passes.optimize(folded, ["narrow_loop_results"])      # bf16: the loop's intermediates too
    assert dnir.print(registry.prepare(graph, "cuda")) == dnir.print(after)      # the cuda pipeline runs the pass
    (output,) = [n for n in folded.topo_order() if n.op == "chunk_output"]
    assert output.attrs["dtype"] == dtype and output.dtype == dtype
    assert not any(n.op == "cast" and n.dtype == dtype for n in folded.topo_order())
    assert any(n.op == "cast" and n.dtype == dtype for n in kept.topo_order())
    x = random_inputs(cfg, 7)
    for name_, a, b in zip(graph.output_names, reference(folded, x), reference(kept, x)):
        assert a.dtype == b.dtype, name_
        np.testing.assert_array_equal(a, b, err_msg=name_)


@pytest.mark.parametrize("target", ["llvm", "vulkan", "ggml"])
def test_other_targets_keep_o_cast(target):
    """llvm's chunk layer and ggml never make a chunk_output; Vulkan makes one and keeps its cast."""
    cfg = preset("qwen3-next", heads=2, value_heads=4, head_dim=32, value_dim=32, seq_len=150, dtype="f16")
    try:
        with registry.target_context(target):
            graph = passes.optimize(build_delta_net(cfg), "O2")
            prepared = registry.prepare(graph, target)
    except dnir.errors.BackendError as e:                 # no Vulkan adapter here: its target cannot be made
        if target != "vulkan":
            raise
        pytest.skip(f"no Vulkan adapter: {e}")
    assert not any(n.attrs.get("dtype") == "f16" for n in prepared.topo_order() if n.op == "chunk_output")
    assert any(n.op == "cast" and n.dtype == "f16" for n in prepared.topo_order())
