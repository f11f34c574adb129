"""The backend registry: targets looked up by name, a backend's own pipeline under its Target,
fused ops kept where a target has a kernel for them and expanded elsewhere."""
import numpy as np
import pytest

import dnir
from dnir.errors import BackendError
from dnir.lowering import registry, run
from dnir.models import relative_rms_error
from dnir.passes import PASSES, Pass
from dnir.passes.context import Target, current

from test_fused_reference import _layer, _inputs


@pytest.fixture
def restore_registry(monkeypatch):
    monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))


def _echo(graph, inputs, target):
    return [np.asarray(inputs[name]) for name in graph.input_names][:len(graph.outputs)]


def test_every_target_has_its_backend():
    assert {"numpy", "llvm", "cuda", "vulkan"} <= set(registry.targets())
    assert registry.backend_for("vulkan").pipeline == registry.backend_for("cuda").pipeline == (
        "recompute_into_reductions", "fuse_delta_steps", "fold_step_prologue")
    assert all(registry.pipeline(target)[-1] == "expand_fused" for target in registry.targets())
    with pytest.raises(BackendError, match="unknown target 'tpu'; available: numpy, llvm, cuda, vulkan"):
        registry.backend_for("tpu")


def test_a_target_has_one_backend_and_a_pipeline_of_known_passes(restore_registry):
    with pytest.raises(BackendError, match="target 'llvm' is served by backend 'tvm-llvm'; backend 'mine' cannot"):
        registry.register(registry.Backend("mine", ("mine", "llvm"), _echo, Target))
    assert "mine" not in registry.targets()
    with pytest.raises(BackendError, match=r"backend 'mine': unknown pass\(es\) \['fuse_everything'\]"):
        registry.register(registry.Backend("mine", ("mine",), _echo, Target, ("fuse_everything",)))
    registry.register(registry.Backend("mine", ("mine",), _echo, Target))
    b = dnir.Builder()
    g = b.build(b.exp(b.input("x", (2,))))
    assert run(g, {"x": np.ones(2)}, target="mine")[0].tolist() == [1.0, 1.0]     # its own run function


def test_a_backend_pipeline_runs_under_its_target(restore_registry, monkeypatch):
    seen = []

    def probe(graph):
        seen.append(current().target)
        return graph, False
    monkeypatch.setitem(PASSES, "probe", Pass("probe", probe))
    registry.register(registry.Backend("mine", ("mine",), _echo, lambda name: Target(name, shared_bytes=123),
                                       ("probe",)))
    b = dnir.Builder()
    registry.prepare(b.build(b.exp(b.input("x", (2,)))), "mine")
    assert [(t.name, t.shared_bytes) for t in seen] == [("mine", 123)]
    assert current().target is None                                     # the context is left again


@pytest.mark.parametrize("case", ["gqa-partial-chunk", "decode-gate-per-channel"])
def test_fused_ops_are_kept_where_a_kernel_takes_them_and_expanded_elsewhere(case, rng, restore_registry):
    from dnir.lowering.numpy_backend import run as run_reference
    seen = []

    def run_plain(graph, inputs, target):
        seen.append(graph)
        return run_reference(graph, inputs)
    registry.register(registry.Backend("plain", ("plain",), run_plain, Target))     # no kernel of its own
    cfg, fused = _layer(case)
    op = "token_step" if "decode" in case else "chunk_states"   # the loop over chunks, split as on GPUs
    assert registry.prepare(fused, "numpy") is fused                       # a reference kernel for each
    # the CUDA kernel takes it (a decode step with its prologue folded in: decode_step)
    assert registry.prepare(fused, "cuda").op_histogram()["decode_step" if "decode" in case else op] == 1
    x = _inputs(cfg, rng, 1.0)
    outs = run(fused, x, target="plain")
    (expanded,) = seen
    assert op not in expanded.op_histogram() and registry.prepare(fused, "plain") is expanded
    for got, want in zip(outs, run(fused, x, float64=True)):
        assert relative_rms_error(got, want) < 1e-5
