"""Graph -> graph rewrites and the pass manager (imported as dnir.passes).

    graph = dnir.passes.optimize(graph, "O2")
    graph, records = dnir.passes.run_pipeline(graph, "O2", validate=True, dump_dir="ir/")
"""
from __future__ import annotations

from . import (block_solve, broadcasts, carry_for_fused_steps, carry_layout, cse, cumsum_axis, dce,  # noqa: F401  (each
               expand_fused, fold_constants, fold_narrowing_casts, fold_step_prologue,  # registers its pass)
               fold_widening_casts, fuse_delta_steps, fuse_intra_chunk, identities, layout_propagation,
               loop_invariants, narrow_loop_results, reassociate, recompute, set_vs_acc, sum_mul_to_matmul,
               transposes, tril_blocks)
from .manager import PASSES, PIPELINES, Pass, PassRecord, register_pass, report_table, resolve, run_pipeline
from .rewrite import P, Match, Rule, apply_rules, map_nodes
from .validate import ValidationError


def optimize(graph, pipeline="O2", **options):
    """Run a named pipeline (or a list of pass names) and return the new graph."""
    return run_pipeline(graph, pipeline, options=options)[0]


__all__ = ["P", "PASSES", "PIPELINES", "Match", "Pass", "PassRecord", "Rule", "ValidationError", "apply_rules",
           "map_nodes", "optimize", "register_pass", "report_table", "resolve", "run_pipeline"]
