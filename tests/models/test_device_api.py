"""The functional API's GPU path (target="cuda" with torch tensors on a GPU), run here on CPU
torch tensors: the module call (runtime_loader.run_layer) is replaced by the NumPy backend
reading the same memory through DLPack, so what the API hands over and returns is checked
without a GPU: no copy of a tensor the graph can read as it is, dtype conversions where the
graph reads another, torch tensors back, and every check of the host path with its message."""
import numpy as np
import pytest

import dnir
from dnir import api
from dnir.errors import InputError, InputWarning, NumericError
from dnir.lowering import numpy_backend, runtime_loader
from dnir.models import delta_rule_reference, relative_rms_error

torch = pytest.importorskip("torch")


@pytest.fixture
def device(monkeypatch):
    """CPU tensors take the GPU path; the layer is its graph, run by the NumPy backend on what the
    module would have been given, which the call records."""
    calls = []

    def cuda_layer(cfg, opt, graph, arch="sm_90", device=0):
        g = graph()
        return runtime_loader.Layer(g, None, None, g.input_names, tuple(t.dtype for t in g.input_types),
                                    g.output_names)

    def run_layer(layer, tensors, stream=None):
        calls.append(list(tensors))
        arrays = {n: np.from_dlpack(t) if t.dtype != torch.bfloat16 else api._to_numpy(t, n, "test")
                  for n, t in zip(layer.input_names, tensors)}
        outputs = numpy_backend.run(layer.vm, arrays)
        return [torch.from_numpy(np.ascontiguousarray(o)) if o.dtype.name != "bfloat16"
                else torch.from_numpy(o.view(np.int16)).view(torch.bfloat16) for o in outputs]

    monkeypatch.setattr(api, "_on_gpu", lambda tensor: True)
    monkeypatch.setattr(runtime_loader, "cuda_layer", cuda_layer)
    monkeypatch.setattr(runtime_loader, "run_layer", run_layer)
    return calls


def _draw(rng, variant="gdn", B=2, T=40, H=2, HV=4, K=16, V=16):
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    x = dict(q=unit(rng.standard_normal((B, T, H, K))), k=unit(rng.standard_normal((B, T, H, K))),
             v=rng.standard_normal((B, T, HV, V)),
             g=-rng.uniform(0.01, 1.0, (B, T, HV) if variant == "gdn" else (B, T, HV, K)),
             beta=rng.uniform(0.05, 0.95, (B, T, HV)), initial_state=rng.standard_normal((B, HV, K, V)))
    return {n: torch.from_numpy(a.astype(np.float32)).clone() for n, a in x.items()}   # torch memory: aligned


@pytest.mark.parametrize("fn,variant", [("chunk_gated_delta_rule", "gdn"), ("chunk_kda", "kda")])
def test_tensors_cross_without_a_copy_and_match_the_oracle(device, rng, fn, variant):
    x = _draw(rng, variant)
    o, state = getattr(dnir, fn)(**x, output_final_state=True, chunk_size=32, target="cuda")
    assert isinstance(o, torch.Tensor) and o.dtype == torch.float32 and state.dtype == torch.float32
    given = device[-1]
    for name, t in zip(("q", "k", "v", "g", "beta", "initial_state"), given):
        assert t.data_ptr() == x[name].data_ptr(), f"{name} was copied"
    ref_o, ref_s = delta_rule_reference(**{n: t.numpy() for n, t in x.items()})
    assert relative_rms_error(o.numpy(), ref_o) < 1e-5 and relative_rms_error(state.numpy(), ref_s) < 1e-5


def test_conversions_happen_on_the_device(device, rng):
    x = _draw(rng)
    x["q"] = x["q"].to(torch.bfloat16)
    x["k"], x["v"], x["beta"] = (x[n].to(torch.bfloat16) for n in ("k", "v", "beta"))
    x["g"] = x["g"].double()                                          # read as float32
    x["initial_state"] = x["initial_state"].transpose(2, 3).contiguous().transpose(2, 3)   # not contiguous
    o, state = dnir.chunk_gated_delta_rule(**x, output_final_state=True, target="cuda")
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    given = dict(zip(("q", "k", "v", "g", "beta", "initial_state"), device[-1]))
    assert given["q"].dtype == torch.bfloat16 and given["q"].data_ptr() == x["q"].data_ptr()
    assert given["g"].dtype == torch.float32
    assert given["initial_state"].is_contiguous() and torch.equal(given["initial_state"], x["initial_state"])
    ref_o, _ = delta_rule_reference(**{n: t.float().numpy() for n, t in x.items()})
    assert relative_rms_error(o.float().numpy(), ref_o) < 1e-2


def test_a_misaligned_view_is_copied_to_aligned_memory():
    base = torch.zeros(1000)
    view = base[1:513]
    assert view.data_ptr() % api.ALIGNMENT != 0
    aligned = api._aligned(view)
    assert aligned.data_ptr() % api.ALIGNMENT == 0 and torch.equal(aligned, view)
    assert api._aligned(base).data_ptr() == base.data_ptr()


