"""The memory planner: known optimal peaks on hand-written graphs, views, in-place
updates, scans, the allocator, and a checker that rejects corrupted plans."""
import numpy as np
import pytest
from analysis_graphs import random_graphs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnir
from dnir.analysis.allocate import ALIGN, assign_offsets, lower_bound
from dnir.analysis.memory import Block, Loc, PlanError, check_plan, plan
from dnir.models import build
from dnir.passes import optimize

F32 = 4


def planned(graph):
    return check_plan(plan(graph))


def test_elementwise_chain_runs_in_place():
    b = dnir.Builder()
    x = b.input("x", (32, 64))
    y = b.sigmoid(b.add(b.neg(b.exp(b.cont(x))), 1.0))       # each op dies into the next
    mp = planned(b.build(y))
    assert mp.peak_bytes == 32 * 64 * F32 + F32            # one buffer, plus the scalar const
    assert mp.offset(y) == mp.offset(y.inputs[0])


def test_matmul_chain_needs_two_buffers():
    b = dnir.Builder()
    x, w = b.input("x", (64, 64)), b.input("w", (64, 64))
    y = x
    for _ in range(5):
        y = b.matmul(y, w)                                   # not in place: operand and result coexist
    mp = planned(b.build(y))
    assert mp.peak_bytes == mp.lower_bound == 2 * 64 * 64 * F32


def test_inputs_and_views_of_them_are_not_in_the_arena():
    b = dnir.Builder()
    x = b.input("x", (8, 16))
    r = b.reshape(x, (128,))
    s = b.slice_axis(x, 0, 2, 4)                             # rows 2..3: contiguous
    mp = planned(b.build([r, s]))
    assert mp.peak_bytes == 0 and mp.offset(r) is None and mp.offset(s) is None
    assert mp.loc(s) == Loc("input:x", 2 * 16 * F32)


def test_contiguous_slice_is_a_view_strided_slice_is_a_copy():
    b = dnir.Builder()
    x = b.exp(b.input("x", (8, 16)))
    rows = b.slice_axis(x, 0, 2, 4)                          # contiguous
    cols = b.slice_axis(x, 1, 0, 4)                          # strided: a copy of 8 x 4
    mp = planned(b.build([rows, cols]))
    assert mp.offset(rows) == mp.offset(x) + 2 * 16 * F32
    assert mp.peak_bytes == 8 * 16 * F32 + 8 * 4 * F32


def test_strided_views_keep_rows_contiguous_and_are_never_outputs_or_written_over():
    """A permute or strided slice read by a matmul or an elementwise op is a view of its
    operand (no bytes of its own); a transpose of the last axis, an output, and a scan
    operand are copies; no op writes in place over a strided view."""
    b = dnir.Builder()
    x = b.exp(b.input("x", (4, 8, 16)))
    heads = b.permute(x, (1, 0, 2))                          # [8, 4, 16], rows of 16 still contiguous
    out = b.permute(x, (1, 0, 2))                            # the same, as an output
    cols = b.slice_axis(x, 2, 0, 8)                          # strided rows of 8
    flipped = b.permute(x, (0, 2, 1))                        # columns apart: a copy
    y = b.add(b.matmul(heads, heads, transpose_b=True), 1.0)
    z = b.neg(cols)                                          # same type would allow in place; not over a view
    mp = planned(b.build([y, z, b.exp(flipped), out]))
    views = mp.views
    assert views[id(heads)] == (16, 128, 1) and views.get(id(out)) is None    # an output: dense
    assert views[id(cols)] == (128, 16, 1)
    assert id(flipped) not in views
    assert mp.loc(cols).base is mp.loc(x).base and mp.loc(z).base is not mp.loc(x).base
    graph = mp.graph
    rng = np.random.default_rng(0)
    from dnir.lowering.numpy_arena import run_planned
    from dnir.lowering.numpy_backend import run
    arg = rng.standard_normal((4, 8, 16)).astype(np.float32)
    for got, want in zip(run_planned(graph, {"x": arg}, mp)[0], run(graph, {"x": arg})):
        np.testing.assert_array_equal(got, want)

    mp.locs[id(z)] = mp.loc(cols)                            # in place over the strided view
    with pytest.raises(PlanError):
        check_plan(mp)


