"""Carry a loop's state in the layout the target's fused step reads.

relayout_scan_carries carries a state that starts as a constant (a layer without
an initial state) transposed, S^T, when that moves fewer elements per step; the
loop body is then written for S^T, and fuse_delta_steps, which recognises the
decode step on S [*batch, K, V], no longer finds it. On a target with a kernel
for the step (ggml: ggml_gated_delta_net, which keeps S^T itself), one fused op
per loop is worth more than the permutes: this pass tries carrying each such
carry untransposed again (carry_layout.with_relayouts with the last two axes
swapped, the permutes sunk into the body by eliminate_transposes) and keeps the
trial when fuse_delta_steps then fuses more steps.
"""
from __future__ import annotations

from dnir.graph import Graph

from .carry_layout import with_relayouts
from .construct import permute
from .context import PassContext, current
from .fuse_delta_steps import fuse_delta_steps
from .manager import register_pass, run_pipeline

CLEANUP = ["fold_constants", "eliminate_transposes", "cse", "dce"]


def _fused_steps(graph: Graph, target) -> int:
    with PassContext(target):       # a context of its own: the trial leaves no remarks
        return fuse_delta_steps(graph)[0].op_histogram()["token_step"]


@register_pass("carry_for_fused_steps")
def carry_for_fused_steps(graph: Graph) -> tuple[Graph, bool]:
    """Carry a scan's transposed state untransposed where the target's fused step then matches."""
    target = current().target
    if target is None or "token_step" not in target.kernels:
        return graph, False
    best = _fused_steps(graph, target)
    for scan in [n for n in graph.topo_order() if n.op == "scan"]:
        for i in range(scan.attrs["num_carry"]):
            init = scan.inputs[i]
            if init.rank < 2 or init.op not in ("full", "const"):
                continue
            swap = tuple(range(init.rank - 2)) + (init.rank - 1, init.rank - 2)
            trial = with_relayouts(graph, {id(scan): (scan, {i: (permute(init, swap), swap)})})
            trial = run_pipeline(trial, CLEANUP)[0]
            if _fused_steps(trial, target) > best:
                return trial, True      # the graph's scans are rebuilt: one accepted trial per run
    return graph, False
