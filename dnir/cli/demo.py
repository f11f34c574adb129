"""dnir demo: the README's main job."""
from __future__ import annotations

import argparse

import numpy as np

EXAMPLE = "example:\n  dnir demo\n"


def register(sub):
    p = sub.add_parser("demo", help="build a small graph, print it and run it", epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    import dnir
    # One chunk of a gated delta rule's decay mask, written the way it is written by hand.
    b = dnir.Builder()
    g = b.input("g", (4, 16))                 # log-gates of 4 heads x 16 tokens, all <= 0
    k = b.input("k", (4, 16, 8))
    gam = b.cumsum(g, axis=1)                 # cumulative gate per head
    diff = b.sub(b.reshape(gam, (4, 16, 1)), b.reshape(gam, (4, 1, 16)))
    decay = b.tril(b.exp(b.tril(diff)))       # mask before exp: every exponent <= 0
    kk = b.matmul(k, k, transpose_b=True)
    graph = b.build(b.mul(kk, decay), names=["a_kk"])
    print(dnir.print(graph))
    rng = np.random.default_rng(args.seed)
    inputs = {"g": -rng.uniform(0, 2, (4, 16)), "k": rng.standard_normal((4, 16, 8))}
    (out,) = dnir.run(graph, inputs)
    (ref,) = dnir.run(graph, inputs, float64=True)
    err = float(np.sqrt(np.mean((out - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))
    print(f"ran on numpy: output {out.dtype}{list(out.shape)}, rms error vs float64 run {err:.2e}")
    return 0
