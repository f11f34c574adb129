"""recompute_into_reductions: broadcast expansions are recomputed by each matrix-vector reduction (GPU)."""
import dnir
import numpy as np
from dnir import passes
from dnir.models import build_delta_net, preset

SMALL = dict(heads=2, value_heads=2, head_dim=16, value_dim=16, initial_state=True, final_state=True)


def _full_size_readers(graph, size):
    """For every node of `size` elements, how many nodes read it."""
    readers = {}
    for node in graph.topo_order():
        for i in node.inputs:
            if not isinstance(i.type, tuple) and i.type.size == size:
                readers[id(i)] = readers.get(id(i), 0) + 1
    return readers


def test_kda_diagonal_blocks_recompute_their_decay_per_reduction():
    cfg = preset("kimi-linear", seq_len=70, chunk_size=32, **SMALL)
    o2 = passes.optimize(build_delta_net(cfg), "O2")
    after, records = passes.run_pipeline(o2, ["recompute_into_reductions"], validate=True, seed=4)
    decay_size = 1 * 3 * 2 * 16 * 16 * 16          # N, chunks, HV, block, block, K
    assert max(_full_size_readers(o2, decay_size).values()) == 2      # Akk and Aqk share it at O2
    assert max(_full_size_readers(after, decay_size).values()) == 1   # each reduction has its own
    assert after.op_histogram()["sum"] == o2.op_histogram()["sum"] + 4  # 2 blocks x (Akk, Aqk)
    dnir.verify(after)


def test_gdn_has_no_expansion_to_recompute():
    cfg = preset("qwen3-next", seq_len=70, chunk_size=32, **SMALL)
    o2 = passes.optimize(build_delta_net(cfg), "O2")
    after, changed = passes.PASSES["recompute_into_reductions"].fn(o2)
    assert not changed and after is o2


def test_a_stored_operand_is_not_recomputed():
    g = dnir.parse("""graph(%t: f32[2,8,4], %x: f32[2,1,4]) {
  %0: f32[2,8,1] = matmul(%t, %x) {transpose_a=false, transpose_b=true}
  return %0
}""")
    after, changed = passes.PASSES["recompute_into_reductions"].fn(g)
    assert not changed


def test_an_expansion_becomes_a_reduction_with_the_same_values():
    g = dnir.parse("""graph(%a: f32[2,8,1], %b: f32[2,1,4], %x: f32[2,1,4]) {
  %0: f32[2,8,4] = sub(%a, %b)
  %1: f32[2,8,4] = exp(%0)
  %2: f32[2,1,8] = matmul(%x, %1) {transpose_a=false, transpose_b=true}
  %3: f32[2,8,1] = matmul(%1, %x) {transpose_a=false, transpose_b=true}
  return %2, %3
}""")
    after, changed = passes.PASSES["recompute_into_reductions"].fn(g)
    assert changed and after.op_histogram()["matmul"] == 0 and after.op_histogram()["exp"] == 2
    assert passes.validate.compare(g, after, np.random.default_rng(3)) == []
