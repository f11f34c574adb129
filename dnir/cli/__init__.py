"""The `dnir` command line. One module per subcommand, each with
`register(subparsers)` that adds its parser and sets `func(args) -> exit code`.

Exit codes: 0 ok, 1 a check of a valid graph failed, 2 usage or input error (a
missing, unreadable or invalid file included), 130 interrupted. User errors are
one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from dnir import __version__
from dnir.errors import DnirError
from dnir.files import check_output, output_path, write_text  # noqa: F401  (every command writes through them)

# Subcommand modules, in the order `dnir --help` lists them.
COMMANDS = ["build", "opt", "stats", "check", "run", "compile", "export", "viz", "bench", "demo"]


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
    except UsageError as e:
        print(f"dnir {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:     # a path that cannot be read or written
        print(f"dnir {args.command}: {os_error(e)}", file=sys.stderr)
        return 2
    except DnirError as e:
        print(f"dnir {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # outputs are renamed into place only when complete: none is half-written
        print(f"dnir {args.command}: interrupted", file=sys.stderr)
        return 130


def os_error(e: OSError) -> str:
    """One wording for a path that cannot be read or written."""
    if isinstance(e, FileNotFoundError) and e.filename is not None:
        return f"no such file: {e.filename}"
    if e.filename is not None and e.strerror:
        return f"cannot use {e.filename}: {e.strerror}"
    return str(e)


def non_negative_int(text: str) -> int:
    """An argparse type: seeds, counts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 0")
    return value


def pipeline_names(option: str, text: str) -> str:
    """A --pipeline or --passes value that names at least one pass."""
    if not text.strip(" ,"):
        raise UsageError(f"{option} {text!r} names no pass; expected O0, O1, O2 or comma-separated pass names")
    return text


def load_graph(path: str):
    """Read, parse and verify a .dnir file; a delta-net layer's metadata is checked
    against the graph (the inputs and oracle drawn from it must fit). Every command
    reads its graphs here: one size limit, one wording for a missing file."""
    from dnir.models import DeltaNetConfig
    from dnir.text import parse_file
    from dnir.verify import verify
    try:
        graph = verify(parse_file(path), path)
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder; expected a .dnir file") from None
    if graph.meta.get("model") == "delta_net":
        DeltaNetConfig.of_graph(graph, path)
    return graph


def render_picture(dot, path) -> Path:
    """viz.render through output_path. Without Graphviz, viz writes the .dot source next
    to the temporary and raises; that file is moved beside `path` and the error names it."""
    from dnir import viz
    with output_path(path) as tmp:
        try:
            viz.render(dot, tmp)
        except DnirError as e:
            source = Path(tmp).with_suffix(".dot")
            if not source.exists():
                raise
            os.replace(source, Path(path).with_suffix(".dot"))
            raise DnirError(str(e).replace(str(source), str(Path(path).with_suffix(".dot")))
                            .replace(tmp, str(path))) from None
    return Path(path)
