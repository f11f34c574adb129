"""One decode step of the delta rule (the fused op `token_step`, dnir/fused.py) as one CPU kernel.

Op by op on the CPU, a decode step reads the state [K, V] of a head three
times (two row-vector products and the update) and writes it once, each pass
a kernel of its own and a parallel region of its own. This kernel computes the
step's new state and output at once:

    pred = (k a) S,   o1 = (q a) S
    u    = (v - pred) beta,   o = o1 + u (q . k)
    S'   = S a + k^T u

Heads (batch x value heads) are parallel. A head's state is taken in tiles of
up to COLUMNS value columns (the whole 128 x 128 state of a head: 64 KiB, in
the L2 cache): the first pass over its K rows accumulates pred and o1 for the
tile's columns in vector registers, the second reads the same rows again from
the cache and writes the new state. So the state comes from memory once and
goes back once, as on the GPU (token_step.py). The value columns are the
vector lanes (the state's rows are contiguous along V); the key-side scalars
are broadcast. At B = 64 (Qwen3-Next heads, one core) whole heads took
9.6 ms, tiles of 64 columns 10.8 and of 16 columns 11.8: the more
accumulators in flight, the better the loads overlap. The step's vectors may
be bf16 or fp16 as a layer's inputs hold them (llvm's Target.narrow_operands;
passes/fold_widening_casts.py): each is widened as it is loaded.

A third output, CHK in O's shape, holds the column sums of the new state,
added up as its rows are written: the functional API checks that the state it
returns is finite from these (a sum of finite numbers is finite unless it
overflows, and an inf or a NaN entry makes it inf or NaN) instead of reading
the whole state again (at B = 64, 128 MiB: 8 ms of NumPy on one core).
`checked_outputs` says which of a graph's outputs have one.

decode_step's kernel, which reads the layer's raw q, k, g and beta, goes further:
its third output is a REPORT, all the checks of a call in three numbers
(a call at B = 1 is ~70 us of kernel, and each NumPy pass over the outputs and
inputs after it cost 5-18 us, the kernel having just pushed them out of the
cache). `step_report` says when a graph's report stands for all of its checks.
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from dnir.fused import DECODE_ROLES

from .fused_signatures import decode_step_function, token_step_function
from .kernels import unravel_index

COLUMNS = 128   # value columns per tile: 8 AVX-512 vectors of float32 per accumulator, 16 in all
# The state's buffer is declared 4-byte aligned (its vector loads are unaligned ones, as fast on
# AVX-512): a decode layer's initial state, a graph input read only here, needs no aligned copy.
# decode_step's operands are all the layer's inputs: each declared aligned to its element only, so
# that a call takes the caller's small q, k, v, g, beta where they are too (no copies per call).
UNALIGNED_OPERANDS = {"token_step": (0,), "decode_step": range(6)}


# decode_step's report, over all heads: the sum of each head's |sum of o, the new state and g|
# (finite when every one of them is: NaN and +-inf stay so through sums, an inf times 0 is NaN),
# the largest gate (<= 0 for a decaying state) and the largest beta |k|^2 (the step
# I - beta k k^T contracts while it is < 2)
REPORT = ("sum", "gate_max", "stiffness")


def lone_step(graph):
    """(step, results) when the graph is one decode_step alone (its other nodes are its inputs,
    reshapes, views, and its results), results giving per graph output (which of the step's
    results it is, the output's shape); None for any other graph."""
    work = [n for n in graph.topo_order() if n.op not in ("input", "item", "reshape")]
    if len(work) != 1 or work[0].op != "decode_step":
        return None
    step, results = work[0], []
    for out in graph.outputs:
        node = out
        while node.op == "reshape":
            node = node.inputs[0]
        if node.op != "item" or node.inputs[0] is not step:
            return None
        results.append((node.attrs["index"], out.shape))
    return step, results


def step_report(graph) -> int | None:
    """The position of the output whose check is decode_step's REPORT when that report covers the
    whole call: the graph is that step alone (lone_step), reading the graph's own g, k and beta (so
    the gate and stiffness columns are the inputs' ones), and returns its new state. None otherwise."""
    found, checked = lone_step(graph), checked_outputs(graph)
    if found is None or not checked:
        return None
    roles = dict(zip(DECODE_ROLES, found[0].inputs))
    if any(roles[r].op != "input" or roles[r].attrs["name"] != r for r in ("g", "k", "beta")):
        return None
    return checked[0]


def checked_outputs(graph) -> tuple[int, ...]:
    """The positions of the graph's outputs that are a decode step's new state: on llvm the module's
    main returns each one's column sums after the graph's outputs, in this order."""
    return tuple(i for i, out in enumerate(graph.outputs)
                 if out.op == "item" and out.attrs["index"] == 0
                 and out.inputs[0].op in ("token_step", "decode_step"))


def columns(V: int) -> int:
    """The tile width: the largest power of two <= COLUMNS dividing V (1 when V is odd)."""
    return max(c for c in (COLUMNS, 64, 32, 16, 8, 4, 2, 1) if V % c == 0)


def rejects(node, target) -> str | None:
    """None when this kernel runs the decode step `node` on `target`, else why not."""
    dtype = node.inputs[0].dtype
    if target.dtypes is not None and dtype not in target.dtypes:
        return f"the kernel is written for {', '.join(sorted(target.dtypes))}, not {dtype}"
    return None


def token_step_kernel(batch: tuple, shapes: dict, K: int, V: int, Kg: int, dtype: str, narrow: dict | None = None):
    """S1 [*batch, K, V], O [*batch, V] and S1's column sums CHK [*batch, V] from the state and
    the vectors, each in its own shape `shapes[name]` (batch axes first, as the GPU kernel takes
    them). narrow: role -> dtype of a bf16/fp16 operand, widened to `dtype` as it is loaded."""
    heads = math.prod(batch)
    vt = columns(V)
    tiles = V // vt
    per_key = 1 if Kg == K else 0
    nb = len(batch)

    def at(name, h, e):                    # element e of head h in operand `name`
        return unravel_index(h, batch) + unravel_index(e, shapes[name][nb:])

    def load(buf, name, h, e):             # that element in `dtype` (a half operand widened here)
        value = buf[at(name, h, e)]
        return T.Cast(dtype, value) if narrow and name in narrow else value

    def state(h, kk, c):                   # row kk, column c of head h's state
        return unravel_index(h, batch) + (kk, c)

    @T.macro
    def body(S0, D, Kc, Kr, Qr, Vv, B, QK, S1, O, CHK):
        for h in T.parallel(heads):
            for t in range(tiles):
                # "global" scope: a small constant allocation on the stack (LLVM keeps it in
                # registers); "local" would be a workspace allocation per tile
                pred = T.alloc_buffer((vt,), dtype)
                out = T.alloc_buffer((vt,), dtype)
                total = T.alloc_buffer((vt,), dtype)
                for j in T.vectorized(vt):
                    pred[j] = T.cast(0, dtype)
                    out[j] = T.cast(0, dtype)
                for kk in range(K):
                    for j in T.vectorized(vt):
                        pred[j] = pred[j] + load(Kr, "k_row", h, kk) * S0[state(h, kk, t * vt + j)]
                        out[j] = out[j] + load(Qr, "q_row", h, kk) * S0[state(h, kk, t * vt + j)]
                for j in T.vectorized(vt):     # pred becomes u = (v - pred) beta
                    pred[j] = (load(Vv, "v", h, t * vt + j) - pred[j]) * load(B, "beta", h, 0)
                    O[at("o", h, t * vt + j)] = out[j] + pred[j] * load(QK, "qk", h, 0)
                    total[j] = T.cast(0, dtype)
                for kk in range(K):
                    for j in T.vectorized(vt):
                        S1[state(h, kk, t * vt + j)] = (S0[state(h, kk, t * vt + j)]
                                                        * load(D, "decay", h, kk * per_key)
                                                        + load(Kc, "k_col", h, kk) * pred[j])
                        total[j] = total[j] + S1[state(h, kk, t * vt + j)]
                for j in T.vectorized(vt):
                    CHK[at("o", h, t * vt + j)] = total[j]
    return token_step_function(shapes, dtype, body, state_align=4, narrow=narrow, checksum=True)


def decode_step_kernel(batch: tuple, shapes: dict, K: int, V: int, Kg: int, group: int, scale: float, dtype: str,
                       narrow: dict | None = None):
    """token_step_kernel's outputs from the layer's raw vectors (the op decode_step, dnir/fused.py):
    each head first makes its k_col, k_row, q_row, decays and q . k from q, k, g (the scale, the gate's
    exp, the GQA repeat: value head j reads q/k head j // group) into buffers of its own, then runs
    token_step_kernel's two passes over the state."""
    heads, HV = math.prod(batch), batch[-1]
    vt = columns(V)
    tiles = V // vt
    per_key = 1 if Kg == K else 0

    def load(buf, name, e):                # flat element e of operand `name`, in `dtype`
        value = buf[unravel_index(e, shapes[name])]
        return T.Cast(dtype, value) if narrow and name in narrow else value

    def qk_at(h, kk):                      # flat index of q/k element kk of value head h's q/k head
        return (h // HV * (HV // group) + h % HV // group) * K + kk

    def state(h, kk, c):
        return unravel_index(h, batch) + (kk, c)

    def out(h, c):
        return unravel_index(h, batch) + (c,)

    @T.macro
    def body(S0, Q, Kx, Vv, G, B, S1, O, REP):
        per_head = T.alloc_buffer((heads, 3), dtype)
        for h in T.parallel(heads):
            kc = T.alloc_buffer((K,), dtype)
            kr = T.alloc_buffer((K,), dtype)
            qr = T.alloc_buffer((K,), dtype)
            dec = T.alloc_buffer((Kg,), dtype)
            # per head: q . k, k . k, the sum of everything the step reads and writes, the largest gate
            acc = T.alloc_buffer((4,), dtype)
            acc[0] = T.cast(0, dtype)
            acc[1] = T.cast(0, dtype)
            acc[2] = T.cast(0, dtype)
            acc[3] = T.min_value(dtype)
            for c in range(Kg):
                acc[2] = acc[2] + load(G, "g", h * Kg + c)
                acc[3] = T.max(acc[3], load(G, "g", h * Kg + c))
                dec[c] = T.exp(load(G, "g", h * Kg + c))
            for kk in T.vectorized(K):      # qr holds the scaled q until q . k is added up
                kc[kk] = load(Kx, "k", qk_at(h, kk))
                kr[kk] = kc[kk] * dec[kk * per_key]
                qr[kk] = load(Q, "q", qk_at(h, kk)) * T.cast(scale, dtype)
            for kk in range(K):
                acc[0] = acc[0] + qr[kk] * kc[kk]
                acc[1] = acc[1] + kc[kk] * kc[kk]
            for kk in T.vectorized(K):
                qr[kk] = qr[kk] * dec[kk * per_key]
            for t in range(tiles):
                pred = T.alloc_buffer((vt,), dtype)
                o1 = T.alloc_buffer((vt,), dtype)
                total = T.alloc_buffer((vt,), dtype)
                for j in T.vectorized(vt):
                    pred[j] = T.cast(0, dtype)
                    o1[j] = T.cast(0, dtype)
                for kk in range(K):
                    for j in T.vectorized(vt):
                        pred[j] = pred[j] + kr[kk] * S0[state(h, kk, t * vt + j)]
                        o1[j] = o1[j] + qr[kk] * S0[state(h, kk, t * vt + j)]
                for j in T.vectorized(vt):     # pred becomes u = (v - pred) beta
                    pred[j] = (load(Vv, "v", h * V + t * vt + j) - pred[j]) * load(B, "beta", h)
                    O[out(h, t * vt + j)] = o1[j] + pred[j] * acc[0]
                    total[j] = O[out(h, t * vt + j)]
                for kk in range(K):
                    for j in T.vectorized(vt):
                        S1[state(h, kk, t * vt + j)] = (S0[state(h, kk, t * vt + j)] * dec[kk * per_key]
                                                        + kc[kk] * pred[j])
                        total[j] = total[j] + S1[state(h, kk, t * vt + j)]
                for j in range(vt):
                    acc[2] = acc[2] + total[j]
            per_head[h, 0] = T.fabs(acc[2])
            per_head[h, 1] = acc[3]
            per_head[h, 2] = load(B, "beta", h) * acc[1]
        # over the heads: the sums add up (T.max may drop a NaN; a sum keeps it), the rest is a max
        REP[0] = per_head[0, 0]
        REP[1] = per_head[0, 1]
        REP[2] = per_head[0, 2]
        for h in range(1, heads):
            REP[0] = REP[0] + per_head[h, 0]
            REP[1] = T.max(REP[1], per_head[h, 1])
            REP[2] = T.max(REP[2], per_head[h, 2])
    return decode_step_function(shapes, dtype, body, loose=True, narrow=narrow, report=len(REPORT))
