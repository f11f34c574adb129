"""Backends: NumPy (the reference), TVM (llvm / cuda / webgpu), Vulkan."""
from __future__ import annotations

from dnir.errors import BackendError

TARGETS = ("numpy",)


def run(graph, inputs, *, target: str = "numpy", float64: bool = False):
    if target == "numpy":
        from .numpy_backend import run as run_numpy
        return run_numpy(graph, inputs, float64=float64)
    raise BackendError(f"unknown target {target!r}; available: {', '.join(TARGETS)}")
