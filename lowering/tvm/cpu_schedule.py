"""Schedules for the llvm target: every core and the vector units.

TVM 0.27's dlight has CPU rules for GEMV and softmax-like reductions only;
an unscheduled PrimFunc is one single-threaded scalar loop nest (a matmul
~650x slower than NumPy). Each block of each fused PrimFunc gets one of:

- reduction whose innermost spatial axis is contiguous in some operand
  (matmul-like): a register tile of `rows x lanes` outputs accumulated in a
  local buffer, reduction loops outside the tile, the tile's columns vectorized
  and its rows unrolled, outer tiles parallel;
- other reductions (a row sum): spatial loops fused and parallel, the
  reduction serial inside;
- spatial blocks: leading loops fused and parallel, the innermost loop
  vectorized.

Producers are not inlined into reductions: a transpose or an `exp` feeding a
matmul is computed once, not once per reuse.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx

_DATA_PAR, _REDUCE = 0, 2


def schedule_cpu(target: tvm.target.Target):
    from tvm.target.codegen import llvm_get_vector_width

    vector_bits = llvm_get_vector_width(target) if target.kind.name == "llvm" else 128
    vector_bits = vector_bits if vector_bits > 0 else 128

    @tvm.transform.module_pass(opt_level=0, name="dnir.ScheduleCPU")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
                scheduled = schedule_func(func, vector_bits)
                if scheduled is not None:
                    updates[gv] = scheduled
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def _is_scheduled(func) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def schedule_func(func: tirx.PrimFunc, vector_bits: int):
    """The scheduled function, or None where the function has no block structure to work on."""
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except Exception:  # noqa: BLE001 - a function without a root block is left as written
        return None
    for block in sch.get_child_blocks(root):
        stmt = sch.get(block)
        kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
        loops = sch.get_loops(block)
        if len(loops) != len(kinds) or any(k not in (_DATA_PAR, _REDUCE) for k in kinds):
            continue  # already restructured or an opaque block: leave it
        lanes = max(vector_bits // _bits(stmt), 1)
        rules = [_schedule_reduction, _schedule_row_reduction] if _REDUCE in kinds else [_schedule_spatial]
        for rule in rules:
            # A rule that does not fit the block's structure raises; the next, simpler one is tried.
            trial = sch.copy()
            try:
                rule(trial, block, stmt, kinds, lanes)
            except s_tir.schedule.ScheduleError:
                continue
            sch = trial
            break
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _bits(stmt) -> int:
    return stmt.writes[0].source.dtype.bits if stmt.writes else 32


def _extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _divisor(n: int | None, choices) -> int:
    for c in choices:
        if n is not None and c <= n and n % c == 0:
            return c
    return 1


def _schedule_spatial(sch, block, stmt, kinds, lanes):
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    ext = _extent(sch, inner)
    if ext is not None and ext > 4 * lanes:
        vec = _divisor(ext, (lanes, lanes // 2, lanes // 4))
        if vec > 1:
            outer_inner, inner = sch.split(inner, [None, vec])
            loops = loops[:-1] + [outer_inner]
        else:
            loops = loops[:-1] + [inner]
            inner = None
    else:
        loops = loops[:-1]
    if loops:
        sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
    if inner is not None and (ext is None or ext > 1):
        sch.vectorize(inner)


def _contiguous_in_some_read(stmt, var) -> bool:
    """True when `var` indexes the last axis of some operand (a vector load along it)."""
    for region in stmt.reads:
        last = region.region[-1].min if region.region else None
        if isinstance(last, tirx.Var) and last.same_as(var):
            return True
    return False


def _schedule_row_reduction(sch, block, stmt, kinds, lanes):
    """Parallel over outputs, the reduction serial inside."""
    loops = sch.get_loops(block)
    spatial = [l for l, k in zip(loops, kinds) if k == _DATA_PAR]
    reduce = [l for l, k in zip(loops, kinds) if k == _REDUCE]
    if spatial:
        sch.reorder(*spatial, *reduce)
        sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])


def _schedule_reduction(sch, block, stmt, kinds, lanes):
    loops = sch.get_loops(block)
    spatial = [l for l, k in zip(loops, kinds) if k == _DATA_PAR]
    reduce = [l for l, k in zip(loops, kinds) if k == _REDUCE]
    s_vars = [iv.var for iv, k in zip(stmt.iter_vars, kinds) if k == _DATA_PAR]
    if not spatial:
        return  # a full reduction to a scalar: small in these graphs
    j_ext = _extent(sch, spatial[-1])
    if not _contiguous_in_some_read(stmt, s_vars[-1]) or (j_ext or 0) < lanes // 4:
        _schedule_row_reduction(sch, block, stmt, kinds, lanes)
        return
    vec = _divisor(j_ext, (lanes, lanes // 2, lanes // 4))
    jo, ji = sch.split(spatial[-1], [None, vec])
    if len(spatial) >= 2:
        rows = _divisor(_extent(sch, spatial[-2]), (8, 4, 2))
        io, ii = sch.split(spatial[-2], [None, rows])
        outer = spatial[:-2] + [io]
    else:
        ii, outer = None, []
    tile = [ii, ji] if ii is not None else [ji]
    sch.reorder(*outer, jo, *reduce, *tile)
    par = outer if outer else [jo]
    sch.parallel(sch.fuse(*par) if len(par) > 1 else par[0])
    sch.vectorize(ji)
    if ii is not None:
        sch.unroll(ii)
    # Accumulate the tile in registers and write it back once per tile.
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, jo)
    sch.decompose_reduction(block, reduce[0])
    sch.vectorize(sch.get_loops(acc)[-1])
