"""The functional API (flash-linear-attention's signatures) with NumPy arrays and torch tensors."""
import numpy as np
import pytest

import dnir
from dnir.api import compiled_graph
from dnir.models import delta_rule_reference
from delta_helpers import assert_close, unit_rows

FUNCTIONS = {
    "chunk_gated_delta_rule": ("gdn", dnir.chunk_gated_delta_rule),
    "chunk_kda": ("kda", dnir.chunk_kda),
    "fused_recurrent_gated_delta_rule": ("gdn", dnir.fused_recurrent_gated_delta_rule),
    "fused_recurrent_kda": ("kda", dnir.fused_recurrent_kda),
}


def _inputs(rng, variant, B=2, T=40, H=2, HV=4, K=8, V=4, N=None, unit=True):
    q, k = rng.standard_normal((B, T, H, K)), rng.standard_normal((B, T, H, K))
    if unit:
        q, k = unit_rows(q), unit_rows(k)
    x = dict(q=q, k=k, v=rng.standard_normal((B, T, HV, V)),
             g=-rng.uniform(0.0, 0.5, (B, T, HV) if variant == "gdn" else (B, T, HV, K)),
             beta=rng.uniform(0.1, 0.9, (B, T, HV)))
    state = rng.standard_normal((N or B, HV, K, V))
    return {n: a.astype(np.float32) for n, a in x.items()}, state.astype(np.float32)


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_numpy_matches_oracle(rng, fn, varlen):
    variant, f = FUNCTIONS[fn]
    cu = np.array([0, 7, 40, 90]) if varlen else None
    x, s0 = _inputs(rng, variant, B=1 if varlen else 2, T=90 if varlen else 40, N=3 if varlen else None,
                    unit=False)
    o, state = f(**x, scale=0.4, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True,
                 cu_seqlens=cu, chunk_size=16, opt="O0")
    assert isinstance(o, np.ndarray) and o.dtype == np.float32 and state.dtype == np.float32
    o_ref, state_ref = delta_rule_reference(**x, scale=0.4, initial_state=s0, l2norm=True, cu_seqlens=cu)
    assert_close(o, o_ref)
    assert_close(state, state_ref, what="final_state")


@pytest.mark.parametrize("fn", ["fused_recurrent_gated_delta_rule", "fused_recurrent_kda"])
def test_recurrent_with_one_token_runs_the_decode_graph(rng, fn):
    variant, f = FUNCTIONS[fn]
    x, s0 = _inputs(rng, variant, B=3, T=1)
    misses = compiled_graph.cache_info().misses
    o, state = f(**x, initial_state=s0, output_final_state=True, opt="O0")
    assert compiled_graph.cache_info().misses == misses + 1
    decode = dnir.models.DeltaNetConfig(variant, batch=3, seq_len=1, heads=2, value_heads=4, head_dim=8,
                                        value_dim=4, mode="decode", initial_state=True, final_state=True)
    hits = compiled_graph.cache_info().hits
    assert "scan" not in compiled_graph(decode, "O0").op_histogram()
    assert compiled_graph.cache_info().hits == hits + 1          # the call above built exactly this graph
    o_ref, state_ref = delta_rule_reference(**x, initial_state=s0)
    assert_close(o, o_ref)
    assert_close(state, state_ref, what="final_state")


def test_graphs_are_cached_by_shapes_and_options(rng):
    x, _ = _inputs(rng, "gdn", T=33)
    dnir.chunk_gated_delta_rule(**x, opt="O0")
    info = compiled_graph.cache_info()
    y, _ = _inputs(rng, "gdn", T=33)
    o, state = dnir.chunk_gated_delta_rule(**y, opt="O0")           # new values, same shapes and options
    assert compiled_graph.cache_info().hits == info.hits + 1 and compiled_graph.cache_info().misses == info.misses
    assert state is None
    assert_close(o, delta_rule_reference(**y)[0])
    dnir.chunk_gated_delta_rule(**y, opt="O0", chunk_size=32)       # another option: another graph
    assert compiled_graph.cache_info().misses == info.misses + 1


