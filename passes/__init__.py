"""Graph -> graph rewrites and the pass manager (imported as dnir.passes)."""
from __future__ import annotations

from dnir.errors import DnirError

PIPELINES: dict[str, list] = {"O0": []}


def optimize(graph, pipeline="O2"):
    """Run a named pipeline (or a list of pass names) and return the new graph."""
    names = PIPELINES.get(pipeline) if isinstance(pipeline, str) else list(pipeline)
    if names is None:
        raise DnirError(f"unknown pipeline {pipeline!r}; available: {', '.join(PIPELINES)}")
    if names:
        raise DnirError(f"passes {names} are not available")
    return graph
