"""The functional API (flash-linear-attention's signatures) with NumPy arrays and torch tensors."""
import re
import warnings

import numpy as np
import pytest

import dnir
from dnir.errors import InputWarning, NumericError
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
    assert "scan" not in compiled_graph(decode, "O0", "numpy").op_histogram()
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
    assert compiled_graph.cache_info().misses == info.misses           # no graph built: the prepared call's
    assert state is None
    assert_close(o, delta_rule_reference(**y)[0])
    dnir.chunk_gated_delta_rule(**y, opt="O0", chunk_size=32)       # another option: another graph
    assert compiled_graph.cache_info().misses == info.misses + 1


@pytest.mark.parametrize("target", ["numpy", "llvm"])
def test_precision_changes_nothing_on_cpu_targets(rng, target):
    """precision picks CUDA's tensor-core products; the CPU targets compute in float32 either way."""
    if target == "llvm":
        pytest.importorskip("tvm")
    x, s0 = _inputs(rng, "kda", T=40)
    outs = [dnir.chunk_kda(**x, initial_state=s0, output_final_state=True, chunk_size=16, target=target,
                           precision=p) for p in (None, "highest", "tf32")]
    for o, state in outs[1:]:
        np.testing.assert_array_equal(o, outs[0][0])
        np.testing.assert_array_equal(state, outs[0][1])
    with pytest.raises(dnir.InputError, match="chunk_kda: precision='bf16'; expected one of highest, tf32"):
        dnir.chunk_kda(**x, target=target, precision="bf16")


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
    tx = {n: torch.from_numpy(a).double() for n, a in x.items()}
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


@pytest.mark.parametrize("target", ["numpy", "llvm"])
@pytest.mark.parametrize("fn", ["chunk_kda", "fused_recurrent_kda"])
def test_a_non_finite_initial_state_is_reported_when_the_final_state_is_returned(rng, fn, target):
    """The initial state's check is left to the final state's (one pass over the state, not two):
    a NaN or inf in it is still an InputError naming it, never a result."""
    args = _bad(rng, "kda", output_final_state=True, target=target)
    if fn == "fused_recurrent_kda":     # decode: one token per sequence
        args = dict({n: a[:, :3] for n, a in args.items() if n in ("q", "k", "v", "g", "beta")},
                    initial_state=args["initial_state"], cu_seqlens=np.array([0, 1, 2, 3]),
                    output_final_state=True, target=target)
    for value, word in ((np.nan, "NaN"), (np.inf, "inf")):
        state = args["initial_state"].copy()
        state.flat[7] = value
        with pytest.raises(dnir.InputError, match=rf"initial_state contains {word} \(first at index"):
            getattr(dnir, fn)(**dict(args, initial_state=state))


def test_large_finite_inputs_whose_sum_overflows_are_accepted(rng):
    """The finiteness checks sum first; an overflowing sum of finite values must not be
    reported as a bad input, nor an output whose sum overflows as a bad output."""
    x, _ = _inputs(rng, "gdn", T=8)
    v = x["v"].astype(np.float32).copy()
    v.flat[:4] = 3e38                     # the float32 sum overflows to inf
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.sum(v))
    x["v"] = v
    o, _ = dnir.chunk_gated_delta_rule(**x, opt="O0")
    assert np.isfinite(o).all()


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_an_output_that_overflows_float32_is_reported(rng, fn):
    variant, f = FUNCTIONS[fn]
    x, _ = _inputs(rng, variant, T=8)
    x["v"] = np.full_like(x["v"], 3e38)   # finite; the state learns v, and o = scale q.k v = 6e38
    x["q"] = x["k"].copy()
    with pytest.raises(NumericError, match=rf"{fn}: output o is not finite .* although every input is finite: "
                                           rf"the result overflows float32 .*3e\+38 in v"):
        f(**x, scale=2.0, opt="O0")


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_positive_gates_are_refused_unless_allowed(rng, fn):
    variant, f = FUNCTIONS[fn]
    x, _ = _inputs(rng, variant, T=20)
    index = (1, 7, 3) + ((5,) if variant == "kda" else ())
    x["g"][index] = 0.25
    x["g"][(1, 9) + index[2:]] = 0.5
    with pytest.raises(dnir.InputError, match=rf"{fn}: g has 2 value\(s\) above zero \(first at index "
                                                rf"\[{', '.join(map(str, index))}\]: 0.25\)"):
        f(**x, opt="O0")
    o, _ = f(**x, opt="O0", allow_positive_gates=True)
    assert_close(o, delta_rule_reference(**x)[0])
    x["g"][x["g"] > 0] = 0.0                                        # zero is a gate that keeps everything
    f(**x, opt="O0")


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_unstable_keys_warn_once_naming_the_worst_token(rng, fn):
    variant, f = FUNCTIONS[fn]
    x, _ = _inputs(rng, variant, T=20)
    x["k"][0, 4, 1] *= 1.5                                           # |k|^2 = 2.25
    x["k"][1, 11, 0] *= 3.0                                          # |k|^2 = 9: the worst
    x["beta"][1, 11, :2] = 0.1, 0.9                                  # value heads 0 and 1 read key head 0
    x["beta"][0, 4, 2:] = 0.95
    worst = 9.0 * 0.9
    with pytest.warns(InputWarning) as record:
        f(**x, opt="O0")
    assert len(record) == 1
    message = str(record[0].message)
    assert f"beta * |k|^2 = {worst:.4g} >= 2 at batch 1, token 11, value head 1 (the worst of 3)" in message
    assert record[0].filename == __file__                             # points at the call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(**x, opt="O0", use_qk_l2norm_in_kernel=True)              # normalised in the graph: stable


