"""GPU legalisation: TVM's (LegalizeOps, FuseOps, FuseTIR, dlight) with one more dlight rule.

dlight's reduction rules reduce each output with a group of threads, which
suits a few long rows (softmax, norms). KDA's diagonal blocks are the opposite
shape: tens of millions of outputs, each a sum over the 128 key channels of a
product with an exponential computed in the kernel (recompute_into_reductions).
There one thread per output with a serial loop over the channels keeps every
thread busy without synchronisation; `ManyShortReductions` gives such kernels
that mapping (dlight's fallback mapping) before the reduction rules see them.
"""
from __future__ import annotations

import math

import tvm
from tvm import relax

MAX_REDUCTION = 256          # channels summed by one thread
MIN_OUTPUTS = 1 << 15        # enough outputs to fill the GPU with one thread each


def _rule_classes():
    from tvm import s_tir
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    class ManyShortReductions(GPUScheduleRule):
        """One thread per output for a single reduction with many short rows."""

        def apply(self, func, target, tunable):
            if not self.is_target_available(target):
                return None
            infos = normalize_prim_func(s_tir.Schedule(func))
            reductions = [b for b in infos or () if b.is_reduction()]
            if len(reductions) != 1:
                return None
            extents = [d if isinstance(d, int) else None for d in reductions[0].dom()]
            if None in extents:
                return None
            kinds = reductions[0].dom_kind()
            spatial = math.prod(e for e, k in zip(extents, kinds) if k == "S")
            reduced = math.prod(e for e, k in zip(extents, kinds) if k == "R")
            if reduced > MAX_REDUCTION or spatial < MIN_OUTPUTS:
                return None
            return dl.gpu.Fallback().apply(func, target, tunable)

    return dl, ManyShortReductions


def legalize_passes(target: tvm.target.Target) -> list:
    """TVM's GPU legalisation, with ManyShortReductions ahead of dlight's reduction rules."""
    dl, many_short_reductions = _rule_classes()
    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), many_short_reductions(), dl.gpu.Reduction(),
                                dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
    ]


def cuda_pipeline(target: tvm.target.Target):
    """TVM's CUDA pipeline with dnir's GPU legalisation."""
    from tvm.relax.backend.cuda import pipeline as cuda

    @tvm.transform.module_pass(opt_level=0, name="dnir.CUDAPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(cuda.library_dispatch_passes(target) + legalize_passes(target)
                                            + cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))(mod)

    return _pipeline
