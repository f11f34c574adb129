"""propagate_layout: golden Before/Expected graphs, the cases it must leave alone,
random layout chains, and the delta-net layers (validated numerically pass by pass)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_models import OPTIONS, config

import dnir
from dnir import passes
from dnir.models import DeltaNetConfig, build_delta_net
from dnir.passes.layout_cost import permute_traffic
from dnir.passes.layout_propagation import propagate_layout
from dnir.passes.validate import compare

GOLDEN = {
    # The chunked layer's idiom: to chunks, batched work, chunk-major for the scan: one permute at the input.
    "to_chunks_then_chunk_major": (
"""graph(%x: f32[1,8,2,3]) {
  %0: f32[1,2,8,3] = permute(%x) {axes=[0, 2, 1, 3]}
  %1: f32[1,2,2,4,3] = reshape(%0) {shape=[1, 2, 2, 4, 3]}
  %2: f32[1,2,2,4,3] = exp(%1)
  %3: f32[1,2,2,4,1] = sum(%2) {axes=[4], keepdims=true}
  %4: f32[1,2,2,4,3] = mul(%2, %3)
  %5: f32[1,2,2,4,4] = matmul(%4, %2) {transpose_a=false, transpose_b=true}
  %6: f32[1,2,2,4,4] = tril(%5) {k=0}
  %7: f32[2,1,2,4,4] = permute(%6) {axes=[2, 0, 1, 3, 4]}
  return %7
}""",
"""graph(%x: f32[1,8,2,3]) {
  %0: f32[2,4,2,3] = reshape(%x) {shape=[2, 4, 2, 3]}
  %1: f32[2,2,4,3] = permute(%0) {axes=[0, 2, 1, 3]}
  %2: f32[1,2,2,4,3] = reshape(%1) {shape=[1, 2, 2, 4, 3]}
  %3: f32[1,2,2,4,3] = exp(%2)
  %4: f32[1,2,2,4,1] = sum(%3) {axes=[4], keepdims=true}
  %5: f32[1,2,2,4,3] = mul(%3, %4)
  %6: f32[1,2,2,4,4] = matmul(%5, %3) {transpose_a=false, transpose_b=true}
  %7: f32[1,2,2,4,4] = tril(%6) {k=0}
  %8: f32[2,1,2,4,4] = reshape(%7) {shape=[2, 1, 2, 4, 4]}
  return %8
}"""),
    # A gate: cumsum on the chunk axis, a slice to the last row, a sum; the cumsum's axis is remapped.
    "cumsum_slice_and_sum": (
"""graph(%g: f32[8,2]) {
  %0: f32[2,8] = permute(%g) {axes=[1, 0]}
  %1: f32[2,2,4] = reshape(%0) {shape=[2, 2, 4]}
  %2: f32[2,2,4] = cumsum(%1) {axis=2}
  %3: f32[2,2,1] = slice(%2) {starts=[0, 0, 3], stops=[2, 2, 4]}
  %4: f32[2,2,4] = sub(%3, %2)
  %5: f32[2,2,4] = exp(%4)
  %6: f32[2,2,4] = permute(%5) {axes=[1, 0, 2]}
  %7: f32[2,2] = sum(%2) {axes=[2], keepdims=false}
  %8: f32[2,2] = permute(%7) {axes=[1, 0]}
  return %6, %8
}""",
"""graph(%g: f32[8,2]) {
  %0: f32[2,4,2] = reshape(%g) {shape=[2, 4, 2]}
  %1: f32[2,2,4] = permute(%0) {axes=[0, 2, 1]}
  %2: f32[2,2,4] = cumsum(%1) {axis=2}
  %3: f32[2,2,1] = slice(%2) {starts=[0, 0, 3], stops=[2, 2, 4]}
  %4: f32[2,2,4] = sub(%3, %2)
  %5: f32[2,2,4] = exp(%4)
  %6: f32[2,2,1] = sum(%2) {axes=[2], keepdims=true}
  %7: f32[2,2] = reshape(%6) {shape=[2, 2]}
  return %5, %7
}"""),
    # A merge between two permutes: split first, and the two compose into a plain reshape.
    "merged_axes": (
"""graph(%x: f32[2,3,4]) {
  %0: f32[4,2,3] = permute(%x) {axes=[2, 0, 1]}
  %1: f32[4,6] = reshape(%0) {shape=[4, 6]}
  %2: f32[6,4] = permute(%1) {axes=[1, 0]}
  return %2
}""",
"""graph(%x: f32[2,3,4]) {
  %0: f32[6,4] = reshape(%x) {shape=[6, 4]}
  return %0
}"""),
}

LEFT_ALONE = {
    # Two different inputs: moving the permute up would copy both.
    "two_sources": """graph(%x: f32[3,4], %y: f32[3,4]) {
  %0: f32[3,4] = add(%x, %y)
  %1: f32[4,3] = permute(%0) {axes=[1, 0]}
  return %1
}""",
    # tril masks the last two axes: a permute that swaps them does not commute with it.
    "tril_transposed": """graph(%x: f32[2,3,3]) {
  %0: f32[2,3,3] = exp(%x)
  %1: f32[2,3,3] = tril(%0) {k=0}
  %2: f32[2,3,3] = permute(%1) {axes=[0, 2, 1]}
  return %2
}""",
    # exp(x) has another reader: it would be computed twice.
    "shared_value": """graph(%x: f32[3,4]) {
  %0: f32[3,4] = exp(%x)
  %1: f32[4,3] = permute(%0) {axes=[1, 0]}
  return %1, %0
}""",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden(name):
    before, expected = (dnir.parse(text) for text in GOLDEN[name])
    after, changed = propagate_layout(before)
    assert changed and dnir.structurally_equal(after, expected), dnir.print(after)
    dnir.verify(after)
    assert compare(before, after, np.random.default_rng(1)) == []
    assert propagate_layout(after) == (after, False)


@pytest.mark.parametrize("name", sorted(LEFT_ALONE))
def test_left_alone(name):
    graph = dnir.parse(LEFT_ALONE[name])
    assert propagate_layout(graph) == (graph, False)


@st.composite
def layout_chains(draw):
    """Chains of ops over a 4-D value (reshapes that split and merge, elementwise with
    broadcast operands, reductions, slices, concats, batched matmuls, masks) with permutes
    anywhere, and some of them at the end."""
    b = dnir.Builder()
    x = b.input("x", (2, 6, 3, 4))
    values = [x]
    for _ in range(draw(st.integers(2, 8))):
        a = draw(st.sampled_from(values))
        kind = draw(st.sampled_from(["permute", "split", "merge", "unary", "broadcast", "sum", "cumsum",
                                     "slice", "concat", "matmul", "tril"]))
        axis = draw(st.integers(0, a.rank - 1))
        if kind == "permute":
            v = b.permute(a, draw(st.permutations(range(a.rank))))
        elif kind == "split" and a.shape[axis] in (4, 6):
            v = b.reshape(a, a.shape[:axis] + (2, a.shape[axis] // 2) + a.shape[axis + 1:])
        elif kind == "merge" and axis + 1 < a.rank and a.rank > 2:
            v = b.reshape(a, a.shape[:axis] + (a.shape[axis] * a.shape[axis + 1],) + a.shape[axis + 2:])
        elif kind == "unary":
            v = b.exp(b.neg(b.mul(a, a)))
        elif kind == "broadcast":   # an operand with size-1 and missing axes
            v = b.mul(a, b.sum(a[(0,) * draw(st.integers(0, a.rank - 2))], axis=-1, keepdims=True))
        elif kind == "sum" and a.rank > 2:
            v = b.sum(a, axis=axis, keepdims=draw(st.booleans()))
        elif kind == "cumsum":
            v = b.cumsum(a, axis=axis)
        elif kind == "slice" and a.shape[axis] > 1:
            v = b.slice_axis(a, axis, 1, a.shape[axis])
        elif kind == "concat":
            v = b.concat([a, b.exp(a)], axis=axis)
        elif kind == "matmul":
            v = b.matmul(a, a, transpose_b=True)
        elif kind == "tril" and a.shape[-1] == a.shape[-2]:
            v = b.tril(a, -1)
        else:
            continue
        values.append(v)
    last = [b.permute(v, draw(st.permutations(range(v.rank)))) for v in values[-2:]]
    return b.build(last + draw(st.lists(st.sampled_from(values), max_size=1)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=layout_chains(), seed=st.integers(0, 2**16))
def test_random_layout_chains_keep_results_and_lose_permutes(graph, seed):
    after, changed = propagate_layout(graph)
    assert after.input_types == graph.input_types and after.output_types == graph.output_types
    dnir.verify(after)
    assert compare(graph, after, np.random.default_rng(seed)) == []
    if changed:
        (count, elements), (count0, elements0) = permute_traffic(after), permute_traffic(graph)
        assert count < count0 or elements < elements0
    else:
        assert after is graph


BEFORE = passes.PIPELINES["O2"][:passes.PIPELINES["O2"].index("propagate_layout")]
CHUNKED = {
    "gdn-chunked": config("gdn-chunked"), "kda-chunked-c32-state": config("kda-chunked-c32-state"),
    "gdn-blocked": config("gdn-blocked"), "kda-blocked": config("kda-blocked"),
    "kda-batch2-gqa": DeltaNetConfig("kda", batch=2, seq_len=32, heads=1, value_heads=2, head_dim=4,
                                     value_dim=4, chunk_size=16, initial_state=True, final_state=True),
}


@pytest.mark.parametrize("name", sorted(CHUNKED))
def test_chunked_layers_keep_one_permute_per_input_and_output(name):
    cfg = CHUNKED[name]
    o0 = build_delta_net(cfg)
    before, _ = passes.run_pipeline(o0, BEFORE, options=OPTIONS)
    after, records = passes.run_pipeline(before, ["propagate_layout"], validate=True, seed=2)
    assert records[-1].changed
    assert permute_traffic(after)[0] == len(cfg.input_shapes()) - cfg.initial_state + 1 <= permute_traffic(o0)[0] / 2


@pytest.mark.parametrize("name", ["gdn-varlen", "kda-recurrent", "gdn-decode"])
def test_other_layers_keep_results_and_never_gain_permutes(name):
    before, _ = passes.run_pipeline(build_delta_net(config(name)), BEFORE, options=OPTIONS)
    after, _ = passes.run_pipeline(before, ["propagate_layout"], validate=True, seed=4)
    assert permute_traffic(after)[0] <= permute_traffic(before)[0]


@pytest.mark.parametrize("text", [
    """graph(%x: f32[3,3]) {
  %0: f32[3,3] = permute(%x) {axes=[1, 0]}
  %1: f32[3,3] = tril(%0) {k=0}
  return %1
}""",
    """graph(%x: f32[2,3,3]) {
  %0: f32[2,3,3] = exp(%x)
  %1: f32[2,3,3] = triu(%0) {k=1}
  %2: f32[2,3,3] = permute(%1) {axes=[0, 2, 1]}
  return %2
}"""])
def test_masks_do_not_commute_with_a_transpose_of_their_last_two_axes(text):
    graph = dnir.parse(text)
    for name in ("eliminate_transposes", "propagate_layout"):
        after, _ = passes.PASSES[name].fn(graph)
        assert compare(graph, after, np.random.default_rng(3)) == [], name
