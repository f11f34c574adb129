"""dnir export FILE.dnir --format ggml-c -o delta_net.c: the graph as source another project builds."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

EXAMPLE = """examples:
  dnir opt gdn.dnir -o gdn.O2.dnir && dnir export gdn.O2.dnir --format ggml-c -o delta_net.c
  dnir export kda.dnir --format ggml-c -o kda.c --name build_kda

ggml-c: one C function that builds the graph with ggml in a caller's
ggml_context from its input tensors, as llama.cpp's graph builders do
(void NAME(struct ggml_context * ctx, <inputs>, struct ggml_tensor ** out_<output>, ...)),
one statement per ggml call under a comment naming the dnir node. Compile it
against ggml (ggml.h); the caller allocates and computes the graph. It also
prints the compute buffer ggml's allocator needs next to dnir's own plan.
"""


def register(sub):
    p = sub.add_parser("export", help="write a graph as source for another project (ggml C)",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="graph in the .dnir text format")
    p.add_argument("--format", required=True, choices=["ggml-c"], help="what to write")
    p.add_argument("-o", "--output", required=True, help="path of the C file to write")
    p.add_argument("--name", help="the C function's name (default: the output file's name, e.g. delta_net)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dnir.analysis.memory import plan
    from dnir.cli import UsageError, load_graph
    from dnir.files import check_output, write_text
    from dnir.lowering.ggml.export_c import export_c
    from dnir.lowering.ggml.run import compile_ggml
    from dnir.lowering.registry import prepare

    name = args.name or re.sub(r"\W", "_", Path(args.output).stem)
    if not name.isidentifier():
        raise UsageError(f"function name {name!r} is not a C identifier; give one with --name")
    check_output(args.output)
    graph = prepare(load_graph(args.file), "ggml")     # the graph as the ggml target runs it
    write_text(args.output, export_c(graph, name, args.file))
    ggml_bytes = compile_ggml(graph).compute_buffer_bytes
    print(f"{args.output}: function {name}, inputs {', '.join(graph.input_names)}; outputs "
          f"{', '.join(graph.output_names)}; compute buffer: ggml {ggml_bytes / 2**20:.1f} MiB, "
          f"dnir's plan {plan(graph).peak_bytes / 2**20:.1f} MiB")
    return 0
