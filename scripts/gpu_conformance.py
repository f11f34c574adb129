"""CUDA conformance on a GPU machine with the TVM runtime only (see scripts/gpu_bundle.py).

    python3 scripts/gpu_conformance.py --bundle .gpu [--out DIR]

Runs every artefact of the bundle (the op conformance table; the GDA/KDA
layers at O0 and O2) through dnir.lowering.runtime_loader and checks each
output against the NumPy backend's (computed when the bundle was built):
normalised MSE sum((a-b)^2)/sum(a^2) below 1e-7 for floats, exact otherwise.
Prints a table; with --out writes gpu_conformance.{json,md} there. Exit 1 on
any failure.
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
    rows = []
    for name, out in zip(data["output_names"], outs):
        ref = data[f"ref:{name}"]
        if ref.dtype.kind == "f":
            r64 = ref.astype(np.float64)
            err = float(np.sum((out.astype(np.float64) - r64) ** 2) / np.sum(r64 ** 2))
            ok = bool(np.isfinite(out).all() and err < TOLERANCE)
        else:
            err = float(np.count_nonzero(out != ref))
            ok = err == 0
        rows.append({"artefact": so.stem, "output": str(name), "error": err, "ok": ok})
    print(f"{so.name}: loaded (nvcc included) in {load_s:.1f} s, "
          f"{sum(r['ok'] for r in rows)}/{len(rows)} outputs ok")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(ROOT / ".gpu"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    loader = _import_loader()
    rows = []
    for so in sorted(Path(args.bundle).glob("*.so")):
        rows += check(loader, so)
    for r in rows:
        print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['artefact']:<14} {r['output']:<28} {r['error']:.2e}")
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} outputs match NumPy (nmse < {TOLERANCE:g})")
    if args.out:
        import tvm
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        gpu = tvm.cuda(0)
        summary = {"device": f"{gpu.device_name} ({gpu.compute_version})", "python": platform.python_version(),
                   "tvm": tvm.__version__, "tolerance": TOLERANCE, "rows": rows, "failed": len(failed)}
        (out / "gpu_conformance.json").write_text(json.dumps(summary, indent=2) + "\n")
        lines = [f"# CUDA conformance on {summary['device']}", "",
                 f"{len(rows) - len(failed)}/{len(rows)} outputs match the NumPy backend (nmse < {TOLERANCE:g}).",
                 "", "| artefact | output | error | ok |", "|---|---|---|---|"]
        lines += [f"| {r['artefact']} | {r['output']} | {r['error']:.2e} | {'yes' if r['ok'] else 'NO'} |"
                  for r in rows]
        (out / "gpu_conformance.md").write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
