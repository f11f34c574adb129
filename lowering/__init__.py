"""Backends: NumPy (the reference), TVM (llvm / cuda), Vulkan, ggml, each registered in
lowering/registry.py, which says how to add one."""
from __future__ import annotations

from dnir.errors import BackendError

from . import numpy_backend, registry
from .tvm import backends as _tvm_backends  # noqa: F401  (registers llvm, cuda, vulkan)
from .ggml import backend as _ggml_backend  # noqa: F401  (registers ggml)


def run(graph, inputs, *, target: str = "numpy", float64: bool = False):
    """Run `graph` on `target`; outputs as NumPy arrays. float64 is for the NumPy oracle only."""
    backend = registry.backend_for(target)
    if float64:
        if target != "numpy":
            raise BackendError(f"float64=True runs the NumPy oracle; target {target!r} runs the graph's own dtypes")
        return numpy_backend.run(registry.prepare(graph, target), inputs, float64=True)
    return backend.run(registry.prepare(graph, target), inputs, target)
