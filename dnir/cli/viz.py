"""dnir viz FILE.dnir -o out.svg|png|pdf|dot [--collapse] [--diff AFTER.dnir]"""
from __future__ import annotations

import argparse

from dnir.cli import load_graph, render_picture

EXAMPLE = """examples:
  dnir viz layer.dnir -o layer.svg
  dnir viz layer.dnir --collapse -o layer.png
  dnir viz before.dnir --diff after.dnir -o diff.svg
"""


def register(sub):
    p = sub.add_parser("viz", help="draw a graph (or the diff of two) with Graphviz", epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="graph in the .dnir text format")
    p.add_argument("-o", "--output", required=True, help="picture to write: .svg, .png, .pdf or .dot")
    p.add_argument("--collapse", action="store_true", help="fold scan bodies and layout chains")
    p.add_argument("--diff", metavar="AFTER", help="highlight what changed from FILE to AFTER")
    p.set_defaults(func=run)


def run(args) -> int:
    from dnir import viz
    graph = load_graph(args.file)
    if args.diff:
        dot = viz.diff_dot(graph, load_graph(args.diff), collapse=args.collapse)
    else:
        dot = viz.to_dot(graph, collapse=args.collapse)
    path = render_picture(dot, args.output)
    print(f"wrote {path}")
    return 0