def test_bad_inputs_raise_the_host_paths_errors(device, rng):
    x = _draw(rng)
    x["v"][1, 7, 2, 3] = float("nan")
    with pytest.raises(InputError, match=r"v contains NaN \(first at index \[1, 7, 2, 3\]"):
        dnir.chunk_gated_delta_rule(**x, target="cuda")
    x = _draw(rng)
    x["g"][0, 3, 1] = 0.5
    with pytest.raises(InputError, match=r"g has 1 value\(s\) above zero \(first at index \[0, 3, 1\]"):
        dnir.chunk_gated_delta_rule(**x, target="cuda")
    x = _draw(rng)
    x["k"][1, 5, 0] *= 3.0
    x["beta"][1, 5, 1] = 0.9
    with pytest.warns(InputWarning, match=r"beta \* \|k\|\^2 = 8.1 >= 2 at batch 1, token 5, value head 1") as w:
        dnir.chunk_gated_delta_rule(**x, target="cuda")
    assert w[0].filename == __file__                                  # points at the call


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["q", "k", "v", "g", "beta"])
def test_every_non_finite_input_is_found_on_the_device(device, rng, name, bad):
    x = _draw(rng)
    x["beta"][0, 2, 2:] = -0.5              # k head 1's value heads: -inf, not above the bound, for an inf k
    x[name][0, 2, 1] = bad
    kind = "NaN" if bad != bad else "inf"
    with pytest.raises(InputError, match=rf"{name} contains {kind} \(first at index \[0, 2, 1"):
        dnir.chunk_gated_delta_rule(**x, output_final_state=True, target="cuda")


def test_a_bad_initial_state_is_named_though_the_final_states_check_finds_it(device, rng):
    x = _draw(rng)
    x["initial_state"][1, 2, 3, 4] = float("inf")
    with pytest.raises(InputError, match=r"initial_state contains inf \(first at index \[1, 2, 3, 4\]"):
        dnir.chunk_gated_delta_rule(**x, output_final_state=True, target="cuda")


def test_an_overflowing_output_is_a_numeric_error(device, monkeypatch, rng):
    run = runtime_loader.run_layer

    def overflow(*args, **kwargs):
        o, s = run(*args, **kwargs)
        o[0, 0, 0, 0] = float("inf")
        return [o, s]

    monkeypatch.setattr(runtime_loader, "run_layer", overflow)
    with pytest.raises(NumericError, match="output o is not finite"):
        dnir.chunk_gated_delta_rule(**_draw(rng), output_final_state=True, target="cuda")


def test_check_values_false_runs_the_module_alone(device, monkeypatch, rng):
    """No reduction and no read back (no synchronisation): the module's outputs as they are, a NaN
    input's included; the shapes are still checked."""
    x = _draw(rng)
    checked = dnir.chunk_gated_delta_rule(**x, output_final_state=True, target="cuda")

    def no_checks(*args):
        raise AssertionError("the device checks ran")

    monkeypatch.setattr(api, "_device_checks", no_checks)
    unchecked = dnir.chunk_gated_delta_rule(**x, output_final_state=True, target="cuda", check_values=False)
    assert all(torch.equal(a, b) for a, b in zip(unchecked, checked))
    x["v"][1, 7, 2, 3] = float("nan")
    x["g"][0, 3, 1] = 0.5
    o, state = dnir.chunk_gated_delta_rule(**x, output_final_state=True, target="cuda", check_values=False)
    assert torch.isnan(o).any() and torch.isnan(state).any()
    with pytest.raises(InputError, match=r"beta has shape \[2, 40\]; expected \[B, T, HV\]"):
        dnir.chunk_gated_delta_rule(**dict(x, beta=x["beta"][..., 0]), target="cuda", check_values=False)


def test_a_call_like_an_earlier_one_reuses_its_configuration(device, monkeypatch, rng):
    """The layer's configuration is made once per shapes, dtypes and options, not per call."""
    made = []
    config = api._config
    monkeypatch.setattr(api, "_config", lambda *a: made.append(a[2]) or config(*a))
    monkeypatch.setattr(api, "_DEVICE_CONFIGS", {})
    x = _draw(rng, T=1)
    first = dnir.fused_recurrent_gated_delta_rule(**x, output_final_state=True, target="cuda")
    again = dnir.fused_recurrent_gated_delta_rule(**x, output_final_state=True, target="cuda")
    assert len(made) == 1 and all(torch.equal(a, b) for a, b in zip(first, again))
    dnir.fused_recurrent_gated_delta_rule(**x, output_final_state=False, target="cuda")      # another option
    dnir.fused_recurrent_gated_delta_rule(**_draw(rng, B=3, T=1), output_final_state=True, target="cuda")
    with pytest.raises(InputError, match="scale=-1.0; expected a positive number"):
        dnir.fused_recurrent_gated_delta_rule(**x, scale=-1.0, target="cuda")
    with pytest.raises(InputError, match="scale=-1.0"):                   # a refused call is not kept
        dnir.fused_recurrent_gated_delta_rule(**x, scale=-1.0, target="cuda")
    assert len(made) == 5
