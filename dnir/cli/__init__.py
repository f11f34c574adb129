"""The `dnir` command line. One module per subcommand, each with
`register(subparsers)` that adds its parser and sets `func(args) -> exit code`.

Exit codes: 0 ok, 1 a check failed, 2 usage or input error. User errors are
one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from dnir import __version__
from dnir.errors import DnirError

# Subcommand modules, in the order `dnir --help` lists them.
COMMANDS = ["build", "opt", "stats", "check", "run", "compile", "viz", "bench", "demo"]


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse's own usage errors as one line (exit 2), pointing at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dnir", description="A tensor-graph compiler for delta-net (linear attention) layers.",
        epilog="examples:\n  dnir demo\n  dnir build gdn --seq-len 1024 -o gdn.dnir && dnir opt gdn.dnir -o gdn.O2.dnir "
               "--report\n\n`dnir COMMAND --help` shows each command's examples.\n"
               "Exit codes: 0 ok, 1 a check failed, 2 usage or input error.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dnir {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"dnir.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UsageError, OSError) as e:   # OSError: a path that cannot be read or written
        print(f"dnir {args.command}: {e}", file=sys.stderr)
        return 2
    except DnirError as e:
        print(f"dnir {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def load_graph(path: str):
    """Read a .dnir file; a missing file is a usage error."""
    from dnir.text import parse_file
    try:
        return parse_file(path)
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
