"""The TVM backends: llvm (the CPU), cuda, and vulkan (TVM's WGSL run by wgpu).

TVM takes seconds to import, so nothing here imports it until a graph is run or
compiled. On the GPU targets the pipeline recomputes broadcast expansions inside
the reductions that read them, and recognises the delta rule's loop over chunks
and decode step (passes/fuse_delta_steps.py) where the target's kernels take them
(chunk_scan.py: a thread block fits the shared memory; all: float32); the loop over
chunks runs as its sequential part (chunk_states) and a chunk-parallel output
(chunk_output.py); O2 inside a GPU target's context recognises the work local to each
chunk (intra_chunk.py). On llvm the
pipeline recognises both too (cpu_chunk_scan.py, cpu_token_step.py: float32 and float64), and
O2 inside llvm's context the work local to each chunk (cpu_intra_chunk.py).
"""
from __future__ import annotations

from dnir.passes.context import Target

from ..registry import Backend, register
from . import intra_chunk

GPU_PIPELINE = ("recompute_into_reductions", "fuse_delta_steps", "fold_step_prologue")
KERNEL_DTYPES = frozenset({"f32"})
CPU_PIPELINE = ("fuse_delta_steps", "fold_step_prologue")
CPU_KERNEL_DTYPES = frozenset({"f32", "f64"})
CUDA_SHARED_BYTES = 48 * 1024       # static shared memory of a CUDA thread block


def _run_llvm(graph, inputs, target):
    from .compile import run_llvm
    return run_llvm(graph, inputs)


def _run_cuda(graph, inputs, target):
    from ..runtime_loader import run_cuda
    return run_cuda(graph, inputs)


def _run_vulkan(graph, inputs, target):
    from ..vulkan import run_vulkan
    return run_vulkan(graph, inputs)


def _build(graph, target, **options):
    from .compile import build
    return build(graph, target, **options)


def _build_vulkan(graph, target):
    from ..vulkan import build
    return build(graph)


def _chunk_scan_rejects(node, target):
    from .chunk_scan import rejects
    return rejects(node, target)


def _chunk_output_rejects(node, target):
    from .chunk_output import rejects
    return rejects(node, target)


def _intra_chunk_rejects(node, target):
    return intra_chunk.rejects(node, target)


def _token_step_rejects(node, target):
    from .token_step import rejects
    return rejects(node, target)


# The two kernels of the loop over chunks, which on CUDA load the loop's intermediates narrow, and store
# them (with intra_chunk) where passes/narrow_loop_results.py asks
LOOP = {"chunk_states", "chunk_output"}


def _gpu_target(name: str, shared_bytes: int, half_o: bool = False) -> Target:
    """The GPU kernels: decode_step (the step with its prologue, token_step.py; a step that it declines
    stays token_step) and, with half_o, chunk_output storing a bf16/fp16 o itself, intra_chunk and
    chunk_states the loop's intermediates, which chunk_states and chunk_output then load narrow (Vulkan
    keeps o's cast and the intermediates wide: WGSL has no bf16, and f16 storage only where the adapter
    has shader-f16)."""
    return Target(name, {"chunk_scan": _chunk_scan_rejects, "chunk_states": _chunk_scan_rejects,
                         "chunk_output": _chunk_output_rejects, "intra_chunk": _intra_chunk_rejects,
                         "token_step": _token_step_rejects, "decode_step": _token_step_rejects},
                  shared_bytes=shared_bytes, dtypes=KERNEL_DTYPES,
                  narrow_operands=frozenset({"token_step", "decode_step"} | (LOOP if half_o else set())),
                  narrow_results=frozenset(LOOP | {"intra_chunk"} if half_o else ()))


def _vulkan_target(name: str) -> Target:
    from ..vulkan import shared_bytes
    return _gpu_target(name, shared_bytes())


def _cpu_token_step_rejects(node, target):
    from .cpu_token_step import rejects
    return rejects(node, target)


def _cpu_chunk_scan_rejects(node, target):
    from .cpu_chunk_scan import rejects
    return rejects(node, target)


def _cpu_intra_chunk_rejects(node, target):
    from .cpu_intra_chunk import rejects
    return rejects(node, target)


def _llvm_target(name: str) -> Target:
    return Target(name, {"chunk_scan": _cpu_chunk_scan_rejects, "token_step": _cpu_token_step_rejects,
                         "decode_step": _cpu_token_step_rejects, "intra_chunk": _cpu_intra_chunk_rejects},
                  dtypes=CPU_KERNEL_DTYPES, narrow_operands=frozenset({"token_step", "decode_step"}))


# llvm: the loop over chunks and a decode step are one kernel each (cpu_chunk_scan.py, cpu_token_step.py).
register(Backend("tvm-llvm", ("llvm",), _run_llvm, _llvm_target, CPU_PIPELINE, _build))
register(Backend("tvm-cuda", ("cuda",), _run_cuda,
                 lambda name: _gpu_target(name, CUDA_SHARED_BYTES, half_o=True),
                 GPU_PIPELINE, _build))
register(Backend("vulkan", ("vulkan",), _run_vulkan, _vulkan_target, GPU_PIPELINE, _build_vulkan))
