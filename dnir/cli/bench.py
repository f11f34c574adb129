"""dnir bench: dnir side by side with its peers on the CPU (the code lives in benchmarks/)."""
from __future__ import annotations

import argparse


def register(sub):
    from dnir.benchmarks.cli import DESCRIPTION, EXAMPLE, add_arguments
    p = sub.add_parser("bench", help="time dnir against flash-linear-attention's references on the CPU",
                       description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from dnir.benchmarks.cli import run as run_bench

    from . import UsageError
    if args.seed < 0:        # before the benchmark loads its peers
        raise UsageError(f"--seed {args.seed}: expected an integer >= 0")
    return run_bench(args)
