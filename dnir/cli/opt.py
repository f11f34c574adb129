"""dnir opt FILE.dnir: run a pass pipeline, write the optimised graph."""
from __future__ import annotations

import argparse
import json
import sys

from . import UsageError, check_output, load_graph, pipeline_names, write_text

EXAMPLE = """examples:
  dnir opt layer.dnir -o layer.O2.dnir --report
  dnir opt layer.dnir --passes eliminate_transposes,cumsum_axis -o out.dnir --validate
  dnir opt layer.dnir --pipeline O2 --block-size 32 --dump-dir ir/ -o out.dnir
  dnir opt layer.dnir --dump-dir ir/ --viz -o out.dnir   # ir/NNN_<pass>.svg and .diff.svg
  dnir opt layer.dnir --target cuda --report -o layer.cuda.dnir   # what the cuda pipeline fuses
"""


def register(sub):
    p = sub.add_parser("opt", help="optimise a .dnir graph with a pass pipeline", epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="graph in the .dnir text format")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--pipeline", default="O2", help="O0, O1 or O2 (default O2)")
    which.add_argument("--passes", help="comma-separated pass names, run in this order")
    p.add_argument("--block-size", type=int, help="block size of block_tril and block_solve (default 16)")
    p.add_argument("--target", help="then the target's own pipeline, under its pass context (e.g. cuda, "
                                    "vulkan: the delta rule's units fused where the kernels take them)")
    p.add_argument("--report", action="store_true",
                   help="print a table of what each pass changed, and what the target's passes found")
    p.add_argument("--validate", action="store_true",
                   help="check each pass numerically (NumPy before/after on random inputs)")
    p.add_argument("--dump-dir", help="write the IR after each pass as NNN_<pass>.dnir")
    p.add_argument("--viz", action="store_true",
                   help="with --dump-dir: draw each graph that a pass changed (NNN_<pass>.svg) and what "
                        "it changed (NNN_<pass>.diff.svg)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-o", "--output", required=True, help="where to write the optimised graph")
    p.set_defaults(func=run)


def run(args) -> int:
    from dnir.lowering import registry
    from dnir.passes import report_table, resolve, run_pipeline
    from dnir.passes.context import PassContext
    from dnir.text import print_graph

    from .progress import progress
    graph = load_graph(args.file)
    check_output(args.output)
    if args.block_size is not None and args.block_size < 1:
        raise UsageError(f"--block-size {args.block_size}: expected a positive integer")
    if args.viz and not args.dump_dir:
        raise UsageError("--viz draws the graphs dumped by --dump-dir; add --dump-dir DIR")
    options = {}
    if args.block_size:
        options = {name: {"block": args.block_size} for name in ("block_tril", "block_solve")}
    pipeline = pipeline_names("--passes", args.passes) if args.passes is not None else \
        pipeline_names("--pipeline", args.pipeline)
    context = PassContext()
    if args.target is not None:
        if args.target not in registry.targets():
            raise UsageError(f"--target {args.target!r}: expected one of {', '.join(registry.targets())}")
        pipeline = resolve(pipeline) + registry.pipeline(args.target)
        context = registry.target_context(args.target)
    with context:
        graph, records = run_pipeline(graph, pipeline, options=options,
                                      validate=args.validate, dump_dir=args.dump_dir,
                                      progress=lambda names: progress(names, desc="passes", unit="pass"))
    write_text(args.output, print_graph(graph))       # atomic: -o may name the input file
    if args.viz:
        draw_passes(args.dump_dir, records)
    if args.json:
        print(json.dumps({"output": args.output, "passes": [r.to_json() for r in records],
                          "remarks": [{"pass": name, "remark": text} for name, text in context.remarks]}))
    elif args.report:
        print(report_table(records))
        for name, text in context.remarks:
            print(f"{name}: {text}")
    else:
        first, last = records[0], records[-1]
        print(f"{args.file} -> {args.output}: {first.nodes} -> {last.nodes} nodes, "
              f"{first.flops} -> {last.flops} FLOPs", file=sys.stderr)
    return 0


def draw_passes(dump_dir: str, records):
    """Next to each dumped NNN_<pass>.dnir that differs from the one before it: its
    picture, and the diff picture against the previous graph."""
    import os
    from dnir import viz
    from dnir.text import parse_file

    from . import render_picture
    from .progress import progress
    paths = [os.path.join(dump_dir, f"{i:03d}_{r.name}") for i, r in enumerate(records)]
    drawn = [i for i, r in enumerate(records) if i == 0 or r.changed]
    previous = None
    for i in progress(drawn, desc="drawing passes", unit="pass"):
        graph = parse_file(paths[i] + ".dnir")
        render_picture(viz.to_dot(graph), paths[i] + ".svg")
        if previous is not None:
            render_picture(viz.diff_dot(previous, graph), paths[i] + ".diff.svg")
        previous = graph
