"""The loop over chunks as one GPU kernel: which scans it takes, and its results on Vulkan
against the NumPy backend (CUDA: compiled here to PTX by test_targets; run on the H200 by
scripts/gpu_conformance.py, whose chunked layers it takes, and benchmarks/gpu.py)."""
import pytest

import dnir
from dnir import passes
from dnir.lowering.tvm.chunk_scan import match_chunk_step
from dnir.lowering.tvm.translate import translate
from dnir.models import build_delta_net, preset, random_inputs

from backends import assert_vulkan_matches_numpy, needs_vulkan

SMALL = dict(heads=2, head_dim=32, value_dim=32, initial_state=True, final_state=True)
VALUE_HEADS = {"qwen3-next": 4, "kimi-linear": 2}     # GQA for gdn


def _config(name, **options):
    return preset(name, value_heads=VALUE_HEADS[name], **SMALL, **options)


def _scans(graph):
    return [n for n in graph.topo_order() if n.op == "scan"]


@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
@pytest.mark.parametrize("level", ["O0", "O2"])
def test_chunked_layers_match_the_chunk_step(name, level):
    cfg = _config(name, seq_len=150)
    graph = passes.optimize(build_delta_net(cfg), level)
    steps = [match_chunk_step(s) for s in _scans(graph)]
    assert steps and all(steps)
    step = steps[0]
    assert (step.C, step.K, step.V) == (64, 32, 32) and step.Kg == (1 if name == "qwen3-next" else 32)
    assert sorted(step.xs.values()) == list(range(6))
    assert match_chunk_step(_scans(graph)[0], shared_bytes=8 * 1024) is None     # a block would not fit


def test_other_loops_keep_their_step_function():
    recurrent = passes.optimize(build_delta_net(_config("qwen3-next", seq_len=20, mode="recurrent")), "O2")
    assert not any(match_chunk_step(s) for s in _scans(recurrent))
    # the chunk step with the output's two products subtracted instead of added
    chunked = passes.optimize(build_delta_net(_config("qwen3-next", seq_len=70)), "O2")
    text = dnir.print(chunked)
    assert text.count(" = add(%5, %6)") == 1
    changed = dnir.parse(text.replace(" = add(%5, %6)", " = sub(%5, %6)"))
    assert not any(match_chunk_step(s) for s in _scans(changed))


def test_gpu_module_has_one_kernel_for_the_loop_and_no_step_function():
    graph = passes.optimize(build_delta_net(_config("kimi-linear", seq_len=150)), "O2")
    gpu = {gv.name_hint for gv in translate(graph, gpu=True).functions}
    cpu = {gv.name_hint for gv in translate(graph, gpu=False).functions}
    assert "chunk_scan" in gpu and not any(n.startswith("scan") for n in gpu)
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
    assert all(match_chunk_step(s) for s in _scans(graph))
    assert_vulkan_matches_numpy(graph, random_inputs(cfg, rng))
