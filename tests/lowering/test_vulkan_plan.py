"""The Vulkan runner's memory plan: lifetimes through aliases and calls, no two live
blocks sharing bytes, and planned runs of the model layers against the NumPy backend."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import dnir
import dnir.passes
from dnir.lowering import run
from dnir.lowering.vulkan_plan import plan_functions
from dnir.models import DeltaNetConfig, build, random_inputs

from backends import merge_graphs, needs_vulkan
from cases import nmse


def assert_live_blocks_disjoint(plan, align):
    planned = [b for b in plan.blocks if not b.escapes]
    for b in planned:
        assert b.offset % align == 0 and b.nbytes >= b.size and b.offset + b.nbytes <= plan.arena_bytes, b
    for i, a in enumerate(planned):
        for b in planned[i + 1:]:
            if a.start <= b.end and b.start <= a.end:
                assert a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset, (plan.name, a, b)


@T.prim_func(private=True)
def _kernel(a: T.handle):
    T.evaluate(0)   # the plan reads only the calls' types; no kernel runs


_STEPS = st.lists(st.tuples(st.sampled_from(["call", "call", "two_outputs", "reshape", "inplace"]),
                            st.lists(st.integers(0, 99), min_size=1, max_size=3),    # arguments, as picks
                            st.lists(st.integers(1, 300), min_size=2, max_size=2)),  # output sizes
                  min_size=1, max_size=12)


@given(_STEPS, st.lists(st.integers(0, 99), min_size=1, max_size=3), st.sampled_from([32, 64, 256]))
@settings(max_examples=60, deadline=None)
def test_random_programs_plan_lifetimes_and_disjoint_bytes(steps, returned, align):
    """Random straight-line programs of calls (one or two outputs), reshapes, tuple fields and in-place
    calls: the plan's lifetimes are the ones the program was built with, and live blocks never share bytes."""
    bb = relax.BlockBuilder()
    gv = bb.add_func(_kernel, "kernel")
    x = relax.Var("x", relax.TensorType((5,), "float32"))
    values = [(x, (5,), None)]        # (var, shape, index of its block in `truth`; None: the parameter)
    truth = []                        # [size, start, end] per allocated block, in order of definition
    pos = 0

    def emit(expr, shape, block):
        nonlocal pos
        values.append((bb.emit(expr), shape, block))
        pos += 1

    with bb.function("main", [x]):
        with bb.dataflow():
            for kind, picks, sizes in steps:
                args = [values[i % len(values)] for i in picks]
                for _, _, block in args:
                    if block is not None and kind != "reshape":   # a reshape reads nothing: it names its source
                        truth[block][2] = pos
                var, shape, block = args[0]
                if kind == "reshape":
                    new_shape = (1, *shape) if len(shape) == 1 else shape[1:]
                    emit(relax.op.reshape(var, new_shape), new_shape, block)
                elif kind == "inplace":
                    emit(relax.op.call_tir_inplace(gv, relax.Tuple([a[0] for a in args]), [0],
                                                   relax.TensorType(shape, "float32")), shape, block)
                else:
                    sizes = sizes[:1] if kind == "call" else sizes
                    types = [relax.TensorType((n,), "float32") for n in sizes]
                    first = len(truth)
                    truth.extend([max(4, 4 * n), pos, pos] for n in sizes)
                    call = relax.call_tir(gv, relax.Tuple([a[0] for a in args]), types[0] if kind == "call" else types)
                    if kind == "call":
                        emit(call, (sizes[0],), first)
                    else:
                        tup = bb.emit(call)
                        pos += 1
                        for i, n in enumerate(sizes):
                            emit(relax.TupleGetItem(tup, i), (n,), first + i)
            returned = [values[i % len(values)] for i in returned]
            out = bb.emit_output(relax.Tuple([v[0] for v in returned]))
        bb.emit_func_output(out)

    plan = plan_functions({"main": bb.get()["main"]}, align)["main"]
    escaping = {v[2] for v in returned}
    assert [(b.size, b.start, b.end) for b in plan.blocks if not b.escapes] == \
        [tuple(t) for i, t in enumerate(truth) if i not in escaping]
    assert [i for i, b in enumerate(plan.blocks) if b.escapes] == sorted(escaping - {None})
    assert_live_blocks_disjoint(plan, align)


