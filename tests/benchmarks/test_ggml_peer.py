"""The ggml peer: ggml's fused delta-rule op (built from source) agrees with dnir and
the float64 oracle on the benchmark's inputs, whatever the layouts it needs; when ggml
cannot be built the benchmark says why instead of dropping the peer."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dnir
from dnir.benchmarks import cpu, ggml_peer
from dnir.errors import InputError
from dnir.lowering.ggml.build import GgmlUnavailable
from dnir.models import DeltaNetConfig, delta_rule_reference, random_inputs, relative_rms_error

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def harness():
    try:
        return ggml_peer.harness()
    except GgmlUnavailable as e:
        pytest.skip(f"ggml cannot be built on this machine: {e}")


def _inputs(variant, mode, batch, seq_len, heads, value_heads, initial_state=True, seed=0):
    cfg = DeltaNetConfig(variant, mode=mode, batch=batch, seq_len=seq_len, heads=heads, value_heads=value_heads,
                         head_dim=16, value_dim=16, initial_state=initial_state, final_state=True)
    return random_inputs(cfg, np.random.default_rng(seed))


CASES = [  # variant, B, T, H, HV: GQA (both ggml's and dnir's head pairing in play), T not a multiple of 64
    ("gdn", 2, 100, 2, 4),
    ("gdn", 1, 130, 3, 3),
    ("kda", 2, 100, 2, 4),
    ("kda", 1, 70, 3, 3),
]


@pytest.mark.parametrize("variant, B, T, H, HV", CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_agrees_with_dnir_and_the_oracle(harness, variant, B, T, H, HV, threads):
    x = _inputs(variant, "chunked", B, T, H, HV)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    o, state = ggml_peer.gated_delta_net(*args, x["initial_state"], threads=threads)
    ref_o, ref_state = delta_rule_reference(*args, initial_state=x["initial_state"])
    chunked = dnir.chunk_gated_delta_rule if variant == "gdn" else dnir.chunk_kda
    dnir_o, dnir_state = chunked(*args, initial_state=x["initial_state"], output_final_state=True)
    assert o.shape == ref_o.shape and state.shape == ref_state.shape
    assert relative_rms_error(o, ref_o) < 1e-5 and relative_rms_error(state, ref_state) < 1e-5
    assert relative_rms_error(o, dnir_o) < 1e-5 and relative_rms_error(state, dnir_state) < 1e-5


@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_decode_agrees_with_dnir(harness, variant):
    x = _inputs(variant, "decode", 3, 1, 2, 4, seed=1)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    o, state = ggml_peer.gated_delta_net(*args, x["initial_state"], threads=2)
    step = dnir.fused_recurrent_gated_delta_rule if variant == "gdn" else dnir.fused_recurrent_kda
    dnir_o, dnir_state = step(*args, initial_state=x["initial_state"], output_final_state=True)
    assert relative_rms_error(o, dnir_o) < 1e-5 and relative_rms_error(state, dnir_state) < 1e-5


def test_without_an_initial_state_it_starts_from_zeros(harness):
    x = _inputs("kda", "chunked", 1, 40, 2, 2, initial_state=False, seed=2)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    o, state = ggml_peer.gated_delta_net(*args)
    ref_o, ref_state = delta_rule_reference(*args)
    assert relative_rms_error(o, ref_o) < 1e-5 and relative_rms_error(state, ref_state) < 1e-5


def test_repeated_computes_give_the_same_result(harness):
    """The benchmark times repeated calls on the same buffers: the op must not consume its inputs."""
    x = _inputs("gdn", "chunked", 1, 50, 2, 4, seed=3)
    run = ggml_peer.GgmlDeltaNet(x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"], threads=2)
    try:
        run.compute()
        first = run.outputs()
        run.compute()
        second = run.outputs()
    finally:
        run.close()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_shapes_ggml_cannot_run_are_refused_before_ggml_sees_them(harness):
    cfg = DeltaNetConfig("gdn", seq_len=8, heads=2, value_heads=2, head_dim=16, value_dim=8, initial_state=True)
    x = random_inputs(cfg, 0)
    with pytest.raises(InputError, match="K = V"):
        ggml_peer.GgmlDeltaNet(x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"])
    x = _inputs("gdn", "chunked", 1, 8, 2, 2)
    with pytest.raises(InputError, match="initial_state"):
        ggml_peer.GgmlDeltaNet(x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"][:, :1])


def test_the_benchmark_times_ggml_and_checks_it(harness):
    case = cpu.Case("kimi-linear", "prefill", 1, 64, tuple(cpu.QUICK_SIZES["kimi-linear"].items()))
    record, (o, state) = cpu.run_impl(cpu.GGML, case, random_inputs(case.config(), 0), {}, cpu.QUICK)
    assert record["status"] == "ok" and record["timing"]["runs"] >= 1 and record["prepare_s"] >= 0
    assert o.shape == (1, 64, 4, 32) and state.shape == (1, 4, 32, 32)


def test_the_benchmark_skips_ggml_with_the_reason(monkeypatch):
    def unavailable():
        raise GgmlUnavailable("building ggml 0.25.3 needs cmake: none found on PATH")
    monkeypatch.setattr(ggml_peer, "harness", unavailable)
    case = cpu.Case("kimi-linear", "decode", 2, 1, tuple(cpu.QUICK_SIZES["kimi-linear"].items()))
    record, out = cpu.run_impl(cpu.GGML, case, random_inputs(case.config(), 0), {}, cpu.QUICK)
    assert out is None
    assert record == {"impl": cpu.GGML, "status": "skipped",
                      "reason": "ggml unavailable: building ggml 0.25.3 needs cmake: none found on PATH"}


def test_a_missing_tool_is_named(tmp_path):
    env = {"DNIR_CACHE": str(tmp_path), "PATH": str(tmp_path / "empty"), "HOME": str(tmp_path)}
    code = "import sys; from dnir.lowering.ggml.build import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert done.returncode == 1
    assert "needs cmake and a C compiler" in done.stderr and "C++ compiler" in done.stderr


BUILD_ONCE = """
import os, sys, time
from dnir.lowering.ggml import build
def fake_build(root):
    with open(root / "builders", "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(1.0)
    (root / "complete").touch()
build._build = fake_build
print(build.ggml_build().root)
"""


def test_two_processes_build_once(tmp_path):
    """pytest -n 2 starts two workers at once: the second waits for the first's build and uses it."""
    env = {"DNIR_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_ONCE], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env=env) for _ in range(2)]
    roots = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    (root,) = roots
    assert len((Path(root) / "builders").read_text().split()) == 1


def _record(impl, median_s):
    return {"impl": impl, "status": "ok", "timing": {"median_s": median_s}}


def test_targets_compare_dnir_with_ggml_at_the_target_shape_and_in_decode():
    prefill = {"kind": "prefill", "variant": "gdn", "B": 1, "T": cpu.TARGET_SHAPE_T,
               "results": [_record(cpu.GGML, 0.3), _record("dnir-O2-numpy", 0.42), _record("dnir-O2-tvm-llvm", 0.1)]}
    decode = {"kind": "decode", "variant": "kda", "B": 64, "T": 1,
              "results": [_record(cpu.GGML, 2e-3), _record("dnir-O2-numpy", 1e-3)]}
    other_length = {**prefill, "T": 1024}
    got = {(t["target"], t["T"]): (round(t["ratio"], 6), t["met"]) for t in cpu.targets([prefill, decode, other_length])
           if cpu.GGML in t["target"]}
    assert got == {
        (f"dnir-O2-numpy <= 0.5x {cpu.GGML} (prefill, B=1)", cpu.TARGET_SHAPE_T): (1.4, False),
        (f"dnir-O2-tvm-llvm <= 0.5x {cpu.GGML} (prefill, B=1)", cpu.TARGET_SHAPE_T): (round(1 / 3, 6), True),
        (f"dnir-O2-numpy <= 1.0x {cpu.GGML} (decode, B=64)", 1): (0.5, True),
    }


def test_target_o2_on_ggml_twice_as_fast_as_o0_on_ggml():
    """A row per variant at the target shape: dnir's O2 graph on ggml against its O0 graph on ggml."""
    def prefill(variant, o0, o2, T=cpu.TARGET_SHAPE_T):
        return {"kind": "prefill", "variant": variant, "B": 1, "T": T,
                "results": [_record("dnir-O0-ggml", o0), _record("dnir-O2-ggml", o2)]}
    rows = cpu.targets([prefill("gdn", 1.0, 0.7), prefill("kda", 8.0, 1.0), prefill("gdn", 1.0, 0.1, T=1024)])
    got = {t["variant"]: (round(t["ratio"], 6), t["met"]) for t in rows if "dnir-O0-ggml" in t["target"]}
    assert got == {"gdn": (0.7, False), "kda": (0.125, True)}


def test_a_subset_runs_only_the_named_implementations_and_shapes():
    settings = {**cpu.FULL, "prefill_lens": (4096,), "decode_batches": ()}
    todo = [dataclasses.replace(c, only=("dnir-O0-ggml", "dnir-O2-ggml")) for c in cpu.cases(False, settings)]
    assert {(c.preset, c.kind, c.seq_len) for c in todo} == {(p, "prefill", 4096) for p in cpu.PRESETS}
    assert all(c.impls == ("dnir-O0-ggml", "dnir-O2-ggml") for c in todo)


def test_the_ggml_profile_times_every_node_by_dnir_node_and_op():
    from dnir.benchmarks.ggml_profile import markdown, profile
    try:
        p = profile("qwen3-next", "O2", 128, threads=1, repeats=1)
    except GgmlUnavailable as e:
        pytest.skip(f"ggml cannot be built here: {e}")
    assert 0 < p["loop_s"] < p["total_s"]
    assert ("loop", "MUL_MAT") in dict(p["by_op"]) and all(label != "?" for label, _ in p["by_node"])
    assert any("chunk_scan" in label and "(all chunks)" in label for label, _ in p["by_node"])
    assert "| dnir node | time |" in markdown(p)
