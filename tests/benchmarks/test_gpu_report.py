"""benchmarks/gpu.py runs once on a lent GPU: its report, targets, inputs and float64 oracle are
checked here (on made-up timings, and on the CPU), so that a device call cannot end in a
formatting error or compare against a wrong oracle."""
import numpy as np
import pytest

from dnir.benchmarks import gpu
from dnir.benchmarks.gpu_artefacts import CASES, config

torch = pytest.importorskip("torch")


def _timing(ms, **extra):
    return {"median_ms": ms, "min_ms": 0.9 * ms, "max_ms": 1.2 * ms, "runs": 50, **extra}


def _case(name, dnir_ms, fla_ms, err_dnir=1e-4, err_fla=1e-4, **extra):
    case = CASES[name]
    return {"name": name, **case, "K": 128, "V": 128, "peer": "chunk_gated_delta_rule", "load_s": 0.5,
            "oracle_s": 1.0, "dnir": _timing(dnir_ms), "api": _timing(dnir_ms + 0.05), "fla": _timing(fla_ms),
            "api_overhead_ms": 0.05, "api_same_as_module": True, "ratio": dnir_ms / fla_ms,
            "err": {"dnir": {"o": err_dnir, "state": err_dnir}, "fla": {"o": err_fla, "state": err_fla}},
            "dnir_kernels": [{"kernel": "chunk_scan_kernel", "ms": 0.7, "launches": 1, "op": "chunk_scan",
                              "gflop": 10.0, "tflops": 14.3, "gbps": 900.0},
                             {"kernel": "fused_matmul_kernel", "ms": 0.2, "launches": 4}], **extra}


def test_targets_and_table_from_the_measured_numbers():
    copy_gbps = 4000.0
    state_bytes = 2 * 64 * 32 * 128 * 128 * 4
    decode = _case("gdn_decode_b64_bf16", 0.1, 0.1, state_bytes=state_bytes, api_unchecked=_timing(0.12),
                   api_unchecked_overhead_ms=0.02)
    for impl in ("dnir", "fla"):
        gbps = state_bytes / (decode[impl]["median_ms"] * 1e-3) / 1e9
        decode[impl].update(state_gbps=gbps, share_of_copy=gbps / copy_gbps)
    strong = {"dnir": {"finite": True, "err_o": 1e-4, "err_state": 1e-4},
              "fla": {"finite": True, "err_o": 1e-3, "err_state": 1e-3}}
    f32 = _case("gdn_prefill_b1_t8192_f32", 3.0, 1.5, err_dnir=5e-4, err_fla=1e-4, strong_gates=strong,
                vulkan={"ms": 40.0, "err_o": 1e-6, "err_state": 1e-6, "program": "gdn_prefill_b1_t8192_f32.npz",
                        "adapter": "NVIDIA H100 (Vulkan)", "dispatches": 900, "runs": 5, "not_run": []})
    bf16 = _case("kda_prefill_b1_t32768_bf16", 3.0, 2.0)
    tf32 = _case("gdn_prefill_b1_t8192_f32_tf32", 1.2, 1.5, err_dnir=1.2e-3, err_fla=1.4e-3)
    found = {(t["target"], t["case"]): t for t in gpu.targets([f32, bf16, decode, tf32])}
    assert found["dnir O2 prefill <= 1.5x fla (f32, highest)", f32["name"]]["factor_to_go"] == pytest.approx(2.0 / 1.5)
    assert found["goal: dnir O2 prefill <= 1x fla (f32, highest)", f32["name"]]["met"] is False
    assert found["goal: dnir O2 prefill <= 1x fla (f32, tf32)", tf32["name"]]["met"] is True
    assert found["rms error of o vs float64 <= 2x fla's", tf32["name"]]["measured"] == pytest.approx(1.2 / 1.4)
    assert found["dnir O2 prefill <= 2x fla (bf16, tf32)", bf16["name"]]["met"] is True
    share = found["decode state traffic >= 75% of copy bandwidth (bf16)", decode["name"]]
    assert share["measured"] == pytest.approx(decode["dnir"]["share_of_copy"]) and share["met"] is False
    assert found["rms error of o vs float64 <= 2x fla's", f32["name"]]["measured"] == pytest.approx(5.0)
    assert found["strong gates (g = -20) finite", f32["name"]]["met"] is True
    doc = {"machine": {"date": "d", "gpu": "H100", "capability": "90", "python": "3.12", "torch": "2.11",
                       "cuda": "13.0", "triton": "3.6", "fla": "0.6.0", "tvm": "0.27"},
           "seed": 0, "copy": {"gbps": copy_gbps}, "cases": [f32, bf16, decode, tf32], "targets": gpu.targets([f32]),
           "not_built": [{"name": "gdn_prefill_b4_t4096_bf16", "reason": "no module in the bundle's cache"}]}
    md = gpu.markdown(doc)
    assert "| gdn_prefill_b1_t8192_f32 | f32 | highest | 1 | 8192 | 32 / 32 |" in md and "2.00x" in md
    assert "| gdn_prefill_b1_t8192_f32_tf32 | f32 | tf32 | 1 | 8192 | 32 / 32 |" in md and "1.2e-03 / 1.4e-03" in md
    assert "| kda_prefill_b1_t32768_bf16 | bf16 | tf32 |" in md
    # the API without its value checks, where the run timed it (runs before it have none)
    assert "| 0.150 (+0.050) | 0.120 (+0.020) | 0.100 |" in md and "| 3.050 (+0.050) | - | 1.500 |" in md
    assert "| gdn_prefill_b1_t8192_f32 | gdn_prefill_b1_t8192_f32.npz | 900 | 40.00 | 3.000 | 13.3x |" in md
    assert "40.00" in md and "| gdn_prefill_b4_t4096_bf16 | not built" in md
    assert "## Decode state traffic" in md and "## Strong gates" in md
    assert "| `chunk_scan_kernel` | 0.700 | 1 | 10.0" in md


