"""dnir stats FILE.dnir: op counts, FLOPs, bytes moved and the planned compute buffer."""
from __future__ import annotations

import argparse
import json

from . import UsageError, load_graph, non_negative_int, pipeline_names

EXAMPLE = """examples:
  dnir stats layer.dnir
  dnir stats layer.dnir --json
  dnir stats layer.dnir --pipeline O2      # the same figures after every pass

peak_bytes is the planned compute buffer (intermediates and outputs; inputs are
the caller's and not counted), peak_lower_bound the most bytes live at once,
which no placement can beat.
"""


def register(sub):
    p = sub.add_parser("stats", help="FLOPs, bytes moved and planned peak memory of a .dnir graph",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="graph in the .dnir text format")
    p.add_argument("--pipeline", help="also run this pipeline (O0, O1, O2 or pass names, comma-separated) "
                                      "and report every pass; the totals are then the final graph's")
    p.add_argument("--top", type=non_negative_int, default=5, help="how many of the largest values live at the peak to list")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=run)


def graph_stats(graph, top: int = 5) -> dict:
    from dnir.analysis import memory
    from dnir.analysis.cost import graph_bytes, graph_flops
    mp = memory.plan(graph)
    return {"nodes": graph.node_count(), "ops": dict(sorted(graph.op_histogram().items())),
            "flops": graph_flops(graph), "bytes_moved": graph_bytes(graph),
            "peak_bytes": mp.peak_bytes, "peak_lower_bound": mp.lower_bound,
            "peak_values": [{"value": b.what, "bytes": b.nbytes} for b in mp.dominant(top)]}


def run(args) -> int:
    graph = load_graph(args.file)
    passes = None
    if args.pipeline is not None:
        pipeline_names("--pipeline", args.pipeline)
        graph, passes = _per_pass(graph, args.pipeline, args.top)
    stats = {"file": args.file, **graph_stats(graph, args.top)}
    if passes is not None:
        stats["passes"] = passes
    if args.json:
        print(json.dumps(stats))
        return 0
    print(f"{args.file}: {stats['nodes']} nodes, {stats['flops'] / 1e9:.4g} GFLOP, "
          f"{_mib(stats['bytes_moved'])} MiB moved, peak {_mib(stats['peak_bytes'])} MiB "
          f"(lower bound {_mib(stats['peak_lower_bound'])} MiB)")
    print(f"\n{'op':<14} {'count':>6}")
    for op, count in sorted(stats["ops"].items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{op:<14} {count:>6}")
    if stats["peak_values"]:
        print("\nlargest values live at the peak:")
        for v in stats["peak_values"]:
            print(f"  {_mib(v['bytes']):>10} MiB  {v['value']}")
    if passes is not None:
        head = f"{'pass':<22} {'nodes':>6} {'GFLOP':>10} {'MiB moved':>11} {'peak MiB':>10} {'bound MiB':>10}"
        print("\n" + head + "\n" + "-" * len(head))
        for r in passes:
            print(f"{r['pass']:<22} {r['nodes']:>6} {r['flops'] / 1e9:>10.4g} {_mib(r['bytes_moved']):>11} "
                  f"{_mib(r['peak_bytes']):>10} {_mib(r['peak_lower_bound']):>10}")
    return 0


def _per_pass(graph, pipeline: str, top: int):
    """Run the pipeline one pass at a time (verifying each), with the figures after each."""
    from dnir.passes import PASSES, resolve
    from dnir.verify import verify
    rows = [{"pass": "input", **graph_stats(graph, top)}]
    for name in resolve(pipeline):
        graph, _ = PASSES[name].fn(graph)
        verify(graph, f"after pass {name!r}")
        rows.append({"pass": name, **graph_stats(graph, top)})
    for r in rows:
        del r["peak_values"], r["ops"]
    return graph, rows


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"
