"""One decode step as one GPU kernel: which graphs the GPU pipelines fuse into token_step (with
its prologue folded in: decode_step; token_step where that kernel declines), and its results on
Vulkan against the NumPy backend (CUDA: compiled here to PTX by test_targets; on the H200, benchmarks/gpu.py checks its
outputs against flash-linear-attention's)."""
import re

import pytest

import dnir
from dnir import passes
from dnir.lowering import registry
from dnir.lowering.tvm.translate import translate
from dnir.models import build_delta_net, preset, random_inputs

from backends import assert_vulkan_matches_numpy, needs_vulkan

VALUE_HEADS = {"qwen3-next": 4, "kimi-linear": 2}     # GQA for gdn


def _graph(name, level="O2", **options):
    options = dict(dict(batch=3, seq_len=1, mode="decode", value_dim=64, head_dim=32), **options)
    cfg = preset(name, heads=2, value_heads=VALUE_HEADS[name], initial_state=True, final_state=True, **options)
    return cfg, passes.optimize(build_delta_net(cfg), level)


def _steps(graph, op="token_step"):
    return [n for n in graph.topo_order() if n.op == op]


@pytest.mark.parametrize("name,Kg", [("qwen3-next", 1), ("kimi-linear", 32)])
def test_decode_step_is_fused(name, Kg):
    _, graph = _graph(name)
    with registry.target_context("vulkan"):
        fused = passes.optimize(graph, ["fuse_delta_steps", "dce"])
    (step,) = _steps(fused)
    state, decay = step.inputs[:2]
    assert state is graph.inputs[-1] and state.shape == (3, VALUE_HEADS[name], 32, 64)
    assert decay.type.size == 3 * VALUE_HEADS[name] * Kg
    # both outputs read the one step: the state directly, o through its reshape
    new_state, o = fused.outputs[1], fused.outputs[0].inputs[0]
    assert (new_state.op, o.op) == ("item", "item") and new_state.inputs[0] is o.inputs[0] is step
    assert "matmul" not in fused.op_histogram()


@pytest.mark.parametrize("target", ["cuda", "vulkan"])
@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
def test_gpu_targets_fold_the_prologue_into_the_step(name, target):
    """The step reads the layer's inputs themselves: no scaling, exp, repeat or q . k before it."""
    _, graph = _graph(name)
    fused = registry.prepare(graph, target)
    (step,) = _steps(fused, "decode_step")
    assert list(step.inputs) == [graph.inputs[-1], *graph.inputs[:5]]
    assert step.attrs["scale"] == pytest.approx(32 ** -0.5)
    assert set(fused.op_histogram()) == {"input", "decode_step", "item", "reshape"}


def test_other_graphs_are_not_fused():
    assert not _steps(registry.prepare(_graph("qwen3-next", mode="chunked", seq_len=70)[1], "cuda"))
    _, graph = _graph("qwen3-next")
    text = dnir.print(graph)
    # v + pred instead of v - pred: not the delta rule's error
    changed = dnir.parse(re.sub(r"(: f32\[3,4,64\]) = sub\(", r"\1 = add(", text, count=1))
    assert text != dnir.print(changed) and not _steps(registry.prepare(changed, "cuda"))
    # V = 48 is no whole number of warps: the kernel declines it, the step stays op by op
    _, narrow = _graph("kimi-linear", value_dim=48)
    with registry.target_context("cuda") as ctx:
        assert not _steps(passes.optimize(narrow, ["fuse_delta_steps"]))
    assert ctx.remarks == [("fuse_delta_steps", "token_step not fused: V=48 is not a multiple of 32 "
                                                "(one thread per state column, whole warps) (decode step)")]


