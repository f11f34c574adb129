"""Every pass, and O1/O2 as a whole, on delta-net graphs: same results as before
(each pass validated numerically in float64), and O2 still matches the oracle."""
import numpy as np
import pytest

from dnir import passes, run
from dnir.models import DeltaNetConfig, build_delta_net, delta_rule_reference, random_inputs, relative_rms_error

SMALL = dict(seq_len=40, heads=1, value_heads=2, head_dim=8, value_dim=4, chunk_size=16)
CONFIGS = {
    "gdn-chunked": dict(variant="gdn"),
    "kda-chunked": dict(variant="kda"),
    "gdn-chunked-c32": dict(variant="gdn", chunk_size=32),
    "kda-chunked-c32-state": dict(variant="kda", chunk_size=32, initial_state=True, final_state=True),
    "gdn-blocked": dict(variant="gdn", chunk_size=32, block_size=16),
    "kda-blocked": dict(variant="kda", chunk_size=32, block_size=16, final_state=True),
    "gdn-varlen": dict(variant="gdn", seq_len=45, cu_seqlens=(0, 9, 45), initial_state=True, final_state=True),
    "kda-varlen-l2": dict(variant="kda", seq_len=45, cu_seqlens=(0, 30, 45), l2norm=True),
    "gdn-recurrent": dict(variant="gdn", mode="recurrent", seq_len=6, batch=2),
    "kda-recurrent": dict(variant="kda", mode="recurrent", seq_len=6, initial_state=True, final_state=True),
    "gdn-decode": dict(variant="gdn", mode="decode", seq_len=1, batch=3, initial_state=True, final_state=True),
    "kda-decode": dict(variant="kda", mode="decode", seq_len=1, batch=2, initial_state=True, final_state=True),
}
OPTIONS = {"block_tril": {"block": 8}, "block_solve": {"block": 8}}


def config(name) -> DeltaNetConfig:
    return DeltaNetConfig(**{**SMALL, **CONFIGS[name]})


@pytest.mark.parametrize("pipeline", ["O1", "O2"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pipeline_keeps_results_pass_by_pass(name, pipeline):
    cfg = config(name)
    graph = build_delta_net(cfg)
    optimised, records = passes.run_pipeline(graph, pipeline, validate=True, options=OPTIONS, seed=3)
    assert optimised.input_types == graph.input_types and optimised.output_types == graph.output_types
    assert optimised.meta == graph.meta
    assert [r.name for r in records[1:]] == passes.PIPELINES[pipeline]


@pytest.mark.parametrize("name", ["gdn-chunked", "kda-blocked", "kda-recurrent", "gdn-varlen"])
def test_o2_matches_the_oracle_in_float32(name):
    cfg = config(name)
    graph = passes.optimize(build_delta_net(cfg), "O2")
    x = random_inputs(cfg, np.random.default_rng(11))
    outs = run(graph, x)
    o_ref, s_ref = delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=cfg.scale,
                                        initial_state=x.get("initial_state"), l2norm=cfg.l2norm,
                                        cu_seqlens=cfg.cu_seqlens)
    assert relative_rms_error(outs[0], o_ref) < 1e-5
    if cfg.final_state:
        assert relative_rms_error(outs[1], s_ref) < 1e-5


@pytest.mark.parametrize("pass_name", sorted(set(passes.PIPELINES["O2"])))
@pytest.mark.parametrize("name", ["kda-chunked-c32-state", "gdn-blocked", "gdn-recurrent"])
def test_each_pass_alone_on_the_written_graph(name, pass_name):
    graph = build_delta_net(config(name))
    after, _ = passes.run_pipeline(graph, [pass_name], validate=True, options=OPTIONS, seed=5)
    assert after.input_types == graph.input_types and after.output_types == graph.output_types


def test_block_tril_computes_only_blocks_on_and_below_the_diagonal():
    """C = 32 in blocks of 8: 10 of 16 blocks, 4 masked; no [.., C, C, K] decay tensor left."""
    cfg = config("kda-chunked-c32-state")
    o1 = passes.optimize(build_delta_net(cfg), "O1")
    o2 = passes.optimize(o1, ["block_tril", "cse", "dce"], block_tril={"block": 8})
    batch = (1, 2, 2)    # N, HV, chunks
    # Akk and Aqk: left of diagonal block a, one matmul over its 8a columns, channels contracted
    strips = sorted(n.shape[-1] for n in o2.topo_order() if n.op == "matmul" and n.shape[:-1] == batch + (8,))
    assert strips == [8, 8, 16, 16, 24, 24]
    assert sum(n.op == "tril" and n.shape[-2:] == (8, 8) for n in o2.topo_order()) >= 2 * 4
    # no C x C masked tensor (the C x C ones below the diagonal, a constant of the suffix sums, are no tensor)
    assert not any(n.op == "tril" and n.shape[-2:] == (32, 32) and n.inputs[0].op != "full" for n in o2.topo_order())
    decay_sized = [n for n in o2.topo_order() if n.op != "scan" and n.rank >= 3
                   and list(n.shape).count(32) >= 2 and 8 in n.shape[-3:]]
    assert not decay_sized
