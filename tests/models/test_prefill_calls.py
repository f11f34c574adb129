"""A prefill called again through the functional API (the prepared call, dnir/api.py): its inputs
are checked through its outputs, and every bad value is still an error naming the argument and
the position, as the first call's checks name it."""
from functools import partial

import numpy as np
import pytest

import dnir
from dnir.errors import InputWarning, NumericError
from dnir.models import delta_rule_reference
from delta_helpers import assert_bad_inputs_named_then_a_good_call_right, assert_close, unit_rows

CHUNKED = {"gdn": dnir.chunk_gated_delta_rule, "kda": dnir.chunk_kda}


def _prefill(rng, variant, B=2, T=70, H=2, HV=4, K=16, V=32):
    """T not a multiple of the chunk, GQA (HV = 2 H), gates strong enough that states decay to 0."""
    x = dict(q=unit_rows(rng.standard_normal((B, T, H, K))), k=unit_rows(rng.standard_normal((B, T, H, K))),
             v=rng.standard_normal((B, T, HV, V)),
             g=-rng.uniform(0.0, 8.0, (B, T, HV) if variant == "gdn" else (B, T, HV, K)),
             beta=rng.uniform(0.1, 0.9, (B, T, HV)), initial_state=rng.standard_normal((B, HV, K, V)))
    return {n: a.astype(np.float32) for n, a in x.items()}


@pytest.mark.parametrize("final_state", [True, False], ids=["final", "o-only"])
@pytest.mark.parametrize("target", ["llvm", "numpy"])
@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_a_bad_value_in_a_later_prefill_is_reported_by_name_and_index(rng, variant, target, final_state):
    f = partial(CHUNKED[variant], target=target)
    x = _prefill(rng, variant)
    o, _ = f(**x, output_final_state=final_state)
    assert_close(o, delta_rule_reference(**x)[0])
    assert_bad_inputs_named_then_a_good_call_right(f, lambda: _prefill(rng, variant), rng, final_state)


@pytest.mark.parametrize("target", ["llvm", "numpy"])
def test_a_later_prefill_warns_on_unstable_keys_and_refuses_positive_gates(rng, target):
    f = CHUNKED["gdn"]
    f(**_prefill(rng, "gdn"), output_final_state=True, target=target)
    x = _prefill(rng, "gdn")
    x["k"][1, 33, 0] *= 3.0                                   # |k|^2 = 9
    with pytest.warns(InputWarning) as record:
        f(**x, output_final_state=True, target=target)
    assert len(record) == 1 and record[0].filename == __file__
    assert "at batch 1, token 33, value head" in str(record[0].message)
    x = _prefill(rng, "gdn")
    x["g"][0, 65, 3] = 0.5
    with pytest.raises(dnir.InputError, match=r"g has 1 value\(s\) above zero \(first at index \[0, 65, 3\]"):
        f(**x, output_final_state=True, target=target)
    o, _ = f(**x, output_final_state=True, target=target, allow_positive_gates=True)
    assert_close(o, delta_rule_reference(**x)[0])


@pytest.mark.parametrize("target", ["llvm", "numpy"])
def test_a_later_prefill_that_overflows_is_a_numeric_error(rng, target):
    """Finite inputs whose o passes float32's range: a NumericError in the first call and in the
    prepared ones, never a result."""
    for _ in range(2):
        x = _prefill(rng, "gdn")
        x["v"][:] = 3e38
        x["q"] = x["k"].copy()
        with pytest.raises(NumericError, match=r"output o is not finite .* although every input is finite"):
            dnir.chunk_gated_delta_rule(**x, scale=2.0, output_final_state=True, target=target)