def test_checker_rejects_a_strided_output():
    b = dnir.Builder()
    x = b.exp(b.input("x", (4, 8, 16)))
    t = b.permute(x, (1, 0, 2))
    mp = planned(b.build([b.neg(t), t]))
    src = mp.loc(x)
    mp.views[id(t)] = (16, 128, 1)                           # claim the output is a strided view
    mp.locs[id(t)] = Loc(src.base, src.offset)
    with pytest.raises(PlanError, match="strided view and an output"):
        check_plan(mp)


def test_allocator_finds_the_known_optimum():
    """A (2U) and C (2U) live with B (1U); then D (4U) lives with B. Placed in program
    order B lands between A and C and D must go on top (7U); the optimum is 5U (B at
    the edge), which the by-size order finds."""
    from dnir.analysis.allocate import _place
    u = 4096
    blocks = [Block(2 * u, 0, 2, "A"), Block(u, 1, 4, "B"), Block(2 * u, 2, 2, "C"), Block(4 * u, 3, 4, "D")]
    in_time = _place(sorted(blocks, key=lambda b: b.start))
    assert max(in_time[id(b)] + b.nbytes for b in blocks) == 7 * u
    assert assign_offsets(blocks) == lower_bound(blocks) == 5 * u


def test_set_and_acc_assemble_in_place():
    b = dnir.Builder()
    x = b.input("x", (4, 64, 64))
    z = b.zeros((4, 128, 128))
    for i in range(2):
        for j in range(2):
            blk = b.exp(x)
            z = b.set(z, blk, (0, 64 * i, 64 * j)) if (i + j) % 2 else b.acc(z, blk, (0, 64 * i, 64 * j))
    mp = planned(b.build(z))
    big, block = 4 * 128 * 128 * F32, 4 * 64 * 64 * F32
    assert mp.peak_bytes == mp.lower_bound == big + block   # one destination, one block at a time
    assert len({mp.offset(n) for n in mp.graph.topo_order() if n.op in ("set", "acc")}) == 1


def test_set_does_not_overwrite_a_destination_still_needed():
    b = dnir.Builder()
    z = b.exp(b.input("x", (64, 64)))
    w = b.set(z, b.full((8, 64), 1.0), (0, 0))
    mp = planned(b.build([w, b.neg(z)]))                     # z is read after the set
    assert mp.offset(w) != mp.offset(z)


def _accumulating_scan(length):
    bb = dnir.Builder()
    s, x, w = bb.input("s", (32, 32)), bb.input("x", (32, 32)), bb.input("w", (32, 32))
    s_new = bb.add(bb.mul(s, 0.5), bb.matmul(x, w))
    body = bb.build([s_new, bb.sum(s_new, 1)])
    b = dnir.Builder()
    xs, w, s0 = b.input("xs", (length, 32, 32)), b.input("w", (32, 32)), b.input("s0", (32, 32))
    s, ys = b.scan(body, [b.exp(s0)], [xs], [w])
    return b.build([s, ys]), s


