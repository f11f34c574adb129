"""Backends: NumPy (the reference), TVM (llvm / cuda / webgpu), Vulkan."""
from __future__ import annotations

from dnir.errors import BackendError

TARGETS = ("numpy", "llvm", "cuda", "vulkan")


def run(graph, inputs, *, target: str = "numpy", float64: bool = False):
    """Run `graph` on `target`; outputs as NumPy arrays. float64 is for the NumPy oracle only."""
    if target == "numpy":
        from .numpy_backend import run as run_numpy
        return run_numpy(graph, inputs, float64=float64)
    if target not in TARGETS:
        raise BackendError(f"unknown target {target!r}; available: {', '.join(TARGETS)}")
    if float64:
        raise BackendError(f"float64=True runs the NumPy oracle; target {target!r} runs the graph's own dtypes")
    if target == "llvm":
        from .tvm.compile import run_llvm
        return run_llvm(graph, inputs)
    if target == "cuda":
        from .runtime_loader import run_cuda
        return run_cuda(graph, inputs)
    from .vulkan import run_vulkan
    return run_vulkan(graph, inputs)
