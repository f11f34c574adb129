"""dnir compile FILE.dnir --target cuda|llvm -o model.so: export a compiled model;
dnir compile LAYER.dnir --target cuda --cache: compile a layer into the module cache instead."""
from __future__ import annotations

import argparse
import re

EXAMPLE = """examples:
  dnir compile gdn.dnir --target cuda --arch sm_90 -o gdn_cuda.so
  dnir compile gdn.dnir --target llvm -o gdn_cpu.so

  dnir build gdn --preset qwen3-next --batch 64 --mode decode --initial-state --final-state -o d.dnir
  dnir compile d.dnir --target cuda --cache --opt O2

A cuda artefact holds the kernels' CUDA source, compiled when it is loaded on
the GPU machine (dnir.lowering.runtime_loader runs it with the TVM runtime only).
--cache takes a layer from `dnir build` (its options are in the file), optimises
it at --opt for the cuda target and puts the module, and nvcc's fatbin of its
kernels, into the module cache ($DNIR_CACHE/tvm) under the layer's key: the
functional API finds it there for the same layer and level
(dnir.chunk_gated_delta_rule(..., target="cuda") on torch CUDA tensors), on a
GPU server that has only the TVM runtime and a copy of that folder.
"""


def register(sub):
    p = sub.add_parser("compile", help="compile a .dnir graph with TVM and export the library",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="graph in the .dnir text format")
    p.add_argument("--target", required=True, choices=["cuda", "llvm"])
    p.add_argument("--arch", default="sm_90", help="CUDA architecture (default sm_90)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("-o", "--output", help="path of the exported library (.so)")
    out.add_argument("--cache", action="store_true",
                     help="a layer from `dnir build`, compiled into the module cache ($DNIR_CACHE/tvm) "
                          "where the functional API looks (cuda)")
    p.add_argument("--opt", default="O2", help="with --cache: the optimisation level the API will ask for "
                                               "(default O2)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dnir.cli import UsageError, load_graph, output_path
    from dnir.lowering.registry import build

    from .progress import busy

    if args.cache and args.target != "cuda":
        raise UsageError("--cache: the module cache serves cuda modules here (llvm runs fill it themselves)")
    if args.output is not None and not args.output.endswith(".so"):
        raise UsageError(f"output {args.output!r} must end with .so (a shared library)")
    if not re.fullmatch(r"sm_\d{2,3}[a-z]?", args.arch):
        raise UsageError(f"--arch {args.arch!r}: expected a CUDA architecture sm_XY, e.g. sm_80, sm_90 or sm_90a")
    graph = load_graph(args.file)
    if args.cache:
        from dnir.api import compiled_graph
        from dnir.errors import DnirError
        from dnir.lowering.runtime_loader import prebuild_layer
        from dnir.models import DeltaNetConfig
        try:
            cfg = DeltaNetConfig.from_meta(graph.meta)
        except (DnirError, KeyError, TypeError):
            raise UsageError(f"--cache: {args.file} is not a layer from `dnir build` (its options are not in "
                             f"the file); export it with -o instead") from None
        with busy(f"compiling for {args.target}"):
            layer = compiled_graph(cfg, args.opt, "cuda")
            path = prebuild_layer(cfg, args.opt, layer, args.arch)
        print(f"{path}: cuda ({args.arch}), {args.opt}, inputs {', '.join(layer.input_names)}; "
              f"outputs {', '.join(layer.output_names)}")
        return 0
    with output_path(args.output) as tmp, busy(f"compiling for {args.target}"):
        build(graph, args.target, arch=args.arch).export_library(tmp)
    where = f"{args.target} ({args.arch})" if args.target == "cuda" else args.target
    print(f"{args.output}: {where}, inputs {', '.join(graph.input_names)}; outputs {', '.join(graph.output_names)}")
    return 0
