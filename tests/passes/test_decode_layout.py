"""The delta rule's state keeps its stored layout S [.., K, V] through O2: the
O0 graph carries it transposed (ggml's S^T), and the transpose passes remove
every state-sized permute, in decode and inside and around the recurrent scan."""
import numpy as np
import pytest

import dnir
from dnir import passes, run
from dnir.models import build_delta_net, delta_rule_reference, preset, relative_rms_error
from dnir.passes.carry_layout import relayout_scan_carries
from dnir.passes.layout_cost import permute_traffic
from dnir.passes.transposes import eliminate_transposes

PRESETS = ["qwen3-next", "kimi-linear"]
SMALL = dict(heads=2, value_heads=4, head_dim=8, value_dim=4)   # GQA for qwen3-next; K != V


def nodes(graph):
    for node in graph.topo_order():
        yield node
        if node.op == "scan":
            yield from nodes(node.attrs["body"])


def state_permutes(graph, state_size):
    return [n for n in nodes(graph) if n.op == "permute" and n.type.size == state_size]


def draw(cfg, rng, gate=(0.01, 1.0)):
    shapes = cfg.input_shapes()
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    x = dict(q=unit(rng.standard_normal(shapes["q"])), k=unit(rng.standard_normal(shapes["k"])),
             v=rng.standard_normal(shapes["v"]), g=-rng.uniform(*gate, shapes["g"]),
             beta=rng.uniform(0.05, 0.95, shapes["beta"]),
             initial_state=rng.standard_normal(shapes["initial_state"]))
    return {n: a.astype(np.float32) for n, a in x.items()}


def check_against_oracle(cfg, graph, x):
    o, state = run(graph, [x[n] for n in graph.input_names])
    o_ref, s_ref = delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=cfg.scale,
                                        initial_state=x["initial_state"], cu_seqlens=cfg.cu_seqlens)
    assert relative_rms_error(o, o_ref) < 1e-5
    assert relative_rms_error(state, s_ref) < 1e-5


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", PRESETS)
def test_decode_reads_the_state_as_stored(name, batch):
    cfg = preset(name, batch=batch, seq_len=1, mode="decode", initial_state=True, final_state=True)
    o0 = build_delta_net(cfg)
    state = o0.inputs[o0.input_names.index("initial_state")]
    assert state_permutes(o0, state.type.size)       # the reference form carries S^T
    o2 = passes.optimize(o0, "O2")
    assert not state_permutes(o2, state.type.size)
    K, V = state.shape[-2:]
    products = [n for n in nodes(o2) if n.op == "matmul"]
    assert len(products) == 2                        # S^T k and S^T q as k^T S and q^T S
    for mm in products:
        row, matrix = mm.inputs
        assert row.shape[-2:] == (1, K) and matrix.shape[-2:] == (K, V) and matrix.type.size == state.type.size
        assert not mm.attrs["transpose_a"] and not mm.attrs["transpose_b"]
    (update,) = [n for n in nodes(o2) if n.op == "mul" and n.type.size == state.type.size and
                 all(i.type.size < n.type.size for i in n.inputs)]
    assert sorted(i.shape[-2:] for i in update.inputs) == sorted([(K, 1), (1, V)])   # k u^T
    check_against_oracle(cfg, o2, draw(cfg, np.random.default_rng(batch + len(name))))


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_recurrent_scan_carries_the_state_untransposed(name, varlen):
    shape = dict(batch=1, seq_len=11, cu_seqlens=(0, 4, 5, 11)) if varlen else dict(batch=3, seq_len=7)
    cfg = preset(name, mode="recurrent", initial_state=True, final_state=True, **SMALL, **shape)
    o0 = build_delta_net(cfg)
    state_size = o0.inputs[o0.input_names.index("initial_state")].type.size
    o2, _ = passes.run_pipeline(o0, "O2", validate=True, seed=1)
    assert not state_permutes(o2, state_size)
    bodies = [n.attrs["body"] for n in o2.topo_order() if n.op == "scan"]
    assert bodies and all(b.op_histogram()["permute"] == 0 for b in bodies)
    (count, moved), (count0, moved0) = permute_traffic(o2), permute_traffic(o0)
    assert count < count0 and moved < moved0
    rng = np.random.default_rng(11 + varlen)
    check_against_oracle(cfg, o2, draw(cfg, rng, gate=(2.0, 20.0)))   # strong gates: exp(g) down to 2e-9


def graph(text):
    g = dnir.parse(text)
    dnir.verify(g)
    return g


def validated(before, pass_name):
    after, records = passes.run_pipeline(before, [pass_name], validate=True, seed=5)
    assert records[-1].changed
    return after


SHARED_PERMUTE = """graph(%s: f32[2,3,4], %k: f32[2,1,3], %u: f32[2,1,4], %w: f32[2,1,1]) {
  %0: f32[2,4,3] = permute(%s) {axes=[0, 2, 1]}
  %1: f32[2,4,3] = mul(%0, %w)
  %2: f32[2,4,1] = matmul(%1, %k) {transpose_a=false, transpose_b=true}
  %3: f32[2,4,1] = permute(%u) {axes=[0, 2, 1]}
  %4: f32[2,4,3] = mul(%3, %k)
  %5: f32[2,4,3] = add(%1, %4)
  %6: f32[2,3,4] = permute(%5) {axes=[0, 2, 1]}
  return %2 as y, %6 as s
}"""


