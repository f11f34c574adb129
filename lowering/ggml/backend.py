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


def _intra_chunk(node, target):
    """ggml's intra_chunk (lower.py) decays by one gate per head; a gate per key channel makes
    its decay tensor K times larger (2 GiB at T=4096), where O2's blocks of 16 rows cost less."""
    why = _float32("ggml's intra_chunk")(node, target)
    if why is None and node.inputs[3].shape[-1] != 1:
        why = f"ggml's intra_chunk takes one gate per head; g has {node.inputs[3].shape[-1]} per head"
    return why


# token_step: ggml_gated_delta_net (lower.py expands the steps not made of raw inputs);
# chunk_scan: unrolled by lower.py in the layouts ggml_mul_mat reads without copies;
# intra_chunk: every chunk at once, a few batched ggml ops (lower.py), in the layouts the loop reads.
KERNELS = {"token_step": _float32("ggml_gated_delta_net"), "chunk_scan": _float32("the ggml chunk loop"),
           "intra_chunk": _intra_chunk}

BACKEND = register(Backend("ggml", ("ggml",), _run, lambda target: Target(target, kernels=KERNELS),
                           pipeline=("carry_for_fused_steps", "fuse_delta_steps"), build=_build))