def test_default_scale_is_inverse_sqrt_head_dim(rng):
    x, _ = _inputs(rng, "kda", K=16)
    o_default, _ = dnir.chunk_kda(**x, opt="O0")
    o_explicit, _ = dnir.chunk_kda(**x, scale=0.25, opt="O0")
    np.testing.assert_array_equal(o_default, o_explicit)


def test_numpy_output_follows_q_dtype_and_numpy_scalars_work(rng):
    x, _ = _inputs(rng, "gdn")
    x64 = {n: a.astype(np.float64) for n, a in x.items()}
    o64, _ = dnir.chunk_gated_delta_rule(**x64, scale=np.float32(0.5), opt="O0")
    o32, _ = dnir.chunk_gated_delta_rule(**x, scale=0.5, opt="O0")
    assert o64.dtype == np.float64 and o32.dtype == np.float32
    np.testing.assert_array_equal(o64, o32)       # computed in float32 either way


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_torch_tensors_in_torch_tensors_out(rng, fn):
    torch = pytest.importorskip("torch")
    variant, f = FUNCTIONS[fn]
    x, s0 = _inputs(rng, variant, B=1, T=50, N=2)
    cu = np.array([0, 20, 50])
    o_np, state_np = f(**x, initial_state=s0, output_final_state=True, cu_seqlens=cu, opt="O0")
    tx = {n: torch.from_numpy(a).double().requires_grad_(n == "q") for n, a in x.items()}
    o, state = f(**tx, initial_state=torch.from_numpy(s0), output_final_state=True,
                 cu_seqlens=torch.from_numpy(cu), opt="O0")
    assert isinstance(o, torch.Tensor) and isinstance(state, torch.Tensor)
    assert o.dtype == torch.float64 and state.dtype == torch.float32       # o follows q; states are float32
    assert o.shape == (1, 50, 4, 4) and state.shape == (2, 4, 8, 4)
    np.testing.assert_allclose(o.numpy(), o_np, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(state.numpy(), state_np)


def test_torch_half_precision_inputs(rng):
    torch = pytest.importorskip("torch")
    x, _ = _inputs(rng, "gdn")
    tx = {n: torch.from_numpy(a).to(torch.bfloat16) for n, a in x.items()}
    o, _ = dnir.fused_recurrent_gated_delta_rule(**tx, opt="O0")
    assert o.dtype == torch.bfloat16
    ref, _ = delta_rule_reference(**{n: t.float().numpy() for n, t in tx.items()})
    assert_close(o.float().numpy(), ref, tol=1e-2)                   # bf16 rounding of the output


def _bad(rng, variant="gdn", **changes):
    x, s0 = _inputs(rng, variant, B=1, T=40, N=3)
    args = dict(x, initial_state=s0, cu_seqlens=np.array([0, 10, 25, 40]), opt="O0")
    args.update(changes)
    return args


BAD = [
    # (name, function, changes(rng) -> args, words that must be in the message)
    ("q rank", "chunk_gated_delta_rule", lambda r: dict(q=np.ones((40, 2, 8), np.float32)),
     ["q", "rank 4 [B, T, H, K]"]),
    ("k shape", "chunk_gated_delta_rule", lambda r: dict(k=np.ones((1, 40, 2, 4), np.float32)),
     ["k", "[1, 40, 2, 8]"]),
    ("v tokens", "chunk_kda", lambda r: dict(v=np.ones((1, 39, 4, 4), np.float32)),
     ["v", "[B, T, HV, V] = [1, 40, HV, V]"]),
    ("HV not a multiple of H", "chunk_gated_delta_rule",
     lambda r: dict(v=np.ones((1, 40, 3, 4), np.float32), g=-np.ones((1, 40, 3), np.float32),
                    beta=np.ones((1, 40, 3), np.float32) / 2),
     ["v", "HV=3", "not a multiple", "H=2"]),
    ("kda gate to gdn", "chunk_gated_delta_rule", lambda r: dict(g=-np.ones((1, 40, 4, 8), np.float32)),
     ["g", "[B, T, HV] = [1, 40, 4]", "chunk_kda"]),
    ("gdn gate to kda", "fused_recurrent_kda", lambda r: dict(g=-np.ones((1, 40, 4), np.float32)),
     ["g", "[B, T, HV, K] = [1, 40, 4, 8]", "chunk_gated_delta_rule"]),
    ("beta shape", "chunk_kda", lambda r: dict(beta=np.ones((1, 40, 2), np.float32)),
     ["beta", "[1, 40, 4]"]),
    ("cu not increasing", "chunk_gated_delta_rule", lambda r: dict(cu_seqlens=np.array([0, 25, 10, 40])),
     ["cu_seqlens", "not strictly increasing"]),
    ("cu not ending at T", "fused_recurrent_gated_delta_rule",
     lambda r: dict(cu_seqlens=np.array([0, 10, 25, 39])), ["cu_seqlens", "T=40"]),
    ("cu of floats", "chunk_kda", lambda r: dict(cu_seqlens=np.array([0.0, 10.0, 40.0])),
     ["cu_seqlens", "integer"]),
    ("B != 1 with cu", "chunk_gated_delta_rule",
     lambda r: {n: np.concatenate([a, a]) for n, a in _inputs(r, "gdn", B=1, T=40)[0].items()},
     ["cu_seqlens", "B=1", "B=2"]),
    ("state shape", "chunk_kda", lambda r: dict(initial_state=np.ones((1, 4, 8, 4), np.float32)),
     ["initial_state", "[N, HV, K, V] = [3, 4, 8, 4]"]),
    ("chunk size", "chunk_kda", lambda r: dict(chunk_size=128), ["chunk_size=128", "16, 32 or 64"]),
    ("scale", "chunk_kda", lambda r: dict(scale=0.0), ["scale"]),
    ("int q", "chunk_kda", lambda r: dict(q=np.ones((1, 40, 2, 8), np.int64)), ["q", "floating-point"]),
]


@pytest.mark.parametrize("name,fn,changes,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument_and_expected_shape(rng, name, fn, changes, words):
    variant, f = FUNCTIONS[fn]
    with pytest.raises(dnir.InputError) as e:
        f(**_bad(rng, variant, **changes(rng)))
    for word in words:
        assert word in str(e.value), (word, str(e.value))
    assert fn in str(e.value)


@pytest.mark.parametrize("arg", ["q", "k", "v", "g", "beta", "initial_state"])
@pytest.mark.parametrize("value,word", [(np.nan, "NaN"), (np.inf, "inf")])
def test_non_finite_inputs_are_reported(rng, arg, value, word):
    args = _bad(rng, "kda")
    bad = args[arg].copy()
    bad.flat[5] = value
    args[arg] = bad
    with pytest.raises(dnir.InputError, match=rf"{arg} contains {word} \(first at index"):
        dnir.chunk_kda(**args)


def test_large_finite_inputs_whose_sum_overflows_are_accepted(rng):
    """The finiteness check sums first; an overflowing sum of finite values must not be
    reported as a bad input."""
    x, _ = _inputs(rng, "gdn", T=8)
    v = x["v"].astype(np.float32).copy()
    v.flat[:4] = 3e38                     # the float32 sum overflows to inf
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.sum(v))
    x["v"] = v
    o, _ = dnir.chunk_gated_delta_rule(**x, opt="O0")
    assert o.shape == x["v"].shape


def test_unknown_pipeline_and_target(rng):
    x, _ = _inputs(rng, "gdn", T=8)
    with pytest.raises(dnir.DnirError, match="no-such-pipeline"):
        dnir.chunk_gated_delta_rule(**x, opt="no-such-pipeline")
    with pytest.raises(dnir.BackendError, match="no-such-target"):
        dnir.chunk_gated_delta_rule(**x, opt="O0", target="no-such-target")
