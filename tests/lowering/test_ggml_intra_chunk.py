"""ggml's batched intra_chunk (lowering/ggml/intra_chunk.py) in O2 layers against NumPy's O0."""
import numpy as np
import pytest

from dnir.api import compiled_graph
from dnir.lowering.ggml.build import GgmlUnavailable, ggml_build
from dnir.lowering.registry import prepare, run
from dnir.models import preset, random_inputs


def _missing():
    try:
        ggml_build()
    except GgmlUnavailable as e:
        return str(e)
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason="ggml cannot be built here")


def _rel(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


@pytest.mark.parametrize("seq_len,batch,initial,heads", [(130, 3, True, 16), (64, 1, False, 16), (200, 2, True, 16),
                                                         (192, 2, True, 16), (128, 2, True, 32)])
def test_gda_layer_with_ggml_intra_chunk_matches_numpy(seq_len, batch, initial, heads):
    # qwen3-next: GQA (16 q/k heads, 32 value heads), a gate per head; whole chunks read q and k
    # before their repeat and q before its scale (intra_chunk._head_operands), as do 32 q/k heads
    cfg = preset("qwen3-next", seq_len=seq_len, batch=batch, heads=heads, mode="chunked", initial_state=initial,
                 final_state=True)
    graph = compiled_graph(cfg, "O2", "ggml")
    assert any(n.op == "intra_chunk" for n in prepare(graph, "ggml").topo_order())
    x = random_inputs(cfg, int(np.random.default_rng().integers(1 << 30)))
    x["g"] = x["g"] * 8.0          # strong gates: decays underflow inside a chunk
    ref = run(compiled_graph(cfg, "O0"), {k: v.astype(np.float64) for k, v in x.items()}, "numpy")
    for out, want in zip(run(graph, x, "ggml"), ref):
        assert _rel(out, want) < 1e-5


def test_kda_keeps_o2_blocks_on_ggml():
    cfg = preset("kimi-linear", seq_len=100, mode="chunked", initial_state=True, final_state=True)
    graph = prepare(compiled_graph(cfg, "O2", "ggml"), "ggml")
    assert not any(n.op == "intra_chunk" for n in graph.topo_order())
