"""dnir check FILE.dnir: parse and verify a graph."""
from __future__ import annotations

import argparse
import json
import sys

from dnir.errors import DnirError

EXAMPLE = "example:\n  dnir check layer.dnir\n"


def register(sub):
    p = sub.add_parser("check", help="parse and verify a .dnir file", epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="graph in the .dnir text format")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from dnir.text import parse_file
    from dnir.verify import verify
    try:
        graph = verify(parse_file(args.file))
    except FileNotFoundError:
        raise
    except DnirError as e:
        if args.json:
            print(json.dumps({"ok": False, "error": str(e), "kind": type(e).__name__}))
        else:
            print(f"{args.file}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    summary = {"ok": True, "nodes": graph.node_count(), "inputs": list(graph.input_names),
               "outputs": list(graph.output_names)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{args.file}: ok ({summary['nodes']} nodes, inputs {', '.join(summary['inputs'])}; "
              f"outputs {', '.join(summary['outputs'])})")
    return 0
