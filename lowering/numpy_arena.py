"""Run a graph inside one preallocated arena, following its memory plan.

Every value the graph computes is a NumPy view of the arena at its planned
offset, and every op writes its result there with `out=` (or in place, when
the plan put the result over a dying operand). The arithmetic is the NumPy
backend's, call for call, so results are identical to `numpy_backend.run`.
Runs in the declared dtypes only (the plan is sized for them).

The arena is a compute buffer kept between calls, as an inference engine
keeps its own: fresh memory costs a page fault per page on first touch (on a
virtual machine, more than the arithmetic of a large elementwise op), so one
buffer grows to the largest plan run and is reused by every later call.
`release_compute_buffer()` gives it back. A call that finds the buffer in use
(another thread) runs in a buffer of its own.
"""
from __future__ import annotations

import threading
import weakref

import numpy as np

from dnir.analysis.evaluate import matmul_operands
from dnir.analysis.memory import Block, Loc, MemoryPlan, plan as make_plan
from dnir.errors import BackendError
from dnir.graph import Graph
from dnir.ops import check_table, table_entry
from dnir.types import HALF_DTYPES, numpy_dtype

from .numpy_backend import _BINARY, _UNARY, KERNELS, missing_ops, prepare_inputs

OUT_KERNELS = {}
out_kernel = table_entry(OUT_KERNELS)


# Each kernel: fn(node, out, *operands) writes the result into `out`; `out` may be
# an operand's own bytes when the plan put it there (the OpDef's `inplace` operands).

@out_kernel("const")
def _const(node, out):
    out[...] = np.asarray(node.attrs["value"], dtype=out.dtype).reshape(node.shape)


@out_kernel("full")
def _full(node, out):
    out[...] = node.attrs["value"]


@out_kernel("eye")
def _eye(node, out):
    out[...] = 0
    np.fill_diagonal(out, 1)


@out_kernel("neg", "exp", "log", "sqrt")
def _ufunc1(node, out, x):
    {"neg": np.negative, "exp": np.exp, "log": np.log, "sqrt": np.sqrt}[node.op](x, out=out)


@out_kernel("sigmoid", "softplus", "rsqrt")
def _composite(node, out, x):
    # The reference's expressions (they round once at the end, which matters for bfloat16,
    # whose arithmetic NumPy does in float32); their temporaries are the kernel's own.
    np.copyto(out, _UNARY[node.op](x), casting="unsafe")


@out_kernel(*_BINARY)
def _binary(node, out, a, b):
    _BINARY[node.op](a, b, out=out)


@out_kernel("cast")
def _cast(node, out, x):
    np.copyto(out, x, casting="unsafe")


@out_kernel("clamp")
def _clamp(node, out, x):
    np.clip(x, node.attrs["min"], node.attrs["max"], out=out)


@out_kernel("where")
def _where(node, out, c, a, b, in_place=None):
    if in_place == 1:                      # out is a: fill where c is false
        np.copyto(out, b, where=np.logical_not(c))
        return
    if in_place != 2:
        np.copyto(out, b)
    np.copyto(out, a, where=c)


@out_kernel("tril", "triu")
def _tri(node, out, x):
    np.copyto(out, x)
    rows, cols = node.shape[-2:]
    k = node.attrs["k"]
    drop = (~np.tri(rows, cols, k, dtype=bool)) if node.op == "tril" else np.tri(rows, cols, k - 1, dtype=bool)
    np.copyto(out, 0, where=drop)


@out_kernel("reshape", "slice")
def _copy_view(node, out, x):   # only reached when the plan copies: a view would not be row-contiguous
    if node.op == "slice":
        np.copyto(out, x[tuple(slice(a, b) for a, b in zip(node.attrs["starts"], node.attrs["stops"]))])
    else:                       # a strided x: copied into out seen in x's shape (no temporary)
        np.copyto(out.reshape(x.shape), x)


@out_kernel("permute")
def _permute(node, out, x):
    np.copyto(out, np.transpose(x, node.attrs["axes"]))


@out_kernel("broadcast_to", "cont")
def _copy(node, out, x):
    np.copyto(out, x)


@out_kernel("pad")
def _pad(node, out, x):
    out[...] = node.attrs["value"]
    out[tuple(slice(a, a + d) for (a, _), d in zip(node.attrs["pads"], x.shape))] = x


@out_kernel("concat")
def _concat(node, out, *xs):
    np.concatenate(xs, axis=node.attrs["axis"], out=out)


@out_kernel("sum")
def _sum(node, out, x):
    np.sum(x, axis=tuple(node.attrs["axes"]), keepdims=node.attrs["keepdims"], dtype=out.dtype, out=out)


SHORT_SCAN = 64    # a chunk: running sums this short go one whole slice at a time


