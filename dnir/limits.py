"""Bounds on what dnir reads and runs, checked where sizes come in (a file, the
command line, the functional API) so that a size nobody can mean is an error
naming the size and its memory, never an allocation that NumPy or the kernel
refuses half-way through a run.
"""
from __future__ import annotations

import os

from .errors import InputError

# The most elements one tensor may have: 2**40 (4 TiB in float32) is more than any
# machine holds, and every size below it is an exact integer everywhere dnir counts
# elements or bytes (NumPy int64, TVM's 64-bit indices).
MAX_ELEMENTS = 2**40

# The largest .dnir text read. A graph's size does not grow with the sequence
# length: the largest layer graphs are a few hundred KiB.
MAX_TEXT_BYTES = 64 * 2**20


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024 or unit == "EiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def oversize(t) -> str | None:
    """Why a TensorType is beyond MAX_ELEMENTS (its element count and bytes), or None."""
    if t.size <= MAX_ELEMENTS:
        return None
    return (f"{t.size:.3g} elements, {format_bytes(t.nbytes)}; a tensor may have at most "
            f"2**40 elements ({format_bytes(MAX_ELEMENTS * t.itemsize)} of {t.dtype})")


def check_graph_sizes(graph, where: str):
    """Every value of `graph` (scan bodies included) within MAX_ELEMENTS, else InputError."""
    for node in graph.topo_order():
        for t in (node.type if isinstance(node.type, tuple) else (node.type,)):
            why = oversize(t)
            if why:
                raise InputError(f"{where}: {node.op} value {t} has {why}")
        if node.op == "scan":
            check_graph_sizes(node.attrs["body"], where)


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_memory(what: str, peak: int, input_bytes: int):
    """InputError when a CPU run needs more than this machine has. `peak` is the memory
    plan's compute buffer (dnir.analysis.memory.plan, made by the caller before anything
    runs): a lower bound of any run's memory, to which the inputs add."""
    total = machine_memory()
    if total is not None and peak + input_bytes > total:
        raise InputError(f"{what}: running needs at least {format_bytes(peak + input_bytes)} (planned compute "
                         f"buffer {format_bytes(peak)} + inputs {format_bytes(input_bytes)}), more than this "
                         f"machine's {format_bytes(total)} of memory")
