"""CUDA and Vulkan conformance on a GPU machine with the TVM runtime only (see scripts/gpu_bundle.py).

    python3 scripts/gpu_conformance.py --bundle .gpu [--out DIR]

Runs every artefact of the bundle (the op conformance table; the GDA/KDA
layers at O0 and O2) through dnir.lowering.runtime_loader on CUDA, and its
recorded Vulkan program (<name>.vulkan.npz) through wgpu on the machine's
Vulkan driver, and checks each output against the NumPy backend's (computed
when the bundle was built): normalised MSE sum((a-b)^2)/sum(a^2) below 1e-7
for floats (on CUDA below TF32_TOLERANCE for an artefact whose .npz says
its tensor-core products run at precision "tf32"), exact otherwise. Prints a
table; with --out writes gpu_conformance.{json,md} there. Exit 1 on any
failure (no Vulkan adapter or no wgpu is a failure of the Vulkan rows only
when --vulkan is given).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-7
# An artefact at precision "tf32" (the half layers' default, and a float32 one): each tensor-core
# product reads its operands as TF32 (11 significant bits, unit roundoff 2**-11 = 4.9e-4). Half
# inputs are exact in TF32, but the layer's float32 intermediates (w, u, the decayed keys, the
# state) are rounded to it: about 1.2e-3 relative rms error (fla's float32, which uses TF32 too:
# 1.3e-3 to 1.5e-3). Allowed: 4e-3 relative rms, nmse (4e-3)**2.
TF32_TOLERANCE = 1.6e-5


def _import_loader():
    sys.path.insert(0, str(ROOT))
    from benchmarks.checkout import import_loader
    return import_loader()


def check(loader, so: Path) -> list[dict]:
    data = np.load(so.with_suffix(".npz"))
    arch = str(data["arch"])
    arrays = [data[f"in:{n}"] for n in data["input_names"]]
    t0 = time.perf_counter()
    vm, dev = loader.load_executable(so, 0, arch)
    load_s = time.perf_counter() - t0
    outs = loader.run_executable(vm, dev, arrays)
    tf32 = "precision" in data.files and str(data["precision"]) == "tf32"
    rows = compare(so.stem, "cuda", outs, data, TF32_TOLERANCE if tf32 else TOLERANCE)
    print(f"{so.name}: loaded (nvcc included) in {load_s:.1f} s, "
          f"{sum(r['ok'] for r in rows)}/{len(rows)} outputs ok")
    return rows


def compare(artefact: str, target: str, outs, data, tolerance: float = TOLERANCE) -> list[dict]:
    rows = []
    for name, out in zip(data["output_names"], outs):
        ref = data[f"ref:{name}"]
        if ref.dtype.kind == "f":
            r64 = ref.astype(np.float64)
            err = float(np.sum((out.astype(np.float64) - r64) ** 2) / np.sum(r64 ** 2))
            ok = bool(np.isfinite(out).all() and err < tolerance)
        else:
            err = float(np.count_nonzero(out.astype(ref.dtype) != ref))
            ok = err == 0
        rows.append({"target": target, "artefact": artefact, "output": str(name), "error": err, "ok": ok,
                     "tolerance": tolerance if ref.dtype.kind == "f" else 0})
    return rows


def check_vulkan(program: Path, timings: list) -> list[dict]:
    """The artefact's recorded Vulkan program on this machine's Vulkan adapter, against NumPy; its
    dispatch count and times go to `timings`."""
    from dnir.lowering.vulkan_program import Program, Runner
    artefact = program.name.removesuffix(".vulkan.npz")
    data = np.load(program.with_name(f"{artefact}.npz"))
    t0 = time.perf_counter()
    runner = Runner(Program.load(program))
    outs = runner([data[f"in:{n}"] for n in data["input_names"]])
    load_s = time.perf_counter() - t0
    rows = compare(artefact, "vulkan", outs, data)
    ms = runner.time(3)
    timings.append({"artefact": artefact, "dispatches": len(runner.steps), "first_run_s": load_s, "ms": ms})
    print(f"{program.name}: {len(runner.steps)} dispatches, first run (pipelines included) {load_s:.1f} s, "
          f"then {ms:.2f} ms per run; {sum(r['ok'] for r in rows)}/{len(rows)} outputs ok")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(ROOT / ".gpu"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--vulkan", action="store_true", help="a machine without a Vulkan adapter fails")
    args = parser.parse_args(argv)
    loader = _import_loader()
    rows = []
    for so in sorted(Path(args.bundle).glob("*.so")):
        rows += check(loader, so)
    vulkan = {"adapter": None, "timings": []}
    try:
        from dnir.lowering.vulkan_program import adapter_info
        info = adapter_info()
        vulkan["adapter"] = f"{info.get('device')} ({info.get('backend_type')}, {info.get('description', '')})"
        for program in sorted(Path(args.bundle).glob("*.vulkan.npz")):
            rows += check_vulkan(program, vulkan["timings"])
    except Exception as e:  # noqa: BLE001 - no wgpu or no adapter: said, and a failure only with --vulkan
        vulkan["error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"vulkan: {vulkan['error']}")
        if args.vulkan:
            rows.append({"target": "vulkan", "artefact": "-", "output": "-", "error": float("nan"), "ok": False})
    for r in rows:
        print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['target']:<7} {r['artefact']:<14} {r['output']:<28} "
              f"{r['error']:.2e}")
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} outputs match NumPy (nmse < {TOLERANCE:g}, "
          f"{TF32_TOLERANCE:g} at precision tf32); "
          f"nvcc runs the module cache did not spare: {loader._STATE['nvcc_runs']}")
    if args.out:
        import tvm
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        gpu = tvm.cuda(0)
        summary = {"device": f"{gpu.device_name} ({gpu.compute_version})", "python": platform.python_version(),
                   "tvm": tvm.__version__, "vulkan": vulkan, "tolerance": TOLERANCE,
                   "tf32_tolerance": TF32_TOLERANCE, "rows": rows,
                   "failed": len(failed)}
        (out / "gpu_conformance.json").write_text(json.dumps(summary, indent=2) + "\n")
        lines = [f"# CUDA and Vulkan conformance on {summary['device']}", "",
                 f"Vulkan adapter: {vulkan['adapter'] or 'none (' + vulkan.get('error', '') + ')'}", "",
                 f"{len(rows) - len(failed)}/{len(rows)} outputs match the NumPy backend (nmse < {TOLERANCE:g}; "
                 f"< {TF32_TOLERANCE:g} for artefacts whose tensor-core products run at precision tf32).",
                 ""]
        if vulkan["timings"]:
            lines += ["| Vulkan program | dispatches | first run (pipelines made), s | ms per run |",
                      "|---|---|---|---|"]
            lines += [f"| {t['artefact']} | {t['dispatches']} | {t['first_run_s']:.1f} | {t['ms']:.2f} |"
                      for t in vulkan["timings"]]
            lines.append("")
        lines += ["| target | artefact | output | error | tolerance | ok |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['target']} | {r['artefact']} | {r['output']} | {r['error']:.2e} | "
                  f"{r.get('tolerance', TOLERANCE):g} | {'yes' if r['ok'] else 'NO'} |" for r in rows]
        (out / "gpu_conformance.md").write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
