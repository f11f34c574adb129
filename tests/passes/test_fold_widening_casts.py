"""passes/fold_widening_casts.py: a half input's widening cast folded into the fused op reading it,
where the target's kernel loads half operands (Target.narrow_operands), and nowhere else."""
from __future__ import annotations

import numpy as np
import dnir
from dnir import passes
from dnir.lowering import registry
from dnir.models import DeltaNetConfig, build_delta_net, random_inputs
from dnir.passes.context import PassContext, Target, any_node
from dnir.passes.fold_widening_casts import narrow_source

HALF_STEP = Target("half-step", {"token_step": any_node}, narrow_operands=frozenset({"token_step"}))
FLOAT32_STEP = Target("float32-step", {"token_step": any_node})

# A decode step on bf16 vectors: v widened then reshaped, beta widened, the state and the rest float32.
BEFORE = """graph(%state: f32[2,4,4], %decay: f32[2,1,1], %kc: f32[2,4,1], %kr: f32[2,1,4], %qr: f32[2,1,4], %v: bf16[2,1,4], %beta: bf16[2,1], %qk: f32[2,1]) {
  %0: f32[2,1,4] = cast(%v) {dtype=f32}
  %1: f32[2,4] = reshape(%0) {shape=[2, 4]}
  %2: f32[2,1] = cast(%beta) {dtype=f32}
  %3: (f32[2,4,4], f32[2,4]) = token_step(%state, %decay, %kc, %kr, %qr, %1, %2, %qk)
  %4: f32[2,4,4] = item(%3) {index=0}
  %5: f32[2,4] = item(%3) {index=1}
  return %4 as state, %5 as o
}"""

EXPECTED = """graph(%state: f32[2,4,4], %decay: f32[2,1,1], %kc: f32[2,4,1], %kr: f32[2,1,4], %qr: f32[2,1,4], %v: bf16[2,1,4], %beta: bf16[2,1], %qk: f32[2,1]) {
  %0: bf16[2,4] = reshape(%v) {shape=[2, 4]}
  %1: (f32[2,4,4], f32[2,4]) = token_step(%state, %decay, %kc, %kr, %qr, %0, %beta, %qk)
  %2: f32[2,4,4] = item(%1) {index=0}
  %3: f32[2,4] = item(%1) {index=1}
  return %2 as state, %3 as o
}"""


def _fold(graph, target):
    with PassContext(target) as ctx:
        folded = passes.optimize(graph, ["fold_widening_casts", "dce"])
    return folded, ctx.remarks


def test_casts_fold_into_a_kernel_that_loads_half_operands():
    folded, remarks = _fold(dnir.parse(BEFORE), HALF_STEP)
    assert dnir.print(folded) == dnir.print(dnir.parse(EXPECTED))
    assert ("fold_widening_casts", "token_step: reads half operands") in remarks


def test_casts_stay_where_the_kernel_loads_only_its_own_dtype():
    graph = dnir.parse(BEFORE)
    kept, remarks = _fold(graph, FLOAT32_STEP)
    assert dnir.print(kept) == dnir.print(graph)
    assert ("fold_widening_casts", "token_step: half operands kept as casts: the token_step kernel of "
                                    "'float32-step' loads no bf16 operands") in remarks
    assert dnir.print(_fold(graph, None)[0]) == dnir.print(graph)         # no target: nothing to ask


def test_folded_and_expanded_compute_what_the_casts_did():
    rng = np.random.default_rng(16)
    graph = dnir.parse(BEFORE)
    folded, _ = _fold(graph, HALF_STEP)
    x = {n: rng.standard_normal(t.shape).astype(dnir.types.numpy_dtype(t.dtype))
         for n, t in zip(graph.input_names, graph.input_types)}
    want = dnir.run(graph, x)
    for got in (dnir.run(folded, x), dnir.run(passes.optimize(folded, ["expand_fused"]), x)):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # the expansion widens the half operands with casts of its own, as the op loads them
    expanded = passes.optimize(folded, ["expand_fused"])
    assert sorted((n.inputs[0].dtype, n.dtype) for n in expanded.topo_order() if n.op == "cast") == \
        [("bf16", "f32"), ("bf16", "f32")]


