"""The CPU benchmark end to end (--quick), and the pieces it trusts: the peers
agree with the float64 oracle, disagreeing outputs are caught, cases too big
for memory are skipped with the reason, slow cases get fewer runs."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dnir.benchmarks import cpu, ggml_peer, machine, peers
from dnir.benchmarks.profile_ops import profile
from dnir.benchmarks.timing import measure
from dnir.lowering.ggml.build import GgmlUnavailable
from dnir.models import DeltaNetConfig, build_delta_net, delta_rule_reference, random_inputs, relative_rms_error

ROOT = Path(__file__).resolve().parents[2]
DNIR_IMPLS = {"dnir-O0-numpy", "dnir-O2-numpy", "dnir-O2-numpy-reference", "dnir-O2-tvm-llvm", "dnir-O0-ggml",
              "dnir-O2-ggml"}
GGML_IMPLS = {cpu.GGML, "dnir-O0-ggml", "dnir-O2-ggml"}   # skipped where ggml cannot be built
PEER_IMPLS = {"fla-chunk-ref", "fla-recurrent-ref", "torch-loop", cpu.GGML}


def _ggml_unavailable() -> str | None:
    """Why ggml cannot be built here, or None (it builds on first use)."""
    try:
        ggml_peer.harness()
    except GgmlUnavailable as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "dnir.cli", "bench", "--quick", "--json", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    return done, out


def test_quick_run_checks_every_implementation_against_the_peers(quick):
    done, out = quick
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc == json.loads((out / "cpu-quick.json").read_text())
    assert doc["mode"] == "quick"
    assert {"cpu", "cores", "versions", "blas", "date"} <= set(doc["machine"])
    assert {"numpy", "torch", "tvm", "fla", "ggml"} <= set(doc["machine"]["versions"])
    ggml_missing = _ggml_unavailable()
    kinds = {(c["preset"], c["kind"]) for c in doc["cases"]}
    assert kinds == {(p, k) for p in ("qwen3-next", "kimi-linear") for k in ("prefill", "decode")}
    for case in doc["cases"]:
        impls = {r["impl"] for r in case["results"]}
        decode = case["kind"] == "decode"
        expected = (DNIR_IMPLS | PEER_IMPLS | ({cpu.INPLACE} if decode else set())) - ({"fla-chunk-ref"} if decode else set())
        assert impls == expected
        for r in case["results"]:
            if r["impl"] in GGML_IMPLS and ggml_missing is not None:
                assert r["status"] == "skipped" and ggml_missing in r["reason"]
                continue
            assert r["status"] == "ok", r
            assert r["checked"] is True
            t = r["timing"]
            assert 0 < t["min_s"] <= t["median_s"] <= t["max_s"] and t["runs"] >= 1
        base = next(r for r in case["results"] if r["impl"] == case["baseline"])
        assert base["ratio_vs_baseline"] == 1.0
        # dnir's outputs were compared with each peer's, in this run, and agree.
        compared = {r["impl"] for r in case["results"] if r["status"] == "ok"}
        for impl in DNIR_IMPLS & compared:
            for peer in compared & PEER_IMPLS:
                for errors in (case["errors_o"], case["errors_state"]):
                    assert 0 <= errors[impl][peer] <= cpu.TOLERANCE
    assert doc["profiles"] and doc["profiles"][0]["by_op"] and doc["profiles"][0]["top_nodes"]


def test_quick_run_writes_the_table_and_the_plot(quick):
    done, out = quick
    doc = json.loads((out / "cpu-quick.json").read_text())
    md = (out / "cpu-quick.md").read_text()
    assert "| layer | B | T | implementation | median | min | max | runs | vs fla-chunk-ref | vs ggml | sys |" in md
    assert "| vs fla-recurrent-ref |" in md
    rows = [line for line in md.splitlines() if line.startswith("| qwen3-next") or line.startswith("| kimi-linear")]
    assert len(rows) == sum(len(c["results"]) for c in doc["cases"])
    assert all(" yes |" in row or "skipped: ggml unavailable" in row for row in rows)
    assert doc["machine"]["cpu"] in md and "openblas" in md.lower()
    assert (out / "cpu-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_has_an_example():
    done = subprocess.run([sys.executable, "-m", "dnir.cli", "bench", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0 and "dnir bench --quick" in done.stdout and "--json" in done.stdout


@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_peers_match_the_oracle(variant):
    cfg = DeltaNetConfig(variant, seq_len=128, heads=2, value_heads=4, head_dim=16, value_dim=8, initial_state=True)
    x = random_inputs(cfg, np.random.default_rng(7))
    ref_o, ref_s = delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"])
    t = {n: torch.from_numpy(a) for n, a in x.items()}
    for fn in (peers.fla_chunk, peers.fla_recurrent, peers.torch_loop):
        o, s = fn(variant, t["q"], t["k"], t["v"], t["g"], t["beta"], t["initial_state"])
        assert relative_rms_error(o.numpy(), ref_o) < 1e-5, fn.__name__
        assert relative_rms_error(s.numpy(), ref_s) < 1e-5, fn.__name__


def test_the_peer_references_load_without_triton():
    code = ("import sys; from dnir.benchmarks import peers; peers.fla_naive('gdn'); peers.fla_naive('kda'); "
            "print('fla' in sys.modules, 'triton' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.split() == ["False", "False"], done.stderr


def _small_case():
    return cpu.Case("qwen3-next", "prefill", 1, 64, tuple(cpu.QUICK_SIZES["qwen3-next"].items()))


class _NoProgress:
    def set_description(self, _):
        pass

    def update(self, _):
        pass


def test_a_disagreeing_implementation_is_flagged(monkeypatch):
    monkeypatch.setattr(cpu, "IMPLS", ("dnir-O2-numpy", "fla-chunk-ref", "torch-loop"))

    def off_by_a_little(*args):
        o, s = peers.torch_loop(*args)
        return o * 1.01, s
    monkeypatch.setitem(cpu.PEER_FUNCS, "torch-loop", off_by_a_little)
    result = cpu.run_case(_small_case(), cpu.QUICK, 3, _NoProgress())
    checked = {r["impl"]: r["checked"] for r in result["results"]}
    assert checked == {"dnir-O2-numpy": False, "fla-chunk-ref": False, "torch-loop": False}
    assert result["errors_o"]["dnir-O2-numpy"]["fla-chunk-ref"] <= cpu.TOLERANCE
    assert result["errors_o"]["dnir-O2-numpy"]["torch-loop"] == pytest.approx(0.01, rel=0.01)


def test_a_case_too_big_for_memory_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(cpu, "IMPLS", ("dnir-O2-numpy", "fla-chunk-ref"))
    monkeypatch.setattr(machine, "available_memory_bytes", lambda: 1 << 10)
    result = cpu.run_case(_small_case(), cpu.QUICK, 0, _NoProgress())
    dnir_row = result["results"][0]
    assert dnir_row["status"] == "skipped" and "GiB" in dnir_row["reason"] and "available" in dnir_row["reason"]
    assert result["results"][1]["status"] == "ok"


def test_slow_calls_get_one_run_and_say_so():
    slow, _ = measure(lambda: time.sleep(0.05), budget_s=0.01, max_runs=5)
    assert (slow.runs, slow.warmup) == (1, False) and "no warm-up" in slow.note
    medium, value = measure(lambda: time.sleep(0.002) or 42, budget_s=0.05, max_runs=4)
    assert (medium.runs, medium.warmup, value) == (4, True, 42)


def test_short_calls_are_timed_many_times():
    """A call under a millisecond (a decode step) is timed up to MANY_RUNS times within the budget."""
    from benchmarks.timing import MANY_RUNS
    fast, value = measure(lambda: 42, budget_s=0.05, max_runs=4)
    assert (fast.runs, fast.warmup, value) == (MANY_RUNS, True, 42)
    capped, _ = measure(lambda: time.sleep(0.0005), budget_s=0.01, max_runs=4)
    assert 4 < capped.runs <= 20


def test_profile_times_every_node_including_the_scan_body():
    cfg = DeltaNetConfig("kda", seq_len=100, heads=2, value_heads=2, head_dim=8, value_dim=8, chunk_size=16)
    graph = build_delta_net(cfg)
    rows = profile(graph, random_inputs(cfg, np.random.default_rng(1)))
    top_ops = {n.op for n in graph.topo_order()} - {"input", "scan", "item"}
    assert top_ops <= {r.op for r in rows}
    body = [r for r in rows if "/" in r.name and r.op != "scan(stack ys)"]
    assert body and all(r.calls == 7 for r in body)      # ceil(100 / 16) chunks
    assert all(r.seconds >= 0 for r in rows)
