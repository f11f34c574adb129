"""The work local to each chunk and the loop over chunks as one CPU kernel.

Run as two kernels (cpu_intra_chunk.py, then cpu_chunk_scan.py), the first
writes the loop's five operands for every chunk of every head (W, U, Qd, Ke
[NC, R, HV, C, X] and A: 288 MiB at (1, 4096, 32, 128) float32) and the second
reads them back: twice the layer's own inputs and output in memory traffic.
Here each head's task runs its chunks in order and, per chunk, first the
chunk-local work into buffers of its own (about 150 KiB with the state and
v_new: the core's L2) and then the chunk's step of the loop from them: the
operands never reach memory. The arithmetic is the two kernels' own (their
macros, cpu_intra_chunk.chunk_macro and cpu_chunk_scan.step_macro).

Measured at (1, 4096, 32, 128) float32, 2 threads: 120 ms in place of 160 ms
for the two kernels (GDA), 148 in place of 176 (KDA).

Parallel over heads (R x HV tasks): the chunks of a head are a serial chain,
and the chunk-local work, parallel over chunks on its own, is here done by the
head's task just before use.
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

from dnir.lowering.head_reads import head_reads

from . import cpu_chunk_scan, cpu_intra_chunk
from .kernels import ATTRS


def pairs(scan_node) -> bool:
    """True when the chunk scan `scan_node` reads exactly the six results of one intra_chunk,
    in their order: the pair this kernel runs."""
    ins = scan_node.inputs[1:]
    if any(x.op != "item" or x.attrs["index"] != i for i, x in enumerate(ins)):
        return False
    source = ins[0].inputs[0]
    if source.op != "intra_chunk" or any(x.inputs[0] is not source for x in ins):
        return False
    state = scan_node.inputs[0].shape
    R, Tp, HV = source.inputs[0].shape[:3]
    return tuple(state[:-2]) == (R, HV)


def operands(intra):
    """(q, k, v, g, beta, group, scale): the nodes the kernel reads for the intra_chunk `intra`'s
    operands. q and k repeated over the value heads of a head (reshape, broadcast_to, reshape: GQA)
    are read where they were before that copy (group: value heads per head), and q times a
    constant scalar before its scaling (scale: the constant, else None): neither is materialised."""
    q, k, v, g, beta = intra.inputs
    q, k, group, scale = head_reads(q, k)
    return q, k, v, g, beta, group, scale


def loose_inputs(graph) -> frozenset[int]:
    """The graph's inputs (by position) that only this kernel reads: straight, through reshapes (views
    of them) or through the GQA repeat and q's scaling that it reads past (copies then never made).
    It declares its operands aligned to their element only, so these are taken where the caller's
    arrays are (NumPy's lie 16 bytes off a cache line: an aligned copy of a KDA layer's q, k, v
    and g, 256 MiB at (1, 4096, 32, 128), took 30 ms of a 155 ms call)."""
    uses = graph.uses()
    absorbed: set[int] = set()          # the nodes this kernel stands for: never run on their own
    for scan in graph.topo_order():
        if scan.op != "chunk_scan" or not pairs(scan):
            continue
        intra = scan.inputs[1].inputs[0]
        items = uses[id(intra)]
        if any(u is not scan for item in items for u in uses[id(item)]):
            continue                    # intra_chunk's results are read elsewhere: its kernel runs too
        q, k, *_ = operands(intra)
        chain = _between(intra.inputs[0], q) | _between(intra.inputs[1], k)
        mine = {id(scan), id(intra)} | {id(i) for i in items} | chain
        if all(id(u) in mine for c in chain for u in uses[c]):
            absorbed |= mine
    outputs = {id(o) for o in graph.outputs}

    def only_absorbed(node) -> bool:
        return id(node) not in outputs and all(
            id(u) in absorbed or (u.op == "reshape" and only_absorbed(u)) for u in uses[id(node)])

    return frozenset(i for i, x in enumerate(graph.inputs) if uses[id(x)] and only_absorbed(x))


def _between(top, raw) -> set[int]:
    """The ids of the nodes from `top` down to `raw` (excluded), along their one non-constant input."""
    found, node = set(), top
    while node is not raw:
        found.add(id(node))
        node = next(x for x in node.inputs if x.op != "const")
    return found


def chunk_layer_kernel(R: int, NC: int, HV: int, C: int, K: int, V: int, Kg: int, dtype: str, group: int = 1,
                       scale: float | None = None):
    """(S0, q, k, v, g, beta) -> (final state S1 [R, HV, K, V], o [R, Tp, HV, V], token-major: the
    layer's own layout): S0 as the chunk scan's, v, g, beta as the intra_chunk's
    (fused_signatures.py), q and k [R, Tp, HV / group, K] as `operands` finds them."""
    Tp, heads, HQ = NC * C, R * HV, HV // group
    item = tvm.DataType(dtype).bits // 8     # operands aligned to their element only (loose_inputs)
    local = lambda n, b, h, i, c: (i, c)                 # noqa: E731 - one chunk's buffers
    chunk = cpu_intra_chunk.chunk_macro(C, K, V, Kg, dtype, local, group, scale)
    step = cpu_chunk_scan.step_macro(C, K, V, Kg, dtype, lambda n, h, i, c: (i, c),
                                     lambda n, h, i, c: (h // HV, n * C + i, h % HV, c),
                                     lambda h, i, c: (h // HV, h % HV, i, c))

    @T.prim_func(private=True, s_tir=True)
    def kernel(s0: T.handle, q: T.handle, k: T.handle, v: T.handle, g: T.handle, beta: T.handle,
               s1: T.handle, o: T.handle):
        T.func_attr(ATTRS)
        S0 = T.match_buffer(s0, (R, HV, K, V), dtype, align=item)
        Q = T.match_buffer(q, (R, Tp, HQ, K), dtype, align=item)
        Kx = T.match_buffer(k, (R, Tp, HQ, K), dtype, align=item)
        Vx = T.match_buffer(v, (R, Tp, HV, V), dtype, align=item)
        G = T.match_buffer(g, (R, Tp, HV, Kg), dtype, align=item)
        Bt = T.match_buffer(beta, (R, Tp, HV, 1), dtype, align=item)
        S = T.match_buffer(s1, (R, HV, K, V), dtype)
        O = T.match_buffer(o, (R, Tp, HV, V), dtype)
        with T.sblock("root"):
            for t in T.parallel(heads):
                W = T.alloc_buffer((C, K), dtype)
                U = T.alloc_buffer((C, V), dtype)
                Qd = T.alloc_buffer((C, K), dtype)
                A = T.alloc_buffer((C, C), dtype)
                Ke = T.alloc_buffer((C, K), dtype)
                LD = T.alloc_buffer((Kg, 1), dtype)
                vnew = T.alloc_buffer((C, V), dtype)
                for kk, j in T.grid(K, V):
                    S[t // HV, t % HV, kk, j] = S0[t // HV, t % HV, kk, j]
                for n in range(NC):
                    chunk(Q, Kx, Vx, G, Bt, W, U, Qd, A, Ke, LD, n, t // HV, t % HV)
                    step(S, W, U, Qd, A, Ke, LD, O, vnew, n, t)
    return kernel