@pytest.mark.parametrize("target", ["cuda", "vulkan"])
def test_an_odd_key_dim_keeps_the_prologue(target):
    """decode_step's kernel gives each of two threads half a column's rows: K = 33 stays token_step."""
    _, graph = _graph("qwen3-next", head_dim=33)
    assert _steps(registry.prepare(graph, target)) and not _steps(registry.prepare(graph, target), "decode_step")
    with registry.target_context(target) as ctx:
        passes.optimize(graph, ["fuse_delta_steps", "fold_step_prologue"])
    assert ("fold_step_prologue", "token_step kept: K=33 is odd (decode_step's kernel splits each state "
                                  "column's rows in two halves)") in ctx.remarks


def test_gpu_module_reads_the_state_in_one_kernel():
    _, graph = _graph("kimi-linear")
    main = translate(registry.prepare(graph, "cuda"), gpu=True)["main"].script()
    assert main.count("R.call_tir(") == 1     # the step itself, nothing before it (o's reshape is a view)
    assert "R.call_tir(decode_step, (initial_state, q, k, v, g, beta)" in main   # the inputs as given
    assert "R.matmul" in translate(graph, gpu=False)["main"].script()        # unfused: op by op


@needs_vulkan
@pytest.mark.parametrize("name,batch,value_dim,dtype", [("qwen3-next", 3, 64, "f32"), ("kimi-linear", 1, 32, "f32"),
                                                        ("qwen3-next", 2, 256, "f16")])
def test_fused_step_on_vulkan_matches_numpy(name, batch, value_dim, dtype, rng):
    """The decode_step kernel (the rows made in shared memory) on GQA, a gate per key channel, one
    sequence, V = 256 (two blocks per head) and fp16 inputs."""
    cfg, graph = _graph(name, batch=batch, value_dim=value_dim, dtype=dtype)
    assert _steps(registry.prepare(graph, "vulkan"), "decode_step")
    assert_vulkan_matches_numpy(graph, random_inputs(cfg, rng))


@needs_vulkan
@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
def test_token_step_on_vulkan_matches_numpy(name, rng):
    """An odd K, which decode_step's kernel declines: token_step's kernel with the prologue's ops."""
    cfg, graph = _graph(name, head_dim=33)
    assert _steps(registry.prepare(graph, "vulkan"))
    assert_vulkan_matches_numpy(graph, random_inputs(cfg, rng))


@needs_vulkan
@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
def test_fused_step_inside_a_token_loop_on_vulkan_matches_numpy(name, rng):
    """A recurrent layer's loop body is a decode step: fused there, run once per token."""
    cfg, graph = _graph(name, mode="recurrent", batch=2, seq_len=5)
    body = next(n for n in registry.prepare(graph, "vulkan").topo_order() if n.op == "scan").attrs["body"]
    assert _steps(body, "decode_step")
    assert_vulkan_matches_numpy(graph, random_inputs(cfg, rng))


@needs_vulkan
@pytest.mark.parametrize("kernel,head_dim", [("token_step", 127), ("decode_step", 128)])
def test_step_output_is_as_accurate_as_tree_sums(kernel, head_dim, rng):
    """o's dot products over K run as interleaved chains (token_step; K = 127, as decode_step's kernel
    takes an even K) or as two threads' halves of them (decode_step). Against the float64 oracle o's
    rms error is 1.7-1.8e-7 here (lavapipe rounds each product before its add), where one chain
    of 128 products gives 2.5-2.6e-7; with fused multiply-adds 1.2e-7 against 2.2e-7, and
    flash-linear-attention's tree sums 1.0e-7 on the H100 (benchmarks/results/gpu.md)."""
    from dnir.lowering import run
    from dnir.models.reference import delta_rule_reference, relative_rms_error
    cfg, graph = _graph("qwen3-next", batch=16, value_dim=128, head_dim=head_dim)
    assert _steps(registry.prepare(graph, "vulkan"), kernel)
    x = random_inputs(cfg, rng)
    o, state = run(graph, x, target="vulkan")
    ref_o, ref_state = delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=cfg.scale,
                                            initial_state=x["initial_state"], l2norm=cfg.l2norm)
    assert relative_rms_error(o, ref_o) < 2.1e-7
    assert relative_rms_error(state, ref_state) < 1.5e-7