def test_case_list_covers_the_acceptance():
    prefill = [c for c in CASES.values() if c["kind"] == "prefill"]
    # every float32 prefill case also at precision tf32 (fla's arithmetic), under its name + "_tf32"
    plain_f32 = {n for n, c in CASES.items() if c["kind"] == "prefill" and c["dtype"] == "f32" and "precision" not in c}
    assert {n for n, c in CASES.items() if c.get("precision")} == {n + "_tf32" for n in plain_f32}
    assert config(CASES["kda_prefill_b1_t8192_f32_tf32"]).precision == "tf32"
    shapes = {(c["batch"], c["seq_len"], c["heads"], c["value_heads"]) for c in prefill}
    assert shapes == {(1, 8192, 32, 32), (4, 4096, 32, 32), (1, 32768, 32, 32), (1, 8192, 16, 32)}
    for dtype in ("f32", "bf16"):
        assert {c["variant"] for c in prefill if c["dtype"] == dtype} == {"gdn", "kda"}
        assert {c["batch"] for c in CASES.values() if c["dtype"] == dtype and c["kind"] == "decode"} == {64, 256}


@pytest.mark.parametrize("name", ["kda_prefill_b1_t8192_bf16", "gdn_prefill_gqa_b1_t8192_f32", "gdn_decode_b64_f32"])
def test_inputs_follow_the_layer(name):
    cfg = config(dict(CASES[name], seq_len=min(CASES[name]["seq_len"], 64), batch=2))
    x = gpu.make_inputs(cfg, 0, "cpu")
    assert {k: tuple(v.shape) for k, v in x.items()} == cfg.input_shapes()
    assert x["q"].dtype == (torch.bfloat16 if cfg.dtype == "bf16" else torch.float32)
    assert x["g"].dtype == x["initial_state"].dtype == torch.float32
    assert torch.allclose(x["k"].float().norm(dim=-1), torch.ones(()), atol=1e-2)
    assert (x["g"] < 0).all() and ((x["beta"] > 0) & (x["beta"] < 1)).all()


@pytest.mark.parametrize("name", ["kda_prefill_b1_t8192_f32", "gdn_prefill_gqa_b1_t8192_bf16"])
def test_oracle_is_the_projects_float64_reference(name):
    from dnir.models import delta_rule_reference
    cfg = config(dict(CASES[name], seq_len=50, batch=2))
    x = gpu.make_inputs(cfg, 1, "cpu")
    o, state = gpu.oracle(x, cfg.scale)
    ref_o, ref_s = delta_rule_reference(**{n: t.double().numpy() for n, t in x.items()}, scale=cfg.scale)
    np.testing.assert_allclose(o.numpy(), ref_o, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(state.numpy(), ref_s, rtol=1e-9, atol=1e-12)


def _doc(cases, card="NVIDIA H100 80GB HBM3", date="2026-12-07T02:00:00+00:00"):
    return {"benchmark": "gpu", "machine": {"gpu": card, "date": date}, "copy": {"gbps": 3000.0},
            "cases": cases, "not_built": [], "failed": [], "targets": gpu.targets(cases)}


def test_runs_over_parts_of_the_cases_merge_in_case_order():
    first = [_case("kda_prefill_b1_t32768_bf16", 4.0, 2.0), _case("gdn_prefill_b1_t8192_bf16", 1.0, 0.5)]
    second = [_case("gdn_prefill_b1_t8192_f32", 2.0, 1.5)]
    doc = gpu.merge([_doc(first), _doc(second, date="2026-12-07T02:10:00+00:00")])
    order = list(CASES)
    assert [c["name"] for c in doc["cases"]] == sorted([c["name"] for c in first + second], key=order.index)
    assert doc["targets"] == gpu.targets(doc["cases"])
    assert {t["case"] for t in doc["targets"]} >= {"gdn_prefill_b1_t8192_f32", "kda_prefill_b1_t32768_bf16"}
    assert "02:00" in doc["machine"]["date"] and "02:10" in doc["machine"]["date"]


def test_a_case_run_again_keeps_the_later_run():
    earlier = [_case("gdn_prefill_b1_t8192_bf16", 1.2, 0.5), _case("gdn_prefill_b1_t8192_f32", 2.0, 1.5)]
    doc = gpu.merge([_doc(earlier), _doc([_case("gdn_prefill_b1_t8192_bf16", 0.6, 0.5)])])
    assert [(c["name"], c["ratio"]) for c in doc["cases"]] == [("gdn_prefill_b1_t8192_f32", 2.0 / 1.5),
                                                               ("gdn_prefill_b1_t8192_bf16", 0.6 / 0.5)]


def test_runs_on_two_cards_do_not_merge():
    with pytest.raises(SystemExit, match="different cards"):
        gpu.merge([_doc([_case("gdn_prefill_b1_t8192_f32", 2.0, 1.5)]),
                   _doc([_case("gdn_prefill_b1_t8192_bf16", 1.0, 0.5)], card="NVIDIA H200")])