def test_a_permute_read_twice_sinks_into_both_readers_and_cancels():
    """S^T = P(S) read by a matmul and by an update whose result goes back through P^-1:
    no permute is left, and the matrix-vector product reads S as stored."""
    after = validated(graph(SHARED_PERMUTE), "eliminate_transposes")
    assert after.op_histogram()["permute"] == 0
    (mm,) = [n for n in after.topo_order() if n.op == "matmul"]
    assert mm.inputs[1].shape == (2, 3, 4) and not mm.attrs["transpose_a"] and not mm.attrs["transpose_b"]
    assert mm.shape == (2, 1, 4)


def test_a_permute_whose_readers_cannot_take_it_stays():
    """The second reader (exp, an output) would need its own copy: sinking would not pay."""
    before = graph("""graph(%s: f32[2,3,4], %k: f32[2,1,3]) {
  %0: f32[2,4,3] = permute(%s) {axes=[0, 2, 1]}
  %1: f32[2,4,3] = mul(%0, %k)
  %2: f32[2,4,3] = exp(%0)
  return %1, %2
}""")
    after, changed = eliminate_transposes(before)
    assert not changed and after is before


def test_sum_of_a_permute_sums_the_stored_axes():
    after = validated(graph("""graph(%s: f32[2,3,4]) {
  %0: f32[4,2,3] = permute(%s) {axes=[2, 0, 1]}
  %1: f32[4,3] = sum(%0) {axes=[1], keepdims=false}
  return %1
}"""), "eliminate_transposes")
    summed = [n for n in after.topo_order() if n.op == "sum"]
    assert [n.inputs[0].op for n in summed] == ["input"] and summed[0].attrs["axes"] == (0,)
    assert permute_traffic(after)[1] == 12        # the permute moves the 12 sums, not the 24 inputs


def test_sum_of_product_over_the_rows_of_a_matrix_is_a_vector_matrix_product():
    before = graph("""graph(%s: f32[2,8,4], %k: f32[2,8,1]) {
  %0: f32[2,8,4] = mul(%s, %k)
  %1: f32[2,4] = sum(%0) {axes=[1], keepdims=false}
  return %1
}""")
    after = passes.optimize(before, ["sum_mul_to_matmul", "eliminate_transposes", "remove_identities"])
    (mm,) = [n for n in after.topo_order() if n.op == "matmul"]
    assert mm.inputs[0].shape == (2, 1, 8) and mm.inputs[1].op == "input"   # k^T S, S as stored
    assert not mm.attrs["transpose_a"] and not mm.attrs["transpose_b"]
    validated(before, "sum_mul_to_matmul")


def test_slices_and_concat_of_permutes():
    """Each slice of P(x) is P of a slice of x; the parts' P(.) join into one P after concat."""
    after = validated(graph("""graph(%x: f32[4,3,2]) {
  %0: f32[2,3,4] = permute(%x) {axes=[2, 1, 0]}
  %1: f32[2,3,1] = slice(%0) {starts=[0, 0, 0], stops=[2, 3, 1]}
  %2: f32[2,3,3] = slice(%0) {starts=[0, 0, 1], stops=[2, 3, 4]}
  %3: f32[2,3,1] = exp(%1)
  %4: f32[2,3,3] = exp(%2)
  %5: f32[2,3,4] = concat(%3, %4) {axis=2}
  %6: f32[4,3,2] = permute(%5) {axes=[2, 1, 0]}
  return %6
}"""), "eliminate_transposes")
    assert after.op_histogram()["permute"] == 0


SCAN = """graph(%s0: f32[3,4], %xs: f32[5,3]) {
  %0: f32[4,3] = permute(%s0) {axes=[1, 0]}
  %1: (f32[4,3], f32[5,4]) = scan(%0, %xs) {length=5, num_carry=1, num_xs=1} body(%st: f32[4,3], %x: f32[3]) {
    %0: f32[1,3] = reshape(%x) {shape=[1, 3]}
    %1: f32[4,1] = matmul(%st, %0) {transpose_a=false, transpose_b=true}
    %2: f32[4] = reshape(%1) {shape=[4]}
    %3: f32[4,1] = reshape(%2) {shape=[4, 1]}
    %4: f32[4,3] = mul(%3, %0)
    %5: f32[4,3] = sub(%st, %4)
    return %5 as st, %2 as y
  }
  %2: f32[4,3] = item(%1) {index=0}
  %3: f32[3,4] = permute(%2) {axes=[1, 0]}
  %4: f32[5,4] = item(%1) {index=1}
  return %3 as s, %4 as y
}"""


def test_a_scan_carries_its_state_in_the_layout_it_is_given():
    before = graph(SCAN)
    after = validated(before, "relayout_scan_carries")
    assert permute_traffic(after) == (0, 0)
    (scan,) = [n for n in after.topo_order() if n.op == "scan"]
    assert scan.inputs[0].op == "input" and scan.attrs["body"].inputs[0].shape == (3, 4)


def test_a_carry_whose_body_needs_the_permuted_layout_stays():
    """The body returns exp(S^T) as a per-step output too: carrying S would copy every step."""
    before = graph(SCAN.replace("return %5 as st, %2 as y", "%6: f32[4,3] = exp(%5)\n    return %5 as st, %6 as y")
                   .replace("f32[5,4]", "f32[5,4,3]"))
    after, changed = relayout_scan_carries(before)
    assert not changed and after is before
