"""The functional API runs O2 by default, and its results still match the oracle."""
import inspect

import numpy as np
import pytest

import dnir
from dnir.api import compiled_graph
from dnir.models import delta_rule_reference, relative_rms_error

FUNCTIONS = {
    "chunk_gated_delta_rule": "gdn", "chunk_kda": "kda",
    "fused_recurrent_gated_delta_rule": "gdn", "fused_recurrent_kda": "kda",
}


def draw(rng, variant, B, T, H=2, HV=4, K=8, V=4, N=None):
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    x = dict(q=unit(rng.standard_normal((B, T, H, K))), k=unit(rng.standard_normal((B, T, H, K))),
             v=rng.standard_normal((B, T, HV, V)),
             g=-rng.uniform(0.01, 1.0, (B, T, HV) if variant == "gdn" else (B, T, HV, K)),
             beta=rng.uniform(0.05, 0.95, (B, T, HV)))
    return {n: a.astype(np.float32) for n, a in x.items()}, rng.standard_normal((N or B, HV, K, V)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_o2_is_the_default(name):
    assert inspect.signature(getattr(dnir, name)).parameters["opt"].default == "O2"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_default_pipeline_matches_the_oracle(name, varlen):
    rng = np.random.default_rng(sum(map(ord, name)) + varlen)
    variant = FUNCTIONS[name]
    cu = np.array([0, 9, 40, 70]) if varlen else None
    x, s0 = draw(rng, variant, B=1 if varlen else 2, T=70 if varlen else 40, N=3 if varlen else None)
    o, state = getattr(dnir, name)(**x, initial_state=s0, output_final_state=True, cu_seqlens=cu, chunk_size=32)
    o_ref, s_ref = delta_rule_reference(**x, initial_state=s0, cu_seqlens=cu)
    assert relative_rms_error(o, o_ref) < 1e-5
    assert relative_rms_error(state, s_ref) < 1e-5


def test_decode_with_the_default_pipeline():
    rng = np.random.default_rng(5)
    x, s0 = draw(rng, "kda", B=3, T=1)
    o, state = dnir.fused_recurrent_kda(**x, initial_state=s0, output_final_state=True)
    o_ref, s_ref = delta_rule_reference(**x, initial_state=s0)
    assert relative_rms_error(o, o_ref) < 1e-5 and relative_rms_error(state, s_ref) < 1e-5
    assert compiled_graph.cache_info().currsize >= 1
