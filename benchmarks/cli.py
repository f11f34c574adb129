"""Command line of the CPU benchmark, shared by `python -m benchmarks` and `dnir bench`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

DESCRIPTION = """Time dnir (O0 and O2 on NumPy, O2 on TVM-llvm) side by side with
ggml's fused delta-rule op (llama.cpp's path; ggml is built from source on first
use, cached outside the repository), flash-linear-attention's PyTorch chunked
and recurrent references and a plain PyTorch loop, on the qwen3-next and
kimi-linear layers (prefill at T = 1024, 4096, 16384; decode at B = 1, 64,
256), float32, in one process. Every output is checked against every other
implementation's. Writes cpu.json, cpu.md and cpu.png (cpu-quick.* with
--quick) to the results folder."""

EXAMPLE = """examples:
  python -m benchmarks --quick                 # small shapes, a few seconds per implementation
  dnir bench --quick --json --out /tmp/bench   # the same through the dnir command
  python -m benchmarks --threads 2 --prefill-lens 4096 --decode-batches '' --name ggml \
      --impls ggml-gated-delta-net,dnir-O0-ggml,dnir-O2-ggml,dnir-O2-numpy,dnir-O2-tvm-llvm   # a subset
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks --threads 1   # the full run

Exit codes: 0 ok, 1 an implementation failed or two disagree beyond the tolerance,
2 usage error. The GPU side is benchmarks/gpu.py (see benchmarks/README.md).
"""


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--quick", action="store_true", help="small shapes that run in seconds (a smoke run)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (default: the markdown table)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the result files (default {RESULTS})")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for NumPy's BLAS, torch, TVM and ggml (default: every core this process may use)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--impls", type=_names, default=None,
                   help="a subset: only these implementations (comma-separated, e.g. dnir-O0-ggml,dnir-O2-ggml)")
    p.add_argument("--prefill-lens", type=_numbers, default=None, help="a subset: these prefill lengths T only")
    p.add_argument("--decode-batches", type=_numbers, default=None,
                   help="a subset: these decode batches B only ('' for none)")
    p.add_argument("--name", default=None, help="file name of a subset's results (default cpu-subset)")


def _names(text: str) -> tuple[str, ...]:
    from .cpu import IMPLS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in IMPLS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown implementation(s) {', '.join(unknown)}; known: {', '.join(IMPLS)}")
    return names


def _numbers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def run(args) -> int:
    from . import machine
    threads = args.threads if args.threads is not None else machine.cores()
    if threads < 1:
        print(f"--threads {threads}: expected a positive number", file=sys.stderr)
        return 2
    # TVM reads its thread count when its runtime starts: set it before anything imports tvm.
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import torch
    from threadpoolctl import threadpool_limits

    from .cpu import run_benchmark
    from .report import write
    torch.set_num_threads(threads)
    shapes = {key: value for key, value in (("prefill_lens", args.prefill_lens),
                                            ("decode_batches", args.decode_batches)) if value is not None}
    with threadpool_limits(limits=threads):
        doc = run_benchmark(args.quick, args.seed, threads, args.impls, shapes)
    if doc["mode"] == "subset":
        doc["name"] = args.name or "cpu-subset"
    paths = write(doc, args.out)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    ok = all(r["status"] == "ok" and r["checked"] for c in doc["cases"] for r in c["results"]
             if r["status"] != "skipped")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=DESCRIPTION, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