@I.ir_module(check_well_formed=False)   # the kernel is a stub: the plan reads only the calls' types
class _Scan:
    """Two steps of a scan: a carry returned by each step, and rows written in place into a
    buffer that the caller allocates and threads through the steps."""

    @T.prim_func(private=True)
    def kernel(a: T.handle):
        T.evaluate(0)

    @R.function(private=True)
    def step(c: R.Tensor((4,), "float32"), ys: R.Tensor((2, 4), "float32")):
        cls = _Scan
        t = R.call_tir(cls.kernel, (c,), out_ty=R.Tensor((4,), "float32"))
        new = R.call_tir(cls.kernel, (t, c), out_ty=R.Tensor((4,), "float32"))
        ys1 = R.call_tir_inplace(cls.kernel, (ys, new), inplace_indices=[0], out_ty=R.Tensor((2, 4), "float32"))
        return (new, ys1)

    @R.function
    def main(c0: R.Tensor((4,), "float32")):
        cls = _Scan
        ys = R.builtin.alloc_tensor(R.shape([2, 4]), R.dtype("float32"), 0)
        r0 = cls.step(c0, ys)
        c1 = r0[0]
        r1 = cls.step(c1, r0[1])
        out = R.call_tir(cls.kernel, (r1[1],), out_ty=R.Tensor((8,), "float32"))
        return (out, r1[0])


def test_step_results_live_in_the_caller():
    plans = plan_functions({gv.name_hint: f for gv, f in _Scan.functions.items()
                            if isinstance(f, relax.Function)}, 32)
    step, main = plans["step"], plans["main"]
    t, new = step.blocks
    assert (t.start, t.end, t.escapes) == (0, 1, False) and step.escapes == [new]
    assert step.arena_bytes == 32

    # main's bindings: 0 ys, 1 r0, 2 c1, 3 r0[1], 4 r1, 5 r1[1], 6 out.
    ys, carry0, carry1, out = main.blocks
    assert (ys.start, ys.end, ys.escapes) == (0, 6, False)          # through both steps' in-place writes
    assert (carry0.start, carry0.end, carry0.escapes) == (1, 4, False)  # read by the second step
    assert carry1.escapes and out.escapes and main.escapes == [out, carry1]
    assert_live_blocks_disjoint(main, 32)
    assert main.intermediate_bytes == 32 + 16 + 16 + 32


# -- planned runs on Vulkan -------------------------------------------------------------------

SIZES = dict(seq_len=40, heads=2, value_heads=4, head_dim=16, value_dim=16,
             chunk_size=16, initial_state=True, final_state=True)
# gdn's loop over chunks runs as one kernel (chunk_scan.py); kda's recurrent loop over
# tokens keeps loop, block and step functions, whose arenas the plan places.
MODES = {"gdn": "chunked", "kda": "recurrent"}


def _graph(level):
    return merge_graphs({v: dnir.passes.optimize(build(v, mode=MODES[v], **SIZES), level) for v in ("gdn", "kda")})


def _inputs(graph, rng):
    inputs = {}
    for v in ("gdn", "kda"):
        for name, value in random_inputs(DeltaNetConfig.from_meta(build(v, mode=MODES[v], **SIZES).meta),
                                         rng).items():
            inputs[f"{v}__{name}"] = value
    assert set(inputs) == {n.attrs["name"] for n in graph.inputs}
    return inputs


def _executable(graph):
    """The executable that `run(graph, target="vulkan")` uses: the graph as the target's pipeline prepares it."""
    from dnir.lowering.registry import prepare
    from dnir.lowering.vulkan import build as build_vulkan
    return build_vulkan(prepare(graph, "vulkan"))


