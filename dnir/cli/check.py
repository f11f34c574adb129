"""dnir check FILE.dnir: parse and verify a graph (and a layer's metadata against it);
with --ranges, find ops that can overflow."""
from __future__ import annotations

import argparse
import json
import math
import sys

from dnir.errors import DnirError

EXAMPLE = """examples:
  dnir check layer.dnir                                # not a valid graph: exit 2
  dnir check layer.dnir --ranges                       # exp/div/log that can overflow: exit 1
  dnir check layer.dnir --ranges --range g=-5,0 --range v=-10,10

A valid file parses, verifies, and (a delta-net layer's) metadata describes the
graph's own inputs and outputs.

--ranges propagates value intervals from the inputs' declared ranges (defaults:
g in [-20, 0], beta in [0, 1], q and k in [-1, 1]; any other input unbounded)
and reports every exp, div, log, sqrt and rsqrt whose operand range can
overflow or is undefined in the value's dtype.
"""


def register(sub):
    p = sub.add_parser("check", help="parse and verify a .dnir file (and, with --ranges, its value ranges)",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="graph in the .dnir text format")
    p.add_argument("--ranges", action="store_true", help="report ops whose operand range can overflow")
    p.add_argument("--range", action="append", default=[], metavar="NAME=LO,HI",
                   help="declare an input's range (repeatable; implies --ranges)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def parse_range(text: str) -> tuple[str, tuple[float, float]]:
    from dnir.cli import UsageError
    name, sep, bounds = text.partition("=")
    parts = bounds.split(",")
    try:
        lo, hi = (float(x) for x in parts)
    except ValueError:
        raise UsageError(f"--range {text!r}: expected NAME=LO,HI, e.g. g=-20,0") from None
    if not name or not sep or math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise UsageError(f"--range {text!r}: expected NAME=LO,HI with LO <= HI, e.g. g=-20,0")
    return name, (lo, hi)


def run(args) -> int:
    from dnir.cli import UsageError, load_graph
    declared = dict(parse_range(r) for r in args.range)
    try:
        graph = load_graph(args.file)
    except DnirError as e:      # not a valid graph: an input error (exit 2), as in every command
        if not args.json:
            raise
        print(json.dumps({"ok": False, "error": str(e), "kind": type(e).__name__}))
        return 2
    unknown = sorted(set(declared) - set(graph.input_names))
    if unknown:
        raise UsageError(f"--range names {unknown}, which are not inputs of the graph; "
                         f"its inputs are {list(graph.input_names)}")
    summary = {"ok": True, "nodes": graph.node_count(), "inputs": list(graph.input_names),
               "outputs": list(graph.output_names)}
    findings = []
    if args.ranges or declared:
        from dnir.analysis.ranges import analyze
        findings = analyze(graph, declared).findings
        summary["ok"] = not findings
        summary["findings"] = [f.to_json() for f in findings]
    if args.json:
        print(json.dumps(summary))
    elif findings:
        for f in findings:
            print(f"{args.file}: {f}")
        print(f"{args.file}: {len(findings)} op(s) can overflow or are undefined", file=sys.stderr)
    else:
        ranges = ", value ranges ok" if "findings" in summary else ""
        print(f"{args.file}: ok ({summary['nodes']} nodes, inputs {', '.join(summary['inputs'])}; "
              f"outputs {', '.join(summary['outputs'])}{ranges})")
    return 0 if summary["ok"] else 1
