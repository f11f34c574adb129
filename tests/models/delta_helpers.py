"""Input drawing and comparison shared by the delta-net model tests."""
import re
import warnings

import numpy as np
import pytest

from dnir.errors import InputError
from dnir.models import DeltaNetConfig, delta_rule_reference, relative_rms_error

TOL = 1e-5   # rms(err) / rms(ref) for float32 against the float64 oracle


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def draw(cfg: DeltaNetConfig, rng, gate_shift=-2.0) -> dict:
    """Fresh float32 inputs for cfg: g <= 0, beta in (0, 1), unit keys unless the graph normalises them."""
    shapes = cfg.input_shapes()
    q, k = rng.standard_normal(shapes["q"]), rng.standard_normal(shapes["k"])
    if not cfg.l2norm:
        q, k = unit_rows(q), unit_rows(k)
    else:   # unnormalised, of varied size: the graph must normalise them
        q, k = 3.0 * q, 0.5 * k
    x = {"q": q, "k": k, "v": rng.standard_normal(shapes["v"]),
         "g": -np.logaddexp(0.0, rng.standard_normal(shapes["g"]) + gate_shift),
         "beta": rng.uniform(0.05, 0.95, shapes["beta"])}
    if cfg.initial_state:
        x["initial_state"] = rng.standard_normal(shapes["initial_state"])
    return {name: a.astype(np.float32) for name, a in x.items()}


def oracle(cfg: DeltaNetConfig, x: dict):
    return delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=cfg.scale,
                                initial_state=x.get("initial_state"), l2norm=cfg.l2norm,
                                cu_seqlens=cfg.cu_seqlens)


def assert_close(out, ref, tol=TOL, what="o"):
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert np.isfinite(out).all(), f"{what} has non-finite values"
    err = relative_rms_error(out, ref)
    assert err < tol, f"{what}: rms(err)/rms(ref) = {err:.3e} >= {tol:.0e}"


def assert_bad_inputs_named_then_a_good_call_right(call, make, rng, final_state: bool):
    """call(**x, output_final_state=...) again and again on fresh inputs from make(): NaN, inf and -inf
    at a random index of each input is the InputError naming the input and that index; then a good
    call after them agrees with the float64 oracle, without a warning."""
    for name in ("q", "k", "v", "g", "beta", "initial_state"):
        for value, word in ((np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")):
            x = make()
            index = tuple(int(rng.integers(n)) for n in x[name].shape)
            x[name][index] = value
            where = re.escape(str(list(index)))
            with pytest.raises(InputError, match=rf"{name} contains {word} \(first at index {where}"):
                call(**x, output_final_state=final_state)
    x = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, state = call(**x, output_final_state=final_state)
    o_ref, state_ref = delta_rule_reference(**x)
    assert_close(o, o_ref)
    if final_state:
        assert_close(state, state_ref, what="final_state")
