"""fuse_intra_chunk: the chunked form's work local to each chunk becomes the fused op intra_chunk
first in O2, inside a pass context whose target has a kernel for it, and nowhere else; the op's
NumPy reference kernel against its expansion (the chunked model's own construction) and the
float64 oracle, on fresh random inputs with strong gates."""
import numpy as np
import pytest

from dnir import passes
from dnir.lowering import run
from dnir.models import build_delta_net, delta_rule_reference, preset, random_inputs, relative_rms_error
from dnir.passes.context import PassContext, Target, any_node

WITH_KERNEL = Target("with-kernel", {"intra_chunk": any_node})
SMALL = dict(heads=2, head_dim=32, value_dim=32, initial_state=True, final_state=True)
LAYERS = {
    "gqa-partial-chunk": ("qwen3-next", dict(value_heads=4, seq_len=150)),
    "gate-per-channel": ("kimi-linear", dict(value_heads=2, seq_len=150)),
    "varlen-chunk-32": ("qwen3-next", dict(value_heads=4, seq_len=100, cu_seqlens=(0, 37, 100), chunk_size=32)),
    "two-sequences-chunk-16": ("kimi-linear", dict(value_heads=2, seq_len=40, batch=2, chunk_size=16)),
}


def _fused(cfg, target=WITH_KERNEL):
    with PassContext(target) as ctx:
        graph = passes.optimize(build_delta_net(cfg), "O2")
    return graph, ctx.remarks


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_the_work_local_to_each_chunk_is_one_op(case):
    name, options = LAYERS[case]
    cfg = preset(name, **dict(SMALL, **options))
    graph, remarks = _fused(cfg)
    hist = graph.op_histogram()
    assert hist["intra_chunk"] == 1 and not {"solve_tri", "exp", "cumsum", "tril"} & set(hist)
    assert remarks == [("fuse_intra_chunk", f"intra_chunk fused (chunks of {cfg.chunk_size})")]


def test_nothing_is_fused_without_a_kernel_or_in_another_form():
    cfg = preset("kimi-linear", **dict(SMALL, seq_len=64))
    assert "intra_chunk" not in passes.optimize(build_delta_net(cfg), "O2").op_histogram()    # no target
    graph, remarks = _fused(cfg, Target("without", {}))
    assert "intra_chunk" not in graph.op_histogram()
    assert remarks == [("fuse_intra_chunk", "intra_chunk not fused: target 'without' has no intra_chunk kernel (chunks of 64)")]
    for other in (dict(block_size=16), dict(factorized_decay=True)):      # scores built another way
        graph, _ = _fused(preset("kimi-linear", **dict(SMALL, seq_len=64, **other)))
        assert "intra_chunk" not in graph.op_histogram()


@pytest.mark.parametrize("scale", [1.0, 8.0])      # as drawn, and strong gates (decays near 0)
@pytest.mark.parametrize("case", sorted(LAYERS))
def test_reference_kernel_matches_its_expansion_and_the_oracle(case, scale, rng):
    name, options = LAYERS[case]
    cfg = preset(name, **dict(SMALL, **options))
    fused, _ = _fused(cfg)
    expanded, changed = passes.PASSES["expand_fused"].fn(fused)
    assert changed and "intra_chunk" not in expanded.op_histogram()
    x = random_inputs(cfg, rng)
    x["g"] = x["g"] * scale
    for out, ref in zip(run(fused, x, float64=True), run(expanded, x, float64=True)):
        assert relative_rms_error(out, ref) < 1e-13
    o, state = delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=cfg.scale,
                                    initial_state=x["initial_state"], cu_seqlens=cfg.cu_seqlens)
    for out, ref in zip(run(fused, x), (o, state)):
        assert out.dtype == np.float32 and relative_rms_error(out, ref) < 1e-5