@out_kernel("cumsum")
def _cumsum(node, out, x):
    """np.cumsum walks one element at a time (~50 ns each along an inner axis); along a short axis
    the same sums in the same order, out[i] = out[i - 1] + x[i], as one vectorised add per slice
    are several times faster (the segment sums [.., C, C, K] and the cumulative gates)."""
    axis = node.attrs["axis"] % node.rank
    n = node.shape[axis]
    if n > SHORT_SCAN:
        np.cumsum(x, axis=axis, dtype=out.dtype, out=out)
        return
    x, out = np.moveaxis(x, axis, 0), np.moveaxis(out, axis, 0)
    out[0] = x[0]
    for i in range(1, n):
        np.add(out[i - 1], x[i], out=out[i])


@out_kernel("matmul")
def _matmul(node, out, a, b):
    np.matmul(*matmul_operands(node, a, b), out=out)


@out_kernel("solve_tri")
def _solve_tri(node, out, a, b):
    """The reference's substitution, row by row into `out` (only finished rows are read)."""
    a = np.broadcast_to(a, out.shape[:-2] + a.shape[-2:])
    b = np.broadcast_to(b, out.shape)
    n = a.shape[-1]
    rows = range(n) if node.attrs["lower"] else range(n - 1, -1, -1)
    for i in rows:
        done = slice(0, i) if node.attrs["lower"] else slice(i + 1, n)
        r = b[..., i, :] - np.matmul(a[..., i:i + 1, done], out[..., done, :])[..., 0, :]
        out[..., i, :] = r if node.attrs["unit_diagonal"] else r / a[..., i, i, None]


@out_kernel("set", "acc")
def _region(node, out, dst, src):
    np.copyto(out, dst)                    # a no-op when planned in place
    region = tuple(slice(o, o + s) for o, s in zip(node.attrs["offsets"], src.shape))
    if node.op == "set":
        out[region] = src
    else:
        out[region] += src


# Reductions of half values add in float32 and round once (dnir.types.accumulation_dtype): the
# reference kernel's float32 temporaries, then one copy into the block.
HALF_IN_FLOAT32 = frozenset({"sum", "cumsum", "matmul", "solve_tri"})


# input, item: bytes already in place; scan: run by _scan; a fused op runs its NumPy
# reference kernel out of place, its results copied to their planned blocks.
check_table("the arena executor's OUT_KERNELS (lowering/numpy_arena.py)",
            set(OUT_KERNELS) | {"input", "item", "scan"}, fused="its reference kernel (in _execute)")


def _bytes(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1).view(np.uint8)


class _Arena:
    def __init__(self, data: np.ndarray):
        self.data = data
        self.high_water = 0        # highest arena byte any value occupied

    def array(self, loc: Loc, t, base: int, regions: dict, strides: tuple | None = None) -> np.ndarray:
        """The value of type t at loc: dense, or a strided view (element strides) of the bytes there."""
        if isinstance(loc.base, Block):
            start = base + loc.base.offset + loc.offset
            self.high_water = max(self.high_water, start + t.nbytes)
            raw = self.data[start:]
        else:
            raw = regions[loc.base][loc.offset:]
        if strides is None:
            return raw[:t.nbytes].view(numpy_dtype(t.dtype)).reshape(t.shape)
        itemsize = t.itemsize
        return np.lib.stride_tricks.as_strided(raw[:itemsize].view(numpy_dtype(t.dtype)), t.shape,
                                               tuple(s * itemsize for s in strides))


def _execute(mp: MemoryPlan, arena: _Arena, base: int, regions: dict) -> list[np.ndarray]:
    """Run one graph of the plan: its arena starts at byte `base`; `regions` maps the
    external regions (inputs, or a scan's carries/slices) to their bytes."""
    values: dict[int, np.ndarray] = {}
    for node in mp.order:
        if node.op == "scan":
            _scan(mp, node, [values[id(i)] for i in node.inputs], arena, base, regions)
            continue
        if isinstance(node.type, tuple):    # a fused op: the reference kernel, out of place
            results = KERNELS[node.op](node, tuple(numpy_dtype(t.dtype) for t in node.type),
                                       *[values[id(i)] for i in node.inputs])
            for loc, t, value in zip(mp.results[id(node)], node.type, results):
                np.copyto(arena.array(loc, t, base, regions), value)
            continue
        loc = mp.locs[id(node)]
        out = arena.array(loc, node.type, base, regions, mp.views.get(id(node)))
        values[id(node)] = out
        if node.op in ("input", "item") or id(node) in mp.views:
            continue                        # the bytes are already there
        operands = [values[id(i)] for i in node.inputs]
        if node.op == "where":
            in_place = next((i for i in (1, 2) if mp.locs[id(node.inputs[i])] == loc), None)
            _where(node, out, *operands, in_place=in_place)
        elif node.op in HALF_IN_FLOAT32 and node.dtype in HALF_DTYPES:
            np.copyto(out, KERNELS[node.op](node, out.dtype, *operands))    # the reference's float32 sums
        else:
            OUT_KERNELS[node.op](node, out, *operands)
    return [values[id(n)] for n in mp.graph.outputs]


