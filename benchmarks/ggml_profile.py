"""Where a dnir graph spends its time on ggml: every ggml node timed alone.

    python -m dnir.benchmarks.ggml_profile qwen3-next --opt O2 --seq-len 4096 --threads 1

The layer is prepared for the ggml target as the functional API prepares it,
lowered and placed by ggml's allocator (lowering/ggml/run.py), run once, then
each node of ggml's graph is computed alone (ggml_profile.c), `--repeats` times,
its fastest time kept (a shared machine's noise only adds). Times are summed by
the dnir node each ggml call lowers (the loop over chunks summed over its
chunks) and by ggml op, inside and outside that loop. One thread gives each
op's own cost; more threads add a barrier per op (and per matrix of a batched
ggml_mul_mat, in llamafile's sgemm).
"""
from __future__ import annotations

import argparse
import ctypes
import re
from collections import Counter
from pathlib import Path

import numpy as np

from .ggml_peer import compile_against_ggml

SOURCE = Path(__file__).with_name("ggml_profile.c")


def profile(name: str, opt: str, seq_len: int, threads: int, repeats: int = 3, seed: int = 0) -> dict:
    from dnir.api import compiled_graph
    from dnir.lowering.ggml.run import GgmlGraph
    from dnir.lowering.registry import prepare
    from dnir.models import preset, random_inputs
    lib = ctypes.CDLL(str(compile_against_ggml(SOURCE, internal=True)))
    lib.profile_nodes.argtypes = [ctypes.c_void_p] * 3
    lib.node_tensor.argtypes = lib.node_op.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.node_tensor.restype, lib.node_op.restype = ctypes.c_void_p, ctypes.c_char_p
    cfg = preset(name, seq_len=seq_len, mode="chunked", initial_state=True, final_state=True)
    compiled = GgmlGraph(prepare(compiled_graph(cfg, opt, "ggml"), "ggml"), threads=threads)
    compiled(random_inputs(cfg, seed))
    graph = compiled.cgraph
    seconds = np.full(compiled.nodes, np.inf)
    for _ in range(repeats):
        once = np.zeros(compiled.nodes)
        if lib.profile_nodes(compiled.backend, graph, once.ctypes.data) != 0:
            raise RuntimeError("ggml could not compute a node alone")
        seconds = np.minimum(seconds, once)
    by_node, by_op = Counter(), Counter()
    in_loop = 0.0
    for i, s in enumerate(seconds):
        label = compiled.labels.get(lib.node_tensor(graph, i), "?")
        looped = re.search(r" (chunk|step) \d+", label) is not None
        by_node[re.sub(r" (chunk|step) \d+.*", r" (all \1s)", label)] += s
        by_op[("loop" if looped else "outside", lib.node_op(graph, i).decode())] += s
        in_loop += s if looped else 0.0
    return {"layer": name, "opt": opt, "T": seq_len, "threads": threads, "total_s": float(seconds.sum()),
            "loop_s": in_loop, "by_node": by_node.most_common(), "by_op": by_op.most_common()}


def markdown(p: dict, top: int = 15) -> str:
    lines = [f"## {p['layer']} {p['opt']} on ggml, T={p['T']}, {p['threads']} thread(s)", "",
             f"Nodes alone: {p['total_s'] * 1e3:.0f} ms, of which the loop over chunks {p['loop_s'] * 1e3:.0f} ms.",
             "", "| where | ggml op | time |", "|---|---|---|"]
    lines += [f"| {where} | {op} | {s * 1e3:.1f} ms |" for (where, op), s in p["by_op"][:top]]
    lines += ["", "| dnir node | time |", "|---|---|"]
    lines += [f"| {label} | {s * 1e3:.1f} ms |" for label, s in p["by_node"][:top]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dnir.benchmarks.ggml_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=["qwen3-next", "kimi-linear"])
    ap.add_argument("--opt", default="O2")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(markdown(profile(args.preset, args.opt, args.seq_len, args.threads, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
