"""ggml in the backend registry: target "ggml", ggml's CPU backend.

The lowering has no kernel for the fused delta-rule ops, so the registry
expands them into primitives before the graph reaches run.py.
"""
from __future__ import annotations

from dnir.passes.context import Target

from ..registry import Backend, register
from .run import compile_ggml, run_ggml


def _run(graph, inputs, target):
    return run_ggml(graph, inputs)


def _build(graph, target):
    return compile_ggml(graph)


BACKEND = register(Backend("ggml", ("ggml",), _run, lambda target: Target(target), build=_build))
