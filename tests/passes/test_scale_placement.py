"""reassociate_scales' matmul rule: a per-contracted-index scale moves to the smaller operand."""
import dnir
import numpy as np
import pytest
from dnir import passes
from dnir.lowering.numpy_backend import run


def _args(graph, rng):
    return {n.attrs["name"]: rng.standard_normal(n.shape).astype(np.float32) for n in graph.inputs}


@pytest.mark.parametrize("text", [
    # W = T (k beta): T [.., C, C] is smaller than k [.., C, K]; beta one per row of k
    """graph(%t: f32[3,8,8], %k: f32[3,8,16], %beta: f32[3,8,1]) {
  %0: f32[3,8,16] = mul(%k, %beta)
  %1: f32[3,8,16] = matmul(%t, %0) {transpose_a=false, transpose_b=false}
  return %1
}""",
    # the scaled operand on the left, transposed: its contracted axis is -2
    """graph(%t: f32[3,8,8], %k: f32[3,8,16], %beta: f32[3,8,1]) {
  %0: f32[3,8,16] = mul(%beta, %k)
  %1: f32[3,16,8] = matmul(%0, %t) {transpose_a=true, transpose_b=false}
  return %1
}""",
])
def test_scale_moves_to_the_smaller_operand(text):
    rng = np.random.default_rng(11)
    before = dnir.parse(text)
    after, records = passes.run_pipeline(before, ["reassociate_scales"], validate=True, seed=3)
    mm = after.outputs[0]
    assert mm.op == "matmul" and {i.op for i in mm.inputs} == {"mul", "input"}
    scaled = next(i for i in mm.inputs if i.op == "mul")
    assert scaled.shape == (3, 8, 8)                 # the C x C operand is scaled, not the C x K one
    args = _args(before, rng)
    np.testing.assert_allclose(run(after, args)[0], run(before, args)[0], rtol=1e-5, atol=1e-5)
    dnir.verify(after)


@pytest.mark.parametrize("text", [
    # the other operand is the larger one: scaling it would cost more
    """graph(%t: f32[3,32,8], %k: f32[3,8,4], %beta: f32[3,8,1]) {
  %0: f32[3,8,4] = mul(%k, %beta)
  %1: f32[3,32,4] = matmul(%t, %0) {transpose_a=false, transpose_b=false}
  return %1
}""",
    # the scaled value has another reader: it is computed anyway
    """graph(%t: f32[3,8,8], %k: f32[3,8,16], %beta: f32[3,8,1]) {
  %0: f32[3,8,16] = mul(%k, %beta)
  %1: f32[3,8,16] = matmul(%t, %0) {transpose_a=false, transpose_b=false}
  %2: f32[3,8,16] = add(%1, %0)
  return %2
}""",
    # a scale along the free axis (one per column of k) is not a scale of the contraction
    """graph(%t: f32[3,8,8], %k: f32[3,8,16], %s: f32[3,1,16]) {
  %0: f32[3,8,16] = mul(%k, %s)
  %1: f32[3,8,16] = matmul(%t, %0) {transpose_a=false, transpose_b=false}
  return %1
}""",
])
def test_scale_stays_where_moving_it_does_not_pay(text):
    before = dnir.parse(text)
    after, changed = passes.PASSES["reassociate_scales"].fn(before)
    assert not changed and after is before
