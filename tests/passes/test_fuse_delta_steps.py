"""Golden Before/Expected tests of the delta-step recognisers (passes/fuse_delta_steps.py), a near
miss of each (one changed operand) that must not match, and expand_fused taking the fused ops
back to primitives."""
from __future__ import annotations

import numpy as np
import pytest

import dnir
from dnir import passes
from dnir.models import build_delta_net, preset
from dnir.passes.context import PassContext, Target, any_node

# A target with a kernel for both fused ops that takes every node: what the rules match, alone.
EVERYTHING = Target("test", {"chunk_scan": any_node, "token_step": any_node})

# The chunk step with its operands commuted (the decay product, both adds) and the scan's
# per-chunk operands in another order than the op's (u before w).
CHUNK_BEFORE = """graph(%s0: f32[2,4,4], %u: f32[3,2,2,4], %w: f32[3,2,2,4], %qd: f32[3,2,2,4], %aqk: f32[3,2,2,2], %kte: f32[3,2,2,4], %ld: f32[3,2,1,1]) {
  %0: (f32[2,4,4], f32[3,2,2,4]) = scan(%s0, %u, %w, %qd, %aqk, %kte, %ld) {length=3, num_carry=1, num_xs=6} body(%s: f32[2,4,4], %u: f32[2,2,4], %w: f32[2,2,4], %qd: f32[2,2,4], %aqk: f32[2,2,2], %kte: f32[2,2,4], %ld: f32[2,1,1]) {
    %0: f32[2,2,4] = matmul(%w, %s) {transpose_a=false, transpose_b=false}
    %1: f32[2,2,4] = sub(%u, %0)
    %2: f32[2,4,4] = matmul(%kte, %1) {transpose_a=true, transpose_b=false}
    %3: f32[2,4,4] = mul(%ld, %s)
    %4: f32[2,4,4] = add(%2, %3)
    %5: f32[2,2,4] = matmul(%aqk, %1) {transpose_a=false, transpose_b=false}
    %6: f32[2,2,4] = matmul(%qd, %s) {transpose_a=false, transpose_b=false}
    %7: f32[2,2,4] = add(%5, %6)
    return %4 as state, %7 as o
  }
  %1: f32[2,4,4] = item(%0) {index=0}
  %2: f32[3,2,2,4] = item(%0) {index=1}
  return %1 as state, %2 as o
}"""

CHUNK_EXPECTED = """graph(%s0: f32[2,4,4], %u: f32[3,2,2,4], %w: f32[3,2,2,4], %qd: f32[3,2,2,4], %aqk: f32[3,2,2,2], %kte: f32[3,2,2,4], %ld: f32[3,2,1,1]) {
  %0: (f32[2,4,4], f32[3,2,2,4]) = chunk_scan(%s0, %w, %u, %qd, %aqk, %kte, %ld)
  %1: f32[2,4,4] = item(%0) {index=0}
  %2: f32[3,2,2,4] = item(%0) {index=1}
  return %1 as state, %2 as o
}"""

# A decode step as the O2 graph writes it (reshapes between the vectors' shapes), operands commuted.
STEP_BEFORE = """graph(%q: f32[2,4], %k: f32[2,4], %v: f32[2,4], %a: f32[2,1,1], %beta: f32[2,1], %state: f32[2,4,4]) {
  %0: f32[2,1,4] = reshape(%k) {shape=[2, 1, 4]}
  %1: f32[2,1,4] = matmul(%0, %state) {transpose_a=false, transpose_b=false}
  %2: f32[2,4] = reshape(%1) {shape=[2, 4]}
  %3: f32[2,4] = sub(%v, %2)
  %4: f32[2,4] = mul(%beta, %3)
  %5: f32[2,1,4] = reshape(%q) {shape=[2, 1, 4]}
  %6: f32[2,1,4] = matmul(%5, %state) {transpose_a=false, transpose_b=false}
  %7: f32[2,4] = reshape(%6) {shape=[2, 4]}
  %8: f32[2,4] = mul(%q, %k)
  %9: f32[2,1] = sum(%8) {axes=[-1], keepdims=true}
  %10: f32[2,4] = mul(%4, %9)
  %11: f32[2,4] = add(%10, %7)
  %12: f32[2,4,4] = mul(%a, %state)
  %13: f32[2,1,4] = reshape(%4) {shape=[2, 1, 4]}
  %14: f32[2,4,1] = reshape(%k) {shape=[2, 4, 1]}
  %15: f32[2,4,4] = mul(%14, %13)
  %16: f32[2,4,4] = add(%12, %15)
  return %11 as o, %16 as state
}"""

