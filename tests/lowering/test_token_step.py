"""One decode step as one GPU kernel: which graphs it takes, and its results on Vulkan
against the NumPy backend (CUDA: compiled here to PTX by test_targets; on the H200,
benchmarks/gpu.py checks its outputs against flash-linear-attention's)."""
import re

import pytest

import dnir
from dnir import passes
from dnir.lowering.tvm.token_step import match_graph
from dnir.lowering.tvm.translate import translate
from dnir.models import build_delta_net, preset, random_inputs

from backends import assert_vulkan_matches_numpy, needs_vulkan

VALUE_HEADS = {"qwen3-next": 4, "kimi-linear": 2}     # GQA for gdn


def _graph(name, level="O2", **options):
    options = dict(dict(batch=3, seq_len=1, mode="decode"), **options)
    cfg = preset(name, heads=2, value_heads=VALUE_HEADS[name], head_dim=32, value_dim=64, initial_state=True,
                 final_state=True, **options)
    return cfg, passes.optimize(build_delta_net(cfg), level)


@pytest.mark.parametrize("name,Kg", [("qwen3-next", 1), ("kimi-linear", 32)])
def test_decode_step_is_matched(name, Kg):
    _, graph = _graph(name)
    (step,) = match_graph(graph)
    assert (step.batch, step.K, step.V, step.Kg) == ((3, VALUE_HEADS[name]), 32, 64, Kg)
    assert step.new_state is graph.outputs[1]


def test_other_graphs_are_not_matched():
    assert not match_graph(_graph("qwen3-next", mode="chunked", seq_len=70)[1])
    _, graph = _graph("qwen3-next")
    text = dnir.print(graph)
    # v + pred instead of v - pred: not the delta rule's error
    changed = dnir.parse(re.sub(r"(: f32\[3,4,64\]) = sub\(", r"\1 = add(", text, count=1))
    assert text != dnir.print(changed) and not match_graph(changed)


def test_gpu_module_reads_the_state_in_one_kernel():
    _, graph = _graph("kimi-linear")
    main = translate(graph, gpu=True)["main"].script()
    assert main.count("R.call_tir(token_step") == 1
    assert "R.matmul" not in main and "R.call_tir(token_step, (initial_state," in main   # the state as given
    assert "R.matmul" in translate(graph, gpu=False)["main"].script()


@needs_vulkan
@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
def test_fused_step_on_vulkan_matches_numpy(name, rng):
    cfg, graph = _graph(name)
    assert match_graph(graph)
    assert_vulkan_matches_numpy(graph, random_inputs(cfg, rng))