@pytest.mark.parametrize("length", [3, 40])
def test_scan_body_is_planned_once(length):
    graph, final = _accumulating_scan(length)
    mp = planned(graph)
    (sp,) = mp.scans.values()
    state, ys = 32 * 32 * F32, length * 32 * F32
    # The exp'd initial state dies at the scan: the loop updates it in place.
    assert mp.offset(final) == mp.offset(final.inputs[0].inputs[0])
    # The body's arena does not grow with the length; the new state goes straight into the carry.
    assert sp.body.loc(sp.body.graph.outputs[0]) == Loc("carry:0")
    assert sp.body.loc(sp.body.graph.outputs[1]) == Loc("ys:0")
    assert sp.arena.nbytes == sp.body.peak_bytes <= 2 * state + 2 * ALIGN
    assert mp.peak_bytes <= state + -(-ys // ALIGN) * ALIGN + sp.arena.nbytes


def test_swapped_carries_go_through_staging():
    bb = dnir.Builder()
    a, c = bb.input("a", (4, 4)), bb.input("c", (4, 4))
    body = bb.build([c, a])                                  # swap the two carries each step
    b = dnir.Builder()
    a0, c0 = b.input("a0", (4, 4)), b.input("c0", (4, 4))
    fa, fc = b.scan(body, [b.exp(a0), b.neg(c0)], length=3)
    mp = planned(b.build([fa, fc]))
    (sp,) = mp.scans.values()
    assert set(sp.body.stages) == {0, 1}
    from dnir.lowering.numpy_arena import run_planned
    rng = np.random.default_rng(1)
    inputs = {"a0": rng.standard_normal((4, 4)), "c0": rng.standard_normal((4, 4))}
    outs, _ = run_planned(mp.graph, inputs, mp)
    np.testing.assert_array_equal(outs[0], -inputs["c0"].astype(np.float32))      # three swaps
    np.testing.assert_array_equal(outs[1], np.exp(inputs["a0"].astype(np.float32)))


# -- the checker ---------------------------------------------------------------

def _two_live_blocks():
    b = dnir.Builder()
    x = b.input("x", (16, 16))
    p, q = b.exp(x), b.neg(x)
    return planned(b.build(b.matmul(p, q)))


def test_checker_rejects_overlapping_blocks():
    mp = _two_live_blocks()
    p_block, q_block = (mp.loc(n).base for n in mp.graph.outputs[0].inputs)
    q_block.offset = p_block.offset                           # both live at the matmul
    with pytest.raises(PlanError, match="overlap"):
        check_plan(mp)


def test_checker_rejects_a_false_in_place_update():
    mp = _two_live_blocks()
    mm = mp.graph.outputs[0]
    mp.locs[id(mm)] = mp.loc(mm.inputs[0])                    # matmul cannot write over its operand
    with pytest.raises(PlanError):
        check_plan(mp)


def test_checker_rejects_writes_into_inputs_and_bad_order():
    mp = _two_live_blocks()
    p = mp.graph.outputs[0].inputs[0]
    saved = mp.locs[id(p)]
    mp.locs[id(p)] = Loc("input:x")                           # the caller's array
    with pytest.raises(PlanError, match="read-only"):
        check_plan(mp)
    mp.locs[id(p)] = saved
    mp.order = mp.order[:1] + mp.order[::-1][:-1]
    with pytest.raises(PlanError, match="before one of its operands"):
        check_plan(mp)


def test_checker_rejects_a_corrupted_scan_plan():
    graph, _ = _accumulating_scan(4)
    mp = planned(graph)
    (sp,) = mp.scans.values()
    body = sp.body
    total = next(n for n in body.order if n.op == "sum")
    body.locs[id(total)] = Loc("carry:0")                    # over the new state, an output
    with pytest.raises(PlanError, match="scan"):
        check_plan(mp)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=random_graphs())
def test_random_graphs_have_valid_plans(graph):
    mp = planned(graph)
    assert mp.lower_bound <= mp.peak_bytes


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5000), st.integers(0, 30), st.integers(0, 10)), min_size=1, max_size=40))
def test_allocator_never_overlaps_live_blocks(spec):
    blocks = [Block(size, start, start + span, str(i)) for i, (size, start, span) in enumerate(spec)]
    peak = assign_offsets(blocks)
    assert peak >= lower_bound(blocks)
    for i, p in enumerate(blocks):
        assert p.offset % ALIGN == 0 and p.offset + p.nbytes <= peak
        for q in blocks[i + 1:]:
            if p.start <= q.end and q.start <= p.end:
                assert p.offset + p.nbytes <= q.offset or q.offset + q.nbytes <= p.offset


# -- the presets at full size -----------------------------------------------------

@pytest.fixture(scope="module")
def preset_plans():
    plans = {}
    for name in ("qwen3-next", "kimi-linear"):
        graph = build(name, seq_len=4096)
        plans[name] = (plan(graph), plan(optimize(graph, "O2")))
    return plans


def test_kimi_linear_o2_cuts_the_peak_by_30_percent(preset_plans):
    o0, o2 = preset_plans["kimi-linear"]
    assert o2.peak_bytes <= 0.7 * o0.peak_bytes


def test_qwen3_next_o2_peak_not_above_o0(preset_plans):
    o0, o2 = preset_plans["qwen3-next"]
    assert o2.peak_bytes <= o0.peak_bytes


@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
def test_preset_peaks_within_10_percent_of_the_lower_bound(preset_plans, name):
    for mp in preset_plans[name]:
        check_plan(mp)
        assert mp.lower_bound <= mp.peak_bytes <= 1.1 * mp.lower_bound


def test_checker_rejects_a_missing_staging_block():
    bb = dnir.Builder()
    a, c = bb.input("a", (4, 4)), bb.input("c", (4, 4))
    b = dnir.Builder()
    a0, c0 = b.input("a0", (4, 4)), b.input("c0", (4, 4))
    fa, fc = b.scan(bb.build([c, a]), [b.exp(a0), b.neg(c0)], length=3)
    mp = planned(b.build([fa, fc]))
    (sp,) = mp.scans.values()
    sp.body.stages.clear()
    with pytest.raises(PlanError, match="staging"):
        check_plan(mp)
