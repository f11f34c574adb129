"""Numeric validation of a rewrite: run the NumPy backend before and after on
fresh random inputs drawn from each input's domain, compare the outputs.

The NumPy reference backend and a model's own input draws live in layers above
the passes; dnir/__init__.py, which assembles the layers, hands them in with
`use_reference` (so the passes import neither)."""
from __future__ import annotations

import re

import numpy as np

from dnir.errors import DnirError
from dnir.graph import Graph

_REFERENCE: dict = {"run": None, "model_inputs": {}}


class ValidationError(DnirError):
    """A pass changed what a graph computes."""


# Input name -> (low, high) of a uniform draw. Gates are log-space decays
# (<= 0); beta is a mixing weight in (0, 1). Anything else: standard normal.
# A graph's meta may override this with {"domains": {name: [low, high]}}.
DOMAIN_HINTS = [
    (re.compile(r"^(g|gk|gate|gates|log_decay)(_.*)?$"), (-1.0, -0.01)),
    (re.compile(r"^beta(_.*)?$"), (0.05, 0.95)),
]


def use_reference(run, model_inputs: dict):
    """run(graph, inputs, float64=True) -> outputs, the executor validation compares with;
    model_inputs: graph.meta["model"] -> fn(meta, rng) -> {input name: array}, a model's draws."""
    _REFERENCE.update(run=run, model_inputs=dict(model_inputs))


def input_domain(graph: Graph, name: str):
    domains = dict(graph.meta.get("domains", ()) or ())
    if name in domains:
        return tuple(domains[name])
    for pattern, domain in DOMAIN_HINTS:
        if pattern.match(name):
            return domain
    return None


def random_inputs(graph: Graph, rng: np.random.Generator) -> list[np.ndarray]:
    model_inputs = _REFERENCE["model_inputs"].get(graph.meta.get("model"))
    if model_inputs:             # a model draws its own inputs the way real layers see them
        drawn = model_inputs(graph.meta, rng)
        return [drawn[name] for name in graph.input_names]
    arrays = []
    for node in graph.inputs:
        shape, name = node.shape, node.attrs["name"]
        if node.type.is_float:
            domain = input_domain(graph, name)
            arr = rng.uniform(*domain, shape) if domain else rng.standard_normal(shape)
        elif node.dtype == "bool":
            arr = rng.random(shape) < 0.5
        else:
            low, high = input_domain(graph, name) or (0, 4)
            arr = rng.integers(low, high, shape)
        arrays.append(arr)
    return arrays


def compare(before: Graph, after: Graph, rng: np.random.Generator, rtol: float = 1e-6) -> list[str]:
    """Run both graphs in float64 on the same random inputs; describe each output that differs.

    float64 makes the check about algebra: a rewrite may reassociate sums, so
    outputs agree to rounding, relative to the output's magnitude.
    """
    run = _REFERENCE["run"]
    inputs = random_inputs(before, rng)
    want = run(before, inputs, float64=True)
    got = run(after, inputs, float64=True)
    problems = []
    for name, a, b in zip(before.output_names, want, got):
        if a.shape != b.shape:
            problems.append(f"output {name}: shape {list(b.shape)}, expected {list(a.shape)}")
            continue
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if not np.array_equal(np.isfinite(a), np.isfinite(b)):
            problems.append(f"output {name}: non-finite values differ")
            continue
        finite = np.isfinite(a)
        err = float(np.max(np.abs(a - b)[finite], initial=0.0))
        scale = float(np.max(np.abs(a[finite]), initial=0.0))
        if err > rtol * (scale + 1e-30) and err > 1e-12:
            problems.append(f"output {name}: max abs error {err:.3g} (output magnitude {scale:.3g})")
    return problems