@needs_vulkan
@pytest.mark.parametrize("level", ["O0", "O2"])
def test_planned_run_matches_numpy(level, rng):
    from dnir.lowering.vulkan import _device
    graph = _graph(level)
    inputs = _inputs(graph, rng)
    outs = run(graph, inputs, target="vulkan")
    for name, out, ref in zip(graph.output_names, outs, run(graph, inputs)):
        assert np.isfinite(out).all(), name
        assert nmse(out, ref) < 1e-7, (name, nmse(out, ref))
    ex = _executable(graph)
    assert set(ex.plans) == {"main", "scan0_loop", "scan0_block", "scan0_step"}
    for plan in ex.plans.values():
        assert_live_blocks_disjoint(plan, _device()[2].limits["min-storage-buffer-offset-alignment"])


@needs_vulkan
def test_arena_is_smaller_than_one_buffer_per_value():
    ex = _executable(_graph("O2"))
    for name in ex.plans:
        assert 0 < ex.arena_bytes[name] < ex.intermediate_bytes[name], name


@needs_vulkan
def test_rerun_reuses_the_buffers_and_repeats_its_results(rng):
    graph = _graph("O2")
    first, other = _inputs(graph, rng), _inputs(graph, rng)
    outs = run(graph, first, target="vulkan")
    buffers = list(_executable(graph).runner.buffers)
    run(graph, other, target="vulkan")      # overwrites every arena
    again = run(graph, first, target="vulkan")
    assert _executable(graph).runner.buffers == buffers
    for name, a, b in zip(graph.output_names, outs, again):
        assert np.array_equal(a, b), name


@needs_vulkan
def test_a_saved_program_runs_without_its_executable(rng, tmp_path):
    """What a GPU server without TVM runs: the recorded program, loaded from its file."""
    from dnir.lowering.vulkan_program import Program, Runner
    graph = _graph("O0")
    inputs = _inputs(graph, rng)
    program = _executable(graph).program
    assert len(program.dispatches) > len(program.wgsl) > 0      # the scan's steps are unrolled
    program.save(tmp_path / "layer.npz")
    loaded = Program.load(tmp_path / "layer.npz")
    outs = Runner(loaded)([inputs[n] for n in graph.input_names])
    for name, out, ref in zip(graph.output_names, outs, run(graph, inputs)):
        assert nmse(out, ref) < 1e-7, (name, nmse(out, ref))


@needs_vulkan
def test_a_kernel_shared_by_calls_with_a_repeated_operand_binds_each_argument(rng):
    # TVM makes one `multiply` for mul(y, y) and mul(x, y), both parameters named y; bound by
    # name, x was lost and the second output came back as y * y.
    b = dnir.Builder()
    x, y = b.input("x", (4, 8)), b.input("y", (4, 8))
    graph = b.build([b.sqrt(b.mul(y, y)), b.mul(x, y)], names=["a", "b"])
    inputs = [rng.standard_normal((4, 8)).astype(np.float32) for _ in range(2)]
    for name, out, ref in zip(graph.output_names, run(graph, inputs, target="vulkan"), run(graph, inputs)):
        np.testing.assert_allclose(out, ref, rtol=1e-6, err_msg=name)


@needs_vulkan
def test_a_grid_folded_past_the_workgroup_limit_runs_every_block(rng):
    # 4097 x 4096 elements are more blocks of 256 threads than one dimension takes (65535): the
    # grid folds into z, and every block must still run (the uniform held the folded count, so
    # the last 4352 elements were never written).
    b = dnir.Builder()
    x = b.input("x", (4097, 4096))
    graph = b.build([b.mul(x, 2.0)], names=["y"])
    data = rng.standard_normal((4097, 4096)).astype(np.float32)
    np.testing.assert_array_equal(run(graph, [data], target="vulkan")[0], data * 2)
