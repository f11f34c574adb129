"""Compile dnir graphs with TVM for `llvm` and `cuda`, with a cache of executables.

The cache key is the hash of the graph's printed text (which includes every
type and attribute) and the target, so structurally equal graphs built twice
share one executable.
"""
from __future__ import annotations

import hashlib
import threading

import numpy as np
import tvm
from tvm import relax

from dnir.errors import BackendError
from dnir.graph import Graph
from dnir.text import print_graph

from .translate import translate

DEFAULT_CUDA_ARCH = "sm_90"
_CACHE: dict[tuple[str, str], object] = {}
_VMS: dict[int, object] = {}
_LOCK = threading.Lock()


def graph_hash(graph: Graph) -> str:
    return hashlib.sha256(print_graph(graph).encode()).hexdigest()


def make_target(target: str, arch: str = DEFAULT_CUDA_ARCH) -> tvm.target.Target:
    if target == "llvm":
        return tvm.target.Target(_llvm_target())
    if target == "cuda":
        # Always give arch: plain "cuda" means sm_50, which current nvcc rejects.
        return tvm.target.Target({"kind": "cuda", "arch": arch}, host=_llvm_target())
    if target == "webgpu":
        return tvm.target.Target("webgpu", host=_llvm_target())
    raise BackendError(f"unknown TVM target {target!r}; expected llvm, cuda or webgpu")


def _llvm_target() -> dict:
    """The host CPU by name ("-mcpu=native" is rejected by this LLVM), so LLVM uses its vector units."""
    from tvm.target.codegen import llvm_get_system_cpu
    return {"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": _cores()}


def _cores() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def relax_pipeline(target: tvm.target.Target):
    """TVM's default pipeline, with dnir's CPU schedules after fusion on llvm."""
    if target.kind.name != "llvm":
        return "default"  # LegalizeOps, FuseOps, FuseTIR, dlight GPU rules
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from .cpu_schedule import schedule_cpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            passes = (cpu.library_dispatch_passes(target) + cpu.legalize_passes(target) + [schedule_cpu(target)]
                      + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
            return tvm.transform.Sequential(passes)(mod)
    return _pipeline


def build(graph: Graph, target: str = "llvm", arch: str = DEFAULT_CUDA_ARCH):
    """The compiled `relax.VMExecutable` for a graph (cached by graph hash and target)."""
    tgt = make_target(target, arch)
    key = (graph_hash(graph), str(tgt))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    mod = translate(graph, gpu=target != "llvm", target_name=target)
    ex = tvm.compile(mod, tgt, relax_pipeline=relax_pipeline(tgt))
    with _LOCK:
        _CACHE[key] = ex
    return ex


def cuda_source(ex) -> str:
    """The CUDA C source inside a module built for the cuda target."""
    mod = _find_module(ex.mod, "cuda")
    if mod is None:
        raise BackendError("the executable holds no CUDA module")
    return mod.inspect_source("")


def _find_module(mod, kind):
    if mod.kind == kind:
        return mod
    for sub in mod.imports:
        found = _find_module(sub, kind)
        if found is not None:
            return found
    return None


def run_llvm(graph: Graph, inputs) -> list[np.ndarray]:
    """Run on the CPU through TVM's LLVM backend; outputs as NumPy arrays."""
    from dnir.lowering.numpy_backend import prepare_inputs
    arrays = prepare_inputs(graph, inputs)
    ex = build(graph, "llvm")
    with _LOCK:
        # Loading an executable runs LLVM's code generation: keep one VM per executable.
        vm = _VMS.get(id(ex))
        if vm is None:
            vm = _VMS[id(ex)] = relax.VirtualMachine(ex, tvm.cpu())
    dev = tvm.cpu()
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays])
    return [np.asarray(o.numpy()) for o in out]