def test_a_decode_layer_reads_its_bf16_vectors_in_the_step():
    """The bf16 decode layer on a target whose step kernel loads half operands: v, beta and k's
    column reach the step in bf16 (k's head repeat copies bf16); q and k's row are float32
    products (scale, decay) and keep their casts."""
    cfg = DeltaNetConfig("gdn", mode="decode", seq_len=1, batch=3, heads=2, value_heads=4, head_dim=16,
                         value_dim=32, initial_state=True, final_state=True, dtype="bf16")
    graph = passes.optimize(build_delta_net(cfg), "O2")
    with PassContext(HALF_STEP):
        fused = passes.optimize(graph, ["fuse_delta_steps", "fold_widening_casts", "dce"])
    (step,) = [n for n in fused.topo_order() if n.op == "token_step"]
    dtypes = dict(zip(dnir.fused.STEP_ROLES, (i.dtype for i in step.inputs)))
    assert dtypes == {"state": "f32", "decay": "f32", "k_col": "bf16", "k_row": "f32", "q_row": "f32",
                      "v": "bf16", "beta": "bf16", "qk": "f32"}
    x = random_inputs(cfg, 0)
    for a, b in zip(dnir.run(fused, x), dnir.run(graph, x)):
        np.testing.assert_array_equal(a.astype(np.float32), b.astype(np.float32))  # the same float32 arithmetic


def test_the_targets_that_load_half_operands_fold_and_the_others_keep_casts():
    cfg = DeltaNetConfig("kda", mode="decode", seq_len=1, batch=2, heads=2, value_heads=2, head_dim=16,
                         value_dim=32, initial_state=True, final_state=True, dtype="f16")
    graph = passes.optimize(build_delta_net(cfg), "O2")
    with PassContext(HALF_STEP):
        fused = passes.optimize(graph, ["fuse_delta_steps"])
    numpy_step = [n for n in registry.prepare(fused, "numpy").topo_order() if n.op == "token_step"]
    assert numpy_step and "f16" in {i.dtype for i in numpy_step[0].inputs}       # the reference kernel
    # cpu_token_step.py (with the step's prologue: decode_step reads q, k, v and beta as given)
    llvm_step = [n for n in registry.prepare(graph, "llvm").topo_order() if n.op == "decode_step"]
    assert llvm_step and [i.dtype for i in llvm_step[0].inputs] == ["f32", "f16", "f16", "f16", "f32", "f16"]
    with PassContext(FLOAT32_STEP):
        kept = passes.optimize(fused, ["fold_widening_casts"])
    assert {i.dtype for n in kept.topo_order() if n.op == "token_step" for i in n.inputs} == {"f32"}


def test_narrow_source_moves_only_what_commutes_with_the_cast():
    b = dnir.Builder()
    h = b.input("h", (2, 3), "bf16")
    wide = b.cast(h, "f32")
    assert narrow_source(wide) is h
    moved = narrow_source(b.reshape(b.permute(wide, (1, 0)), (6,)))
    assert moved.op == "reshape" and moved.dtype == "bf16" and moved.inputs[0].inputs[0] is h
    assert narrow_source(b.pad(wide, [(0, 1), (0, 0)])).dtype == "bf16"               # zeros are exact
    assert narrow_source(b.pad(wide, [(0, 1), (0, 0)], value=0.1)) is None            # 0.1 is not in bf16
    assert narrow_source(b.mul(wide, 0.5)) is None                                    # arithmetic stays float32
    assert narrow_source(b.cast(b.input("d", (2,), "f64"), "f32")) is None            # a narrowing cast
