"""A decode step called again and again through the functional API (the prepared call kept per
shapes and options, dnir/api.py): every call's values are checked and its results are its own."""
from functools import partial

import numpy as np
import pytest

import dnir
from dnir.errors import InputWarning, NumericError
from dnir.models import delta_rule_reference
from delta_helpers import assert_bad_inputs_named_then_a_good_call_right, assert_close, unit_rows

STEPS = {"gdn": dnir.fused_recurrent_gated_delta_rule, "kda": dnir.fused_recurrent_kda}


def _step(rng, variant, B=3, H=2, HV=4, K=16, V=32, strong=False):
    """One token per sequence, GQA (HV = 2 H), an initial state; strong gates: g down to -20."""
    x = dict(q=unit_rows(rng.standard_normal((B, 1, H, K))), k=unit_rows(rng.standard_normal((B, 1, H, K))),
             v=rng.standard_normal((B, 1, HV, V)),
             g=-rng.uniform(0.0, 20.0 if strong else 0.5, (B, 1, HV) if variant == "gdn" else (B, 1, HV, K)),
             beta=rng.uniform(0.1, 0.9, (B, 1, HV)), initial_state=rng.standard_normal((B, HV, K, V)))
    return {n: a.astype(np.float32) for n, a in x.items()}


@pytest.mark.parametrize("target", ["llvm", "numpy"])
@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_steps_match_the_oracle_and_keep_their_own_results(rng, variant, target):
    """Five calls of one shape with fresh values (the second on runs the prepared call): each
    agrees with the float64 oracle, and a later call writes nothing a former one returned."""
    kept = []
    for i in range(5):
        x = _step(rng, variant, strong=i % 2 == 1)
        o, state = STEPS[variant](**x, output_final_state=True, target=target)
        o_ref, state_ref = delta_rule_reference(**x)
        assert_close(o, o_ref)
        assert_close(state, state_ref, what="final_state")
        assert not any(np.may_share_memory(r, a) for r in (o, state) for a in x.values())
        kept.append((o, state, o.copy(), state.copy()))
    for o, state, o_then, state_then in kept:
        assert np.array_equal(o, o_then) and np.array_equal(state, state_then)


@pytest.mark.parametrize("target", ["llvm", "numpy"])
@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_a_bad_value_in_a_later_call_is_still_reported(rng, variant, target):
    """The prepared call checks values as the first call does: a non-finite initial state (read
    only through the final state's column sums on llvm), a non-finite input, a positive gate."""
    f = STEPS[variant]
    f(**_step(rng, variant), output_final_state=True, target=target)
    for value, word in ((np.nan, "NaN"), (np.inf, "inf")):
        x = _step(rng, variant)
        x["initial_state"].flat[77] = value
        with pytest.raises(dnir.InputError, match=rf"initial_state contains {word} \(first at index \[0, 0, 2, 13\]"):
            f(**x, output_final_state=True, target=target)
    x = _step(rng, variant)
    x["v"][2, 0, 3, 5] = np.nan
    with pytest.raises(dnir.InputError, match=r"v contains NaN \(first at index \[2, 0, 3, 5\]"):
        f(**x, output_final_state=True, target=target)
    x = _step(rng, variant)
    x["g"][1, 0, 2] = 0.5
    with pytest.raises(dnir.InputError, match=r"g has \d+ value\(s\) above zero"):
        f(**x, output_final_state=True, target=target)
    o, _ = f(**x, output_final_state=True, target=target, allow_positive_gates=True)
    assert_close(o, delta_rule_reference(**x)[0])


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("final_state", [True, False], ids=["final", "o-only"])
@pytest.mark.parametrize("target", ["llvm", "numpy"])
@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_every_bad_input_of_a_later_step_is_named_with_its_index(rng, variant, target, final_state, B):
    """A later step's inputs are checked through its outputs (and g on its own): NaN, inf and -inf
    anywhere in any input (strong gates, GQA) is still the error naming the input and the index."""
    f = partial(STEPS[variant], target=target)
    f(**_step(rng, variant, B=B), output_final_state=final_state)
    assert_bad_inputs_named_then_a_good_call_right(f, lambda: _step(rng, variant, B=B, strong=True), rng, final_state)


@pytest.mark.parametrize("target", ["llvm", "numpy"])
def test_a_state_that_overflows_is_a_numeric_error_in_every_call(rng, target):
    """A final state past float32's range from finite inputs is a NumericError, not a result, in
    the first call and in the prepared ones. Here o stays finite (q = 0), so only the state's own
    check (on llvm: its column sums) sees it: k = (1, 1, 0, ...) / sqrt(2) against rows 0 and 1
    of the state, 3e38 and -3e38, predicts 0, so u = beta v = 2.7e38 is added to 3e38."""
    for _ in range(2):
        x = _step(rng, "gdn")
        x["g"][:], x["q"][:], x["k"][:], x["initial_state"][:] = 0.0, 0.0, 0.0, 0.0
        x["k"][..., :2] = 2 ** -0.5
        x["initial_state"][:, :, 0], x["initial_state"][:, :, 1] = 3e38, -3e38
        x["v"][:], x["beta"][:] = 3e38, 0.9
        with pytest.raises(NumericError, match=r"output final_state is not finite .* although every input is finite"):
            dnir.fused_recurrent_gated_delta_rule(**x, output_final_state=True, target=target)


