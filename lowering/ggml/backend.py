"""ggml in the backend registry: target "ggml", ggml's CPU backend.

The pipeline recognises the delta rule's decode step and its loop over chunks
(passes/fuse_delta_steps.py; passes/carry_for_fused_steps.py first carries a
state that O2 transposed untransposed again, so that its step is found). lower.py runs such steps, and scans over them,
through ggml_gated_delta_net; ggml has no op for the loop over chunks, which
lower.py unrolls with the state transposed (no copy per chunk).
"""
from __future__ import annotations

from dnir.passes.context import Target

from ..registry import Backend, register
from . import intra_chunk
from .run import compile_ggml, run_ggml


def _run(graph, inputs, target):
    return run_ggml(graph, inputs)


def _build(graph, target):
    return compile_ggml(graph)


def _float32(what):
    def check(node, target):
        dtype = node.inputs[0].dtype
        return None if dtype == "f32" else f"{what} is float32, the {node.op} is {dtype}"
    return check


# token_step: ggml_gated_delta_net (lower.py expands the steps not made of raw inputs);
# chunk_scan: unrolled by lower.py in the layouts ggml_mul_mat reads without copies;
# intra_chunk: every chunk at once, a few batched ggml ops (lower.py), in the layouts the loop reads.
KERNELS = {"token_step": _float32("ggml_gated_delta_net"), "chunk_scan": _float32("the ggml chunk loop"),
           "intra_chunk": lambda node, target: intra_chunk.rejects(node)}

BACKEND = register(Backend("ggml", ("ggml",), _run, lambda target: Target(target, kernels=KERNELS),
                           pipeline=("carry_for_fused_steps", "fuse_delta_steps"), build=_build))