STEP_EXPECTED = """graph(%q: f32[2,4], %k: f32[2,4], %v: f32[2,4], %a: f32[2,1,1], %beta: f32[2,1], %state: f32[2,4,4]) {
  %0: f32[2,4,1] = reshape(%k) {shape=[2, 4, 1]}
  %1: f32[2,1,4] = reshape(%k) {shape=[2, 1, 4]}
  %2: f32[2,1,4] = reshape(%q) {shape=[2, 1, 4]}
  %3: f32[2,4] = mul(%q, %k)
  %4: f32[2,1] = sum(%3) {axes=[-1], keepdims=true}
  %5: (f32[2,4,4], f32[2,4]) = token_step(%state, %a, %0, %1, %2, %v, %beta, %4)
  %6: f32[2,4] = item(%5) {index=1}
  %7: f32[2,4,4] = item(%5) {index=0}
  return %6 as o, %7 as state
}"""

CASES = {"chunk_scan": (CHUNK_BEFORE, CHUNK_EXPECTED), "token_step": (STEP_BEFORE, STEP_EXPECTED)}
WHAT = {"chunk_scan": "the scan over 3 chunks", "token_step": "decode step"}     # as the remarks name them

# One changed operand each: w S reads q_decayed (w then plays no part); the state update's outer
# product reads the error before beta (v - k S) instead of u.
NEAR_MISSES = {
    "chunk_scan": CHUNK_BEFORE.replace("matmul(%w, %s)", "matmul(%qd, %s)"),
    "token_step": STEP_BEFORE.replace("reshape(%4) {shape=[2, 1, 4]}", "reshape(%3) {shape=[2, 1, 4]}"),
}


def fuse(graph, target=EVERYTHING):
    with PassContext(target) as ctx:
        after, changed = passes.PASSES["fuse_delta_steps"].fn(graph)
    return after, changed, ctx.remarks


@pytest.mark.parametrize("op", sorted(CASES))
def test_recogniser_rewrites_to_expected(op):
    before, expected = (dnir.parse(text) for text in CASES[op])
    after, changed, remarks = fuse(before)
    assert changed and remarks == [("fuse_delta_steps", f"{op} fused ({WHAT[op]})")]
    assert dnir.structurally_equal(after, expected), dnir.print(after)
    dnir.verify(after)
    assert passes.validate.compare(before, after, np.random.default_rng(7)) == []
    again, changed, _ = fuse(expected)
    assert not changed and again is expected


@pytest.mark.parametrize("op", sorted(NEAR_MISSES))
def test_near_miss_is_not_fused(op):
    near = dnir.parse(NEAR_MISSES[op])
    assert dnir.print(near) != dnir.print(dnir.parse(CASES[op][0]))
    after, changed, remarks = fuse(near)
    assert not changed and after is near
    assert remarks == [("fuse_delta_steps", "no loop over chunks or decode step in the graph")]


@pytest.mark.parametrize("op", sorted(CASES))
def test_nothing_is_fused_without_a_target_or_its_kernel(op):
    before = dnir.parse(CASES[op][0])
    after, changed = passes.PASSES["fuse_delta_steps"].fn(before)          # the default context
    assert not changed and after is before
    other = "token_step" if op == "chunk_scan" else "chunk_scan"
    after, changed, remarks = fuse(before, Target("half", {other: any_node}))
    assert not changed and remarks == [("fuse_delta_steps", f"{op} not fused: target 'half' has no {op} kernel "
                                                            f"({WHAT[op]})")]


@pytest.mark.parametrize("op", sorted(CASES))
def test_expand_fused_rebuilds_primitives_with_the_same_results(op):
    fused = dnir.parse(CASES[op][1])
    expanded, changed = passes.PASSES["expand_fused"].fn(fused)           # no target: every fused op expands
    assert changed and not {"chunk_scan", "token_step"} & set(expanded.op_histogram())
    assert passes.validate.compare(fused, expanded, np.random.default_rng(3)) == []
    with PassContext(EVERYTHING):
        kept, changed = passes.PASSES["expand_fused"].fn(fused)
    assert not changed and kept is fused


@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
def test_chunk_scan_expands_to_the_scan_it_replaced(name):
    cfg = preset(name, heads=2, value_heads=2, head_dim=16, value_dim=16, seq_len=100, initial_state=True,
                 final_state=True)
    o2 = passes.optimize(build_delta_net(cfg), "O2")
    fused, changed, _ = fuse(o2)
    assert changed and fused.op_histogram()["chunk_scan"] == 1
    expanded, _ = passes.PASSES["expand_fused"].fn(fused)
    assert dnir.structurally_equal(expanded, o2)