def _scan(mp: MemoryPlan, node, operands, arena: _Arena, base: int, regions: dict):
    sp = mp.scans[id(node)]
    body = sp.body
    nc, nx, length = node.attrs["num_carry"], node.attrs["num_xs"], node.attrs["length"]
    carries = [arena.array(loc, t, base, regions) for loc, t in zip(sp.carries, node.type[:nc])]
    for k, (carry, init) in enumerate(zip(carries, operands[:nc])):
        if sp.carries[k] != mp.locs[id(node.inputs[k])]:
            np.copyto(carry, init)
    ys = [None if loc is None else arena.array(loc, t, base, regions)
          for loc, t in zip(sp.ys, node.type[nc:])]
    inner = {f"carry:{k}": _bytes(c) for k, c in enumerate(carries)}
    inner.update({f"const:{i}": _bytes(c) for i, c in enumerate(operands[nc + nx:])})
    body_base = base + sp.arena.offset
    arena.high_water = max(arena.high_water, body_base + sp.arena.nbytes)
    stages = {k: arena.array(Loc(block), node.type[k], body_base, {}) for k, block in body.stages.items()}
    for step in range(length):
        inner.update({f"xs:{i}": _bytes(x[step]) for i, x in enumerate(operands[nc:nc + nx])})
        inner.update({f"ys:{j}": _bytes(y[step]) for j, y in enumerate(ys) if y is not None})
        outs = _execute(body, arena, body_base, inner)
        # End of step: stacked outputs first (they may read a carry), then carries.
        for j, y in enumerate(ys):
            if y is not None and body.locs[id(body.graph.outputs[nc + j])] != Loc(f"ys:{j}"):
                np.copyto(y[step], outs[nc + j])
        for k, stage in stages.items():
            np.copyto(stage, outs[k])
        for k in range(nc):
            if body.locs[id(body.graph.outputs[k])] != Loc(f"carry:{k}"):
                np.copyto(carries[k], stages.get(k, outs[k]))


_LOCK = threading.Lock()
_spare: np.ndarray | None = None    # the compute buffer while no call uses it
_PLANS: "weakref.WeakKeyDictionary[Graph, MemoryPlan]" = weakref.WeakKeyDictionary()


def _take_buffer(nbytes: int) -> np.ndarray:
    global _spare
    with _LOCK:
        spare, _spare = _spare, None
    if spare is not None and spare.nbytes >= nbytes:
        return spare
    del spare                          # too small: let it go before growing
    return np.empty(nbytes, dtype=np.uint8)


def _give_back(buffer: np.ndarray):
    global _spare
    with _LOCK:
        if _spare is None or _spare.nbytes < buffer.nbytes:
            _spare = buffer


def release_compute_buffer() -> int:
    """Free the compute buffer kept between calls; returns its size in bytes (0 if none)."""
    global _spare
    with _LOCK:
        freed, _spare = (0 if _spare is None else _spare.nbytes), None
    return freed


def graph_plan(graph: Graph) -> MemoryPlan:
    """The memory plan of `graph`, made once per graph object."""
    mp = _PLANS.get(graph)
    if mp is None:
        mp = _PLANS[graph] = make_plan(graph)
    return mp


def run_planned(graph: Graph, inputs, plan: MemoryPlan | None = None) -> tuple[list[np.ndarray], int]:
    """Execute `graph` inside the compute buffer, laid out by `plan` (the graph's own,
    made once, if not given). Returns (outputs as fresh arrays, the arena bytes actually
    occupied)."""
    missing = missing_ops(graph) + sorted({n.op for n in _all_nodes(graph) if not isinstance(n.type, tuple)}
                                          - set(OUT_KERNELS) - {"input", "item"})
    if missing:
        raise BackendError(f"numpy arena executor lacks op(s): {', '.join(sorted(set(missing)))}")
    mp = graph_plan(graph) if plan is None else plan
    if mp.graph is not graph:
        raise BackendError("the memory plan was made for another graph; plan this one with "
                           "dnir.analysis.memory.plan(graph)")
    args = [np.ascontiguousarray(a) for a in prepare_inputs(graph, inputs)]
    regions = {f"input:{n.attrs['name']}": _bytes(a) for n, a in zip(graph.inputs, args)}
    arena = _Arena(_take_buffer(mp.peak_bytes))
    try:
        with np.errstate(all="ignore"):     # inf/nan follow IEEE, as in the reference backend
            outs = [np.array(o, copy=True) for o in _execute(mp, arena, 0, regions)]
    finally:
        _give_back(arena.data)
    return outs, arena.high_water


def _all_nodes(graph: Graph):
    for node in graph.topo_order():
        yield node
        if node.op == "scan":
            yield from _all_nodes(node.attrs["body"])