@pytest.mark.parametrize("target", ["numpy", "llvm"])
@pytest.mark.parametrize("fn", FUNCTIONS)
def test_check_values_false_drops_the_value_checks_and_keeps_the_rest(rng, fn, target):
    """check_values=False: the same outputs, and no check of values (a NaN, a positive gate, unstable
    keys pass through, in the first call and in the ones after it, which a CPU target serves from
    the call it prepared); shapes are still checked."""
    variant, f = FUNCTIONS[fn]
    x, s0 = _inputs(rng, variant, B=3, T=1 if fn.startswith("fused") else 20)
    options = dict(initial_state=s0, output_final_state=True, target=target)
    checked = f(**x, **options)
    for _ in range(2):
        unchecked = f(**x, **options, check_values=False)
        for a, b in zip(unchecked, checked):
            np.testing.assert_array_equal(a, b)
    bad = dict(x, v=x["v"].copy(), g=x["g"].copy(), k=x["k"] * 3.0)
    bad["v"].flat[2] = np.nan
    bad["g"].flat[-1] = 0.5
    with pytest.raises(dnir.InputError, match="v contains NaN"):
        f(**bad, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                # beta |k|^2 up to 8: no warning
        for _ in range(2):
            o, state = f(**bad, **options, check_values=False)
            assert np.isnan(o).any() and np.isnan(state).any()
    with pytest.raises(dnir.InputError, match=r"v has shape \[3, .*\]; expected \[B, T, HV, V\]"):
        f(**dict(x, v=x["v"][..., None]), **options, check_values=False)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_missing_arrays_and_options_of_the_wrong_kind(rng, fn):
    variant, f = FUNCTIONS[fn]
    x, _ = _inputs(rng, variant, T=20)
    for name in ("q", "k", "v", "g", "beta"):
        with pytest.raises(dnir.InputError, match=rf"{fn}: {name} is None; expected an array"):
            f(**{**x, name: None}, opt="O0")
    for option, value, words in [("chunk_size", 64.0, "chunk_size=64.0; expected the integer 16, 32 or 64"),
                                 ("chunk_size", True, "chunk_size=True"),
                                 ("opt", None, "opt=None; expected a pipeline"),
                                 ("opt", "", "opt=''; expected a pipeline"),
                                 ("target", None, "target=None; expected a backend name"),
                                 ("check_values", 1, "check_values=1; expected True or False")]:
        with pytest.raises(dnir.InputError, match=re.escape(f"{fn}: {words}")):
            f(**x, **{"opt": "O0", option: value})
    o, _ = f(**x, opt="O0", chunk_size=np.int64(16))              # a NumPy integer is an integer
    assert_close(o, delta_rule_reference(**x)[0])


def test_torch_tensors_that_require_grad_are_refused_while_autograd_records(rng):
    torch = pytest.importorskip("torch")
    x, _ = _inputs(rng, "gdn")
    tx = {n: torch.from_numpy(a).requires_grad_(n in ("k", "beta")) for n, a in x.items()}
    with pytest.raises(dnir.InputError, match="k, beta require.* forward pass only .*torch.no_grad()"):
        dnir.chunk_gated_delta_rule(**tx, opt="O0")
    with torch.no_grad():                                           # nothing is recorded: the values are used
        o, _ = dnir.chunk_gated_delta_rule(**tx, opt="O0")
    assert not o.requires_grad
    assert_close(o.numpy(), delta_rule_reference(**x)[0])


def test_the_memory_a_call_needs_is_checked_before_it_runs(rng, monkeypatch):
    """On NumPy the planned compute buffer and the inputs must fit the machine (here: a
    machine of 1 MiB), else an InputError names the figures before anything is allocated."""
    import dnir.limits
    x, _ = _inputs(rng, "kda", T=40)
    monkeypatch.setattr(dnir.limits, "machine_memory", lambda: 2**20)
    with pytest.raises(dnir.InputError, match=r"chunk_kda: running needs at least .* MiB \(planned compute buffer "
                                              r".* \+ inputs .* KiB\), more than this machine's 1.0 MiB"):
        dnir.chunk_kda(**x, opt="O0")


def test_unknown_pipeline_and_target(rng):
    x, _ = _inputs(rng, "gdn", T=8)
    with pytest.raises(dnir.DnirError, match="no-such-pipeline"):
        dnir.chunk_gated_delta_rule(**x, opt="no-such-pipeline")
    with pytest.raises(dnir.BackendError, match="no-such-target"):
        dnir.chunk_gated_delta_rule(**x, opt="O0", target="no-such-target")


@pytest.mark.parametrize("seq_len", [10**12, 10**30])
def test_sizes_are_bounded_before_anything_is_built(seq_len):
    """The API, `dnir build` and a file's metadata all make a DeltaNetConfig: the bound is
    checked there, by arithmetic on the sizes, before a graph is built or planned."""
    with pytest.raises(dnir.InputError, match=rf"seq_len={seq_len}.*: q would be f32\[1, {seq_len}, 2, 16\], "
                                              rf".* elements, .*iB; a tensor may have at most 2\*\*40 elements"):
        dnir.models.DeltaNetConfig("gdn", seq_len=seq_len)
    cfg = dnir.models.DeltaNetConfig("gdn", seq_len=2**20)            # large, but within the bound
    with pytest.raises(dnir.InputError, match="seed -1: expected an integer >= 0"):
        dnir.models.random_inputs(cfg, -1)
