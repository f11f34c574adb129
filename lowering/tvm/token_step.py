"""One decode step of the delta rule as one GPU kernel.

Lowered op by op, a decode step reads the state three times (two
matrix-vector products and the update) and writes it once. This module
recognises the step as the O2 graph writes it,

    pred = (k a) S,   o1 = (q a) S                (row vectors times the state)
    u    = (v - pred) beta
    o    = o1 + u (q . k)
    S'   = S a + k^T u                           (a: the decay, per head or per key row)

(operands of adds and products in any order, reshapes between the vectors' shapes),
and computes S' and o in one kernel that reads the state once and writes it once:
a thread owns one state column, keeps it in registers, reduces it against both
row vectors, then writes the updated column.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tvm.script import tirx as T

from dnir.graph import Graph, Node

from .kernels import OPAQUE, unravel_index
from .match import commuted, is_matmul, through_reshapes

OPERANDS = ("state", "decay", "k_col", "k_row", "q_row", "v", "beta", "qk")


@dataclass(frozen=True)
class TokenStep:
    new_state: Node
    o: Node             # o1 + u (q . k), [.., V]
    operands: dict      # name -> node
    batch: tuple
    K: int
    V: int
    Kg: int


def _row_times(x: Node, state: Node):
    """The row vector r of x = reshape(r [.., 1, K] @ state), else None."""
    mm = through_reshapes(x)
    if is_matmul(mm) and mm.inputs[1] is state and mm.inputs[0].shape[-2] == 1:
        return mm.inputs[0]
    return None


def match_token_step(new_state: Node, outputs) -> TokenStep | None:
    """The decode step whose new state is `new_state`, with its output among `outputs`."""
    if new_state.rank < 3:
        return None
    *batch, K, V = new_state.shape
    decays = lambda m: commuted(m, "mul", lambda s, a: s.shape == new_state.shape and a.shape[-1] == 1)  # noqa: E731
    outer = lambda m: commuted(m, "mul", lambda u, k: u.shape[-2:] == (1, V) and k.shape[-2:] == (K, 1))  # noqa: E731
    update = commuted(new_state, "add", lambda a, b: decays(a) is not None and outer(b) is not None)
    if update is None:
        return None
    (state, decay), (u_row, k_col) = decays(update[0]), outer(update[1])
    u = through_reshapes(u_row)
    scaled = commuted(u, "mul", lambda d, b: d.op == "sub" and b.shape[-1] == 1)
    if scaled is None:
        return None
    (diff, beta) = scaled
    v, pred = diff.inputs
    k_row = _row_times(pred, state)
    if k_row is None:
        return None
    correction = lambda c: commuted(c, "mul", lambda uu, qk: uu is u and qk.shape[-1] == 1)  # noqa: E731
    for out in outputs:
        o_node = through_reshapes(out)
        found = commuted(o_node, "add", lambda o1, c: _row_times(o1, state) is not None and correction(c) is not None)
        if found is not None:
            o1, corr = found
            qk = correction(corr)[1]
            break
    else:
        return None
    ops = dict(state=state, decay=decay, k_col=k_col, k_row=k_row, q_row=_row_times(o1, state), v=v, beta=beta,
               qk=qk)
    Kg = decay.shape[-2]
    sizes = dict(state=K * V, decay=Kg, k_col=K, k_row=K, q_row=K, v=V, beta=1, qk=1)
    heads = math.prod(batch)
    if Kg not in (1, K) or any(math.prod(ops[n].shape) != heads * sizes[n] for n in OPERANDS):
        return None
    if any(x.dtype != "f32" for x in ops.values()) or V % 32 or o_node.shape[-1] != V:
        return None
    if any(x.shape[:len(batch)] != tuple(batch) for x in (*ops.values(), o_node)):
        return None         # the kernel indexes every operand by head first
    return TokenStep(new_state, o_node, ops, tuple(batch), K, V, Kg)


def match_graph(graph: Graph) -> list[TokenStep]:
    found = []
    for out in graph.outputs:
        step = match_token_step(out, graph.outputs)
        if step is not None:
            found.append(step)
    return found


def token_step_kernel(batch: tuple, shapes: dict, K: int, V: int, Kg: int, dtype: str):
    """S1 [*batch, K, V] and O [*batch, V] from the state and the vectors, each in its own
    shape `shapes[name]` (batch axes first: nothing is reshaped around the call)."""
    heads = math.prod(batch)
    threads = min(V, 128)
    tiles = V // threads
    per_key = 1 if Kg == K else 0
    nb = len(batch)
    attrs = {"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE}

    def at(name, bx, e):                   # element e of the block's head in operand `name`
        return unravel_index(bx // tiles, batch) + unravel_index(e, shapes[name][nb:])

    @T.prim_func(private=True, s_tir=True)
    def kernel(s0: T.handle, decay: T.handle, kc: T.handle, kr: T.handle, qr: T.handle, v: T.handle,
               beta: T.handle, qk: T.handle, s1: T.handle, o: T.handle):
        T.func_attr(attrs)
        S0 = T.match_buffer(s0, shapes["state"], dtype)
        D = T.match_buffer(decay, shapes["decay"], dtype)
        Kc = T.match_buffer(kc, shapes["k_col"], dtype)
        Kr = T.match_buffer(kr, shapes["k_row"], dtype)
        Qr = T.match_buffer(qr, shapes["q_row"], dtype)
        Vv = T.match_buffer(v, shapes["v"], dtype)
        B = T.match_buffer(beta, shapes["beta"], dtype)
        QK = T.match_buffer(qk, shapes["qk"], dtype)
        S1 = T.match_buffer(s1, shapes["state"], dtype)
        O = T.match_buffer(o, shapes["o"], dtype)
        with T.sblock("root"):
            for bx in T.thread_binding(heads * tiles, thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    col = T.alloc_local((K,), dtype)
                    acc = T.alloc_local((2,), dtype)
                    acc[0] = T.float32(0)
                    acc[1] = T.float32(0)
                    for kk in T.unroll(K):
                        col[kk] = S0[at("state", bx, kk * V + bx % tiles * threads + tx)]
                        acc[0] = acc[0] + Kr[at("k_row", bx, kk)] * col[kk]
                        acc[1] = acc[1] + Qr[at("q_row", bx, kk)] * col[kk]
                    # acc[0] becomes u = (v - pred) beta
                    acc[0] = (Vv[at("v", bx, bx % tiles * threads + tx)] - acc[0]) * B[at("beta", bx, 0)]
                    O[at("o", bx, bx % tiles * threads + tx)] = acc[1] + acc[0] * QK[at("qk", bx, 0)]
                    for kk in T.unroll(K):
                        S1[at("state", bx, kk * V + bx % tiles * threads + tx)] = (
                            col[kk] * D[at("decay", bx, kk * per_key)] + Kc[at("k_col", bx, kk)] * acc[0])
    return kernel
