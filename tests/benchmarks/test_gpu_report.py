"""benchmarks/gpu.py runs once on a lent GPU: its report and targets are checked
here, on made-up timings, so that a device call cannot end in a formatting error."""
import pytest

from dnir.benchmarks import gpu


def _timing(ms, **extra):
    return {"median_ms": ms, "min_ms": 0.9 * ms, "max_ms": 1.2 * ms, "runs": 50, **extra}


def _case(name, kind, B, T, dnir_ms, fla_ms, **extra):
    c = {"name": name, "variant": "gdn", "kind": kind, "B": B, "T": T, "H": 32, "K": 128, "V": 128,
         "peer": "chunk_gated_delta_rule", "load_s": 40.0, "dnir": _timing(dnir_ms), "fla": _timing(fla_ms),
         "err_o": 1e-4, "err_state": 2e-4, "checked": True, "ratio": dnir_ms / fla_ms,
         "dnir_kernels": [{"kernel": "fused_matmul_kernel", "ms": 0.7, "launches": 4}], **extra}
    return c


def test_targets_and_table_from_the_measured_numbers():
    copy_gbps = 4000.0
    state_bytes = 2 * 64 * 32 * 128 * 128 * 4
    decode = _case("gdn_decode_b64", "decode", 64, 1, 0.5, 0.1, state_bytes=state_bytes)
    for impl in ("dnir", "fla"):
        gbps = state_bytes / (decode[impl]["median_ms"] * 1e-3) / 1e9
        decode[impl].update(state_gbps=gbps, share_of_copy=gbps / copy_gbps)
    prefill = _case("gdn_prefill_b1_t8192", "prefill", 1, 8192, 6.0, 1.5)
    targets = gpu.targets([prefill, decode])
    assert [t["met"] for t in targets] == [False, False]
    assert targets[0]["factor_to_go"] == pytest.approx(4.0 / 3.0)
    assert targets[1]["measured"] == pytest.approx(decode["dnir"]["share_of_copy"])
    doc = {"machine": {"date": "d", "gpu": "H200", "capability": "90", "python": "3.12", "torch": "2.11",
                       "cuda": "13.0", "triton": "3.6", "fla": "0.6.0", "tvm": "0.27"},
           "seed": 0, "copy": {"gbps": copy_gbps}, "cases": [prefill, decode], "targets": targets}
    md = gpu.markdown(doc)
    assert "| gdn_prefill_b1_t8192 | 1 | 8192 |" in md and "4.00x" in md and "1.3x" in md
    assert "## Decode state traffic" in md and "fused_matmul_kernel" in md



def test_inputs_follow_the_artefact_metadata():
    import torch

    from dnir.benchmarks.gpu_artefacts import CASES, config
    for case in (CASES["kda_prefill_b1_t8192"], CASES["gdn_decode_b64"]):
        meta = {"input_shapes": {k: list(v) for k, v in config(dict(case, seq_len=min(case["seq_len"], 64)))
                                 .input_shapes().items()}}
        x = gpu.make_inputs(meta, 0, "cpu")
        assert {k: list(v.shape) for k, v in x.items()} == meta["input_shapes"]
        assert torch.allclose(x["k"].norm(dim=-1), torch.ones(()), atol=1e-5)
        assert (x["g"] < 0).all() and ((x["beta"] > 0) & (x["beta"] < 1)).all()
