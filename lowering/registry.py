"""The backend registry: every way to run a graph, looked up by target name.

A backend is a `Backend` object registered once:

    from dnir.lowering.registry import Backend, register

    register(Backend(
        name="mine",                      # how errors and listings name it
        targets=("mine",),                # target names it serves (`run(..., target="mine")`)
        run=run_mine,                     # (graph, inputs, target) -> list of NumPy arrays
        context=lambda target: Target(target, kernels={...}),  # the target and its limits
        pipeline=(),                      # passes run before lowering, under that context
        build=None))                      # optional (graph, target, **options) -> compiled artefact

`run(graph, inputs, target=...)` finds the backend serving `target`, prepares
the graph for it and calls the backend's `run`. Preparing (`prepare`) runs the
backend's pipeline, then `fold_widening_casts` (a half input's cast into the
fused op reading it, where its kernel loads half operands), `fold_narrowing_casts`
(a half result's cast into the fused op making it, where its kernel stores half
results), `narrow_loop_results` (the chunked loop's intermediates in bf16 where o
is, at precision "tf32") and `expand_fused`,
inside a `PassContext` holding the
backend's `Target`: the pipeline may replace subgraphs by fused ops the target
has kernels for (passes/fuse_delta_steps.py on GPUs), and every fused op the
target has no kernel for, or whose kernel declines the node (`Target.kernels`),
is expanded back into primitive ops through its op's `expand`. A backend's
`run` therefore sees only the primitives and the fused ops its own `Target`
accepts; it raises a BackendError naming every op it still cannot lower.
The prepared graph is kept per graph object and target.

Adding a backend is one `register` call in its own module, and one line in
lowering/__init__.py that imports it; it touches no other backend
(examples/06_toy_backend.py registers one from a script).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dnir.errors import BackendError
from dnir.graph import Graph
from dnir.passes import PASSES
from dnir.passes.context import PassContext, Target
from dnir.passes.manager import record_made_by
from dnir.verify import verify


@dataclass(frozen=True)
class Backend:
    name: str
    targets: tuple[str, ...]
    run: Callable[[Graph, object, str], list[np.ndarray]]
    context: Callable[[str], Target]
    pipeline: tuple[str, ...] = ()
    build: Callable | None = None


BACKENDS: dict[str, Backend] = {}     # target name -> the backend serving it


def register(backend: Backend) -> Backend:
    """Serve `backend.targets` with `backend`; a target served by another backend is an error."""
    unknown = [p for p in backend.pipeline if p not in PASSES]
    if unknown:
        raise BackendError(f"backend {backend.name!r}: unknown pass(es) {unknown} in its pipeline")
    for target in backend.targets:
        other = BACKENDS.get(target)
        if other is not None and other.name != backend.name:
            raise BackendError(f"target {target!r} is served by backend {other.name!r}; "
                               f"backend {backend.name!r} cannot serve it too")
    for target in backend.targets:
        BACKENDS[target] = backend
    return backend


def targets() -> tuple[str, ...]:
    return tuple(BACKENDS)


def backend_for(target: str) -> Backend:
    try:
        return BACKENDS[target]
    except KeyError:
        raise BackendError(f"unknown target {target!r}; available: {', '.join(BACKENDS)}") from None


def pipeline(target: str) -> list[str]:
    """The passes that prepare a graph for `target`: the backend's own, then the half inputs' casts
    folded into the fused ops whose kernels load them, the half results' casts into the fused ops
    whose kernels store them, the loop's intermediates stored at a bf16 o's width (at precision
    "tf32"), then expand_fused."""
    return [*backend_for(target).pipeline, "fold_widening_casts", "fold_narrowing_casts", "narrow_loop_results",
            "expand_fused"]


def target_context(target: str) -> PassContext:
    return PassContext(backend_for(target).context(target))


_PREPARED: "weakref.WeakKeyDictionary[Graph, dict[str, Graph]]" = weakref.WeakKeyDictionary()


def prepare(graph: Graph, target: str) -> Graph:
    """`graph` as `target`'s backend runs it (see the module docstring); made once per graph and target."""
    done = _PREPARED.setdefault(graph, {})
    if target not in done:
        with target_context(target):
            new = graph
            for name in pipeline(target):
                before, new = new, PASSES[name].fn(new)[0]
                record_made_by(before, new, name)
            verify(new)
        done[target] = None if new is graph else new     # None: the graph itself (no reference back to the key)
    return graph if done[target] is None else done[target]


def run(graph: Graph, inputs, target: str = "numpy") -> list[np.ndarray]:
    return backend_for(target).run(prepare(graph, target), inputs, target)


def build(graph: Graph, target: str, **options):
    """The backend's compiled artefact for the prepared graph (e.g. a TVM executable to export)."""
    backend = backend_for(target)
    if backend.build is None:
        raise BackendError(f"backend {backend.name!r} (target {target!r}) compiles nothing ahead of a run")
    return backend.build(prepare(graph, target), target, **options)

