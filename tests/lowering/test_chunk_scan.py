"""The loop over chunks as two GPU kernels: which scans the GPU pipelines fuse into chunk_scan (then
split into its sequential part chunk_states and the chunk-parallel chunk_output), and their results
on Vulkan against the NumPy backend (CUDA: compiled here to PTX by
test_targets; run on the H200 by scripts/gpu_conformance.py, whose chunked layers it takes,
and benchmarks/gpu.py)."""
from dataclasses import replace

import pytest

import dnir
from dnir import passes
from dnir.lowering import registry
from dnir.lowering.tvm.translate import translate
from dnir.models import build_delta_net, preset, random_inputs
from dnir.passes.context import PassContext

from backends import assert_vulkan_matches_numpy, needs_vulkan

SMALL = dict(heads=2, head_dim=32, value_dim=32, initial_state=True, final_state=True)
VALUE_HEADS = {"qwen3-next": 4, "kimi-linear": 2}     # GQA for gdn


def _config(name, **options):
    return preset(name, value_heads=VALUE_HEADS[name], **SMALL, **options)


def _ops(graph, op):
    return [n for n in graph.topo_order() if n.op == op]


def _fused_for(graph, target):
    with target as ctx:
        return passes.optimize(graph, ["fuse_delta_steps"]), ctx.remarks


@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
@pytest.mark.parametrize("level", ["O0", "O2"])
def test_chunked_layers_are_fused_on_gpu_targets(name, level):
    graph = passes.optimize(build_delta_net(_config(name, seq_len=150)), level)
    fused = registry.prepare(graph, "cuda")
    (op,) = _ops(fused, "chunk_states")
    assert not _ops(fused, "scan") and not _ops(fused, "chunk_scan") and len(_ops(graph, "scan")) == 1
    state, w, u, k_to_end, last_decay = op.inputs
    assert state.shape == (1, VALUE_HEADS[name], 32, 32) and w.shape[0] == 3 and u.shape[-2] == 64
    assert last_decay.shape[-2] == (1 if name == "qwen3-next" else 32)
    (output,) = _ops(fused, "chunk_output")
    assert [x.op for x in output.inputs[1::2]] == ["item", "item"] and output.inputs[1].inputs[0] is op
    assert output.shape[-1] == 32 and 64 in output.shape
    # a block of (rows, 16 columns) needs 4 * (32 * 16 + 64 * 16 + 64 * 64) B = 22 KiB
    small = replace(registry.backend_for("cuda").context("cuda"), shared_bytes=8 * 1024)
    unfused, remarks = _fused_for(graph, PassContext(small))
    assert not _ops(unfused, "chunk_scan")
    assert remarks == [("fuse_delta_steps", "chunk_scan not fused: a thread block needs 22528 B of shared "
                                            "memory, the target has 8192 B (the scan over 3 chunks)")]


def test_the_loop_stays_whole_where_the_target_lacks_a_half():
    graph = passes.optimize(build_delta_net(_config("qwen3-next", seq_len=150)), "O2")
    cuda = registry.backend_for("cuda").context("cuda")
    no_output = replace(cuda, kernels={k: v for k, v in cuda.kernels.items() if k != "chunk_output"})
    fused, remarks = _fused_for(graph, PassContext(no_output))
    assert len(_ops(fused, "chunk_scan")) == 1 and not _ops(fused, "chunk_states")
    assert ("fuse_delta_steps", "chunk_output not fused: target 'cuda' has no chunk_output kernel "
                                "(the output of 3 chunks)") in remarks
    no_states = replace(cuda, kernels={k: v for k, v in cuda.kernels.items() if k != "chunk_states"})
    fused, remarks = _fused_for(graph, PassContext(no_states))     # llvm's case: no split tried
    assert len(_ops(fused, "chunk_scan")) == 1 and not any("chunk_states" in r for _, r in remarks)


def test_other_loops_keep_their_step_function():
    recurrent = passes.optimize(build_delta_net(_config("qwen3-next", seq_len=20, mode="recurrent")), "O2")
    assert _ops(registry.prepare(recurrent, "cuda"), "scan") and not _ops(registry.prepare(recurrent, "cuda"),
                                                                          "chunk_scan")
    # the chunk step with the output's two products subtracted instead of added
    chunked = passes.optimize(build_delta_net(_config("qwen3-next", seq_len=70)), "O2")
    text = dnir.print(chunked)
    assert text.count(" = add(%5, %6)") == 1
    changed = dnir.parse(text.replace(" = add(%5, %6)", " = sub(%5, %6)"))
    assert _ops(registry.prepare(chunked, "cuda"), "chunk_states")
    assert not _ops(registry.prepare(changed, "cuda"), "chunk_states")


def test_gpu_module_has_two_kernels_for_the_loop_and_no_step_function():
    graph = passes.optimize(build_delta_net(_config("kimi-linear", seq_len=150)), "O2")
    gpu = {gv.name_hint for gv in translate(registry.prepare(graph, "cuda"), gpu=True).functions}
    cpu = {gv.name_hint for gv in translate(graph, gpu=False).functions}     # unfused: a step function
    assert {"chunk_states", "chunk_output"} <= gpu and not any(n.startswith("scan") for n in gpu)
    assert "scan0_step" in cpu and "chunk_scan" not in cpu


@needs_vulkan
@pytest.mark.parametrize("name,options", [
    ("qwen3-next", dict(seq_len=150)),                              # GQA, a partial last chunk
    ("kimi-linear", dict(seq_len=150)),                             # a decay per key channel
    ("qwen3-next", dict(seq_len=100, cu_seqlens=(0, 37, 100))),     # one loop per sequence
    ("kimi-linear", dict(seq_len=96, batch=2, chunk_size=32)),
])
def test_fused_loop_on_vulkan_matches_numpy(name, options, rng):
    cfg = _config(name, **options)
    graph = passes.optimize(build_delta_net(cfg), "O2")
    fused = registry.prepare(graph, "vulkan")
    assert _ops(fused, "chunk_states") and _ops(fused, "chunk_output") and not _ops(fused, "scan")
    assert_vulkan_matches_numpy(graph, random_inputs(cfg, rng))