def test_unstable_keys_warn_at_the_callers_line_in_every_call(rng):
    for _ in range(2):
        x = _step(rng, "gdn")
        x["k"][1, 0, 0] *= 3.0                                   # |k|^2 = 9
        with pytest.warns(InputWarning) as record:
            dnir.fused_recurrent_gated_delta_rule(**x, output_final_state=True, target="llvm")
        assert len(record) == 1 and record[0].filename == __file__


def test_the_key_of_a_prepared_call_tells_options_and_dtypes_apart(rng):
    """scale=True is refused after scale=1 ran (True == 1 in a dict key); float64 arrays of the
    same shapes, a state of another shape and a torch tensor take the general path."""
    x = _step(rng, "gdn")
    o, _ = dnir.fused_recurrent_gated_delta_rule(**x, scale=1, target="llvm")
    assert_close(o, delta_rule_reference(**x, scale=1.0)[0])
    with pytest.raises(dnir.InputError, match=r"scale=True; expected a positive number"):
        dnir.fused_recurrent_gated_delta_rule(**x, scale=True, target="llvm")
    o64, _ = dnir.fused_recurrent_gated_delta_rule(**{n: a.astype(np.float64) for n, a in x.items()}, scale=1,
                                                   target="llvm")
    assert o64.dtype == np.float64 and np.array_equal(o64.astype(np.float32), o)
    with pytest.raises(dnir.InputError, match=r"initial_state has shape \[3, 4, 16, 16\]"):
        dnir.fused_recurrent_gated_delta_rule(**dict(x, initial_state=x["initial_state"][..., :16]), scale=1,
                                              target="llvm")


@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_a_later_llvm_step_is_checked_through_its_kernels_report(rng, variant):
    """On llvm the prepared step takes its checks from decode_step's report (cpu_token_step.REPORT)
    rather than from passes over the arrays; with l2-normalised keys a large raw |k| is no warning."""
    import warnings
    from dnir.api import _PREPARED
    f = partial(STEPS[variant], output_final_state=True, target="llvm")
    f(**_step(rng, variant, B=2))
    x = _step(rng, variant, B=2)
    o, state = f(**x)
    assert_close(o, delta_rule_reference(**x)[0])
    (prepared,) = [p for p in _PREPARED.values() if p.fn == f.func.__name__ and p.target == "llvm"
                   and p.cfg.batch == 2 and not p.cfg.l2norm]
    assert prepared.report == 1
    x["k"] *= 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            o, _ = f(**x, use_qk_l2norm_in_kernel=True)
    assert_close(o, delta_rule_reference(**x, l2norm=True)[0])


@pytest.mark.parametrize("target", ["llvm", "numpy"])
@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_steps_in_place_carry_the_state_in_the_callers_array(rng, variant, target):
    """inplace_final_state=True: four steps on one state array (GQA, B = 2, strong gates every
    other step) agree with the float64 oracle run step by step; the final state returned is that
    array, o is a new one, and output_final_state=False still updates it."""
    f = partial(STEPS[variant], target=target, inplace_final_state=True)
    x = _step(rng, variant, B=2)
    state = x.pop("initial_state").copy()
    want = state.astype(np.float64)
    for i in range(4):
        x = {n: a for n, a in _step(rng, variant, B=2, strong=i % 2 == 1).items() if n != "initial_state"}
        o_ref, want = delta_rule_reference(**x, initial_state=want)
        o, final = f(**x, initial_state=state, output_final_state=i < 3)
        assert (final is state) if i < 3 else final is None
        assert not np.may_share_memory(o, state)
        assert_close(o, o_ref)
        assert_close(state, want, what="final_state")


def test_in_place_takes_a_torch_tensor(rng):
    torch = pytest.importorskip("torch")
    x = {n: torch.from_numpy(a) for n, a in _step(rng, "gdn").items()}
    before = x["initial_state"].clone()
    o, final = dnir.fused_recurrent_gated_delta_rule(**x, output_final_state=True, target="llvm",
                                                     inplace_final_state=True)
    assert final is x["initial_state"]
    o_ref, s_ref = delta_rule_reference(**{n: t.numpy() for n, t in dict(x, initial_state=before).items()})
    assert_close(o.numpy(), o_ref)
    assert_close(final.numpy(), s_ref, what="final_state")


@pytest.mark.parametrize("state, word", [(None, "None"), ("f64", "float64"), ("read-only", "read-only"),
                                         ("strided", "not contiguous")])
def test_in_place_needs_a_writable_float32_state(rng, state, word):
    x = _step(rng, "gdn")
    s = x.pop("initial_state")
    given = {None: None, "f64": s.astype(np.float64), "read-only": s.copy(), "strided": np.repeat(s, 2, -1)[..., ::2]}[state]
    if state == "read-only":
        given.flags.writeable = False
    with pytest.raises(dnir.InputError, match=rf"inplace_final_state=True writes the new state into initial_state.*{word}"):
        dnir.fused_recurrent_gated_delta_rule(**x, initial_state=given, target="llvm", inplace_final_state=True)
