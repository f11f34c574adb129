"""CPU speed of the `llvm` target against the NumPy backend on one delta-net layer.

    .venv/bin/python -m benchmarks.cpu_llvm [--seq-len 4096] [--preset qwen3-next] [--level O2]

Runs the preset's chunked layer (optimised at --level), reports the median
wall time of each backend (NumPy both in its compute buffer and on the
reference executor), the llvm target's compile time and the kernels
that take its time (TVM's VM profiler), and writes
benchmarks/results/cpu_llvm.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cores, cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_profile(ex, arrays, top: int = 12) -> list[dict]:
    """The functions taking the most time in one run, exclusive of the calls they make
    (a VM instrument timing every call; the CPU runs them synchronously)."""
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(ex, tvm.cpu())
    totals: dict[str, list[float]] = {}
    stack: list[list[float]] = []   # [start, time spent in callees]

    def instrument(func, name, before, ret, *args):
        now = time.perf_counter()
        if before:
            stack.append([now, 0.0])
        else:
            start, inner = stack.pop()
            spent = now - start
            totals.setdefault(name, []).append(spent - inner)
            if stack:
                stack[-1][1] += spent
        return 0  # VMInstrumentReturnKind.kNoOp

    vm.set_instrument(tvm.runtime.convert(instrument) if hasattr(tvm.runtime, "convert") else instrument)
    vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
    whole = sum(sum(v) for v in totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -sum(kv[1]))[:top]
    return [{"kernel": name, "calls": len(v), "ms": round(sum(v) * 1e3, 2), "share": round(sum(v) / whole, 3)}
            for name, v in ranked]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-next")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--level", default="O2")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    import tvm

    import dnir
    import dnir.passes
    from dnir.lowering.numpy_arena import run_planned
    from dnir.lowering.numpy_backend import prepare_inputs
    from dnir.lowering.registry import build
    from dnir.lowering.tvm.compile import run_llvm
    from dnir.models import DeltaNetConfig, build as build_layer, random_inputs

    graph = dnir.passes.optimize(build_layer(args.preset, seq_len=args.seq_len, mode="chunked"), args.level)
    cfg = DeltaNetConfig.from_meta(graph.meta)
    inputs = random_inputs(cfg, 0)

    t0 = time.perf_counter()
    ex = build(graph, "llvm")
    run_llvm(graph, inputs)            # the first run loads the executable (LLVM code generation)
    compile_s = time.perf_counter() - t0

    llvm_s = median_time(lambda: run_llvm(graph, inputs), args.repeat)
    run_planned(graph, inputs)         # the compute buffer's first touch, as the API's first call
    numpy_s = median_time(lambda: run_planned(graph, inputs), args.repeat)
    reference_s = median_time(lambda: dnir.run(graph, inputs), args.repeat)
    outs, refs = run_llvm(graph, inputs), dnir.run(graph, inputs)
    nmse = max(float(np.sum((o - r) ** 2) / np.sum(r.astype(np.float64) ** 2)) for o, r in zip(outs, refs))
    profile = kernel_profile(ex, prepare_inputs(graph, inputs))

    ratio = llvm_s / numpy_s
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": cpu_model(), "cores": cores(), "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "tvm": tvm.__version__,
                     "dnir": dnir.__version__},
        "workload": {"preset": args.preset, "seq_len": args.seq_len, "mode": "chunked", "level": args.level,
                     "nodes": graph.node_count()},
        "numpy_s": round(numpy_s, 4), "numpy_reference_s": round(reference_s, 4), "llvm_s": round(llvm_s, 4),
        "llvm_over_numpy": round(ratio, 3),
        "llvm_compile_s": round(compile_s, 1), "nmse_llvm_vs_numpy": nmse,
        "target": "llvm within 2x of numpy", "target_met": ratio <= 2.0,
        "llvm_kernels": profile,
    }
    print(json.dumps(result, indent=2))
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "cpu_llvm.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "cpu_llvm.md").write_text(_markdown(result))
    return 0


def _markdown(r: dict) -> str:
    w = r["workload"]
    verdict = ("met" if r["target_met"] else
               f"not met: llvm takes {r['llvm_over_numpy']:.2f}x the NumPy backend's time")
    lines = [
        f"# llvm target vs NumPy backend on the CPU ({r['date']})", "",
        f"Workload: `{w['preset']}` chunked layer, T={w['seq_len']}, passes {w['level']} ({w['nodes']} nodes).",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores. Versions: "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".", "",
        "| backend | median time (s) |", "|---|---|",
        f"| numpy (in its compute buffer, as the functional API runs it) | {r['numpy_s']:.3f} |",
        f"| numpy (reference executor, a fresh array per op) | {r['numpy_reference_s']:.3f} |",
        f"| llvm (TVM) | {r['llvm_s']:.3f} |", "",
        "The ratio is against the faster NumPy run.", "",
        f"llvm / numpy = {r['llvm_over_numpy']:.2f} (target: within 2x: {verdict}). "
        f"Compile + first load of the llvm executable: {r['llvm_compile_s']} s. "
        f"Normalised MSE llvm vs numpy: {r['nmse_llvm_vs_numpy']:.1e}.", "",
        "Where the llvm time goes (TVM VM profiler, one run):", "",
        "| kernel | calls | ms | share |", "|---|---|---|---|",
    ]
    lines += [f"| `{k['kernel']}` | {k['calls']} | {k['ms']} | {k['share']:.1%} |" for k in r["llvm_kernels"]]
    lines += ["", "Reproduce: `.venv/bin/python -m benchmarks.cpu_llvm`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
