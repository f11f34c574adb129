"""dnir compile FILE.dnir --target cuda|llvm -o model.so: export a compiled model."""
from __future__ import annotations

import argparse
import re

EXAMPLE = """examples:
  dnir compile gdn.dnir --target cuda --arch sm_90 -o gdn_cuda.so
  dnir compile gdn.dnir --target llvm -o gdn_cpu.so

A cuda artefact holds the kernels' CUDA source, compiled when it is loaded on
the GPU machine (dnir.lowering.runtime_loader runs it with the TVM runtime only).
"""


def register(sub):
    p = sub.add_parser("compile", help="compile a .dnir graph with TVM and export the library",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="graph in the .dnir text format")
    p.add_argument("--target", required=True, choices=["cuda", "llvm"])
    p.add_argument("--arch", default="sm_90", help="CUDA architecture (default sm_90)")
    p.add_argument("-o", "--output", required=True, help="path of the exported library (.so)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dnir.cli import UsageError, load_graph, output_path
    from dnir.lowering.registry import build

    from .progress import busy

    if not args.output.endswith(".so"):
        raise UsageError(f"output {args.output!r} must end with .so (a shared library)")
    if not re.fullmatch(r"sm_\d{2,3}[a-z]?", args.arch):
        raise UsageError(f"--arch {args.arch!r}: expected a CUDA architecture sm_XY, e.g. sm_80, sm_90 or sm_90a")
    graph = load_graph(args.file)
    with output_path(args.output) as tmp, busy(f"compiling for {args.target}"):
        build(graph, args.target, arch=args.arch).export_library(tmp)
    where = f"{args.target} ({args.arch})" if args.target == "cuda" else args.target
    print(f"{args.output}: {where}, inputs {', '.join(graph.input_names)}; outputs {', '.join(graph.output_names)}")
    return 0
