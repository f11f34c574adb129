"""ggml in the backend registry: target "ggml", ggml's CPU backend.

The pipeline recognises the delta rule's decode step (passes/fuse_delta_steps.py);
lower.py runs such steps, and scans over them, through ggml_gated_delta_net. The
loop over chunks has no ggml kernel: the registry expands it into its scan.
"""
from __future__ import annotations

from dnir.passes.context import Target

from ..registry import Backend, register
from .run import compile_ggml, run_ggml


def _run(graph, inputs, target):
    return run_ggml(graph, inputs)


def _build(graph, target):
    return compile_ggml(graph)


def _token_step(node, target):
    """ggml_gated_delta_net takes float32 steps; lower.py expands the ones not made of raw inputs."""
    dtype = node.inputs[0].dtype
    return None if dtype == "f32" else f"ggml_gated_delta_net is float32, the step is {dtype}"


BACKEND = register(Backend("ggml", ("ggml",), _run, lambda target: Target(target, kernels={"token_step": _token_step}),
                           pipeline=("fuse_delta_steps",), build=_build))
