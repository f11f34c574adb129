"""One decode step of the delta rule (the fused op `token_step`, dnir/fused.py) as one GPU kernel.

Lowered op by op, a decode step reads the state three times (two
matrix-vector products and the update) and writes it once. The GPU pipelines
recognise the step as the O2 graph writes it (passes/fuse_delta_steps.py),

    pred = (k a) S,   o1 = (q a) S                (row vectors times the state)
    u    = (v - pred) beta
    o    = o1 + u (q . k)
    S'   = S a + k^T u                           (a: the decay, per head or per key row)

and this kernel computes S' and o at once, reading the state once and writing
it once: a thread owns one state column, keeps it in registers, reduces it
against both row vectors, then writes the updated column (decode_step_kernel,
the GPU targets' step where K is even: two threads a column, half its rows each). Every operand keeps
its own shape (the graph's reshapes cost nothing); the kernel reads it flat.
The vectors may be bf16 or fp16 as a layer's inputs hold them (the GPU targets'
Target.narrow_operands; passes/fold_widening_casts.py): each is widened as it
is loaded.

Each dot product over K runs as PARTIALS interleaved chains, added together at
the end: one float32 chain of 128 products errs twice as much as a tree sum
(o's rms error against float64 2.2e-7, against 1.0e-7 for flash-linear-attention's
block sums; eight chains 1.2e-7), and the chains are independent for the scheduler.
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from dnir.fused import DECODE_ROLES, STEP_ROLES, step_sizes
from dnir.fused import decode_sizes as fused_decode_sizes
from dnir.graph import Node

from .fused_signatures import decode_step_function, token_step_function
from .kernels import unravel_index

PARTIALS = 8                               # chains per dot product over K (the module's docstring)


@T.macro
def add_partials(acc, sums: T.int32):
    """acc[c * PARTIALS] = the sum of chains c * PARTIALS .. c * PARTIALS + PARTIALS - 1, for each of the
    `sums` dot products c."""
    for c in T.unroll(sums):
        for p in T.unroll(1, PARTIALS):
            acc[c * PARTIALS] = acc[c * PARTIALS] + acc[c * PARTIALS + p]


def sizes(node: Node):
    """(batch, K, V, Kg) of a token_step node."""
    return step_sizes([i.type for i in node.inputs])


def rejects(node: Node, target) -> str | None:
    """None when this kernel runs the decode step `node` (token_step or decode_step) on `target`, else why not."""
    V = node.inputs[0].shape[-1]
    dtype = node.inputs[0].dtype
    if target.dtypes is not None and dtype not in target.dtypes:
        return f"the kernel is written for {', '.join(sorted(target.dtypes))}, not {dtype}"
    if V % 32:
        return f"V={V} is not a multiple of 32 (one thread per state column, whole warps)"
    K = node.inputs[0].shape[-2]
    if node.op == "decode_step" and K % 2:
        return f"K={K} is odd (decode_step's kernel splits each state column's rows in two halves)"
    return None


def operand_shapes(node: Node) -> dict:
    """The operands' shapes by role, and the output's ("o"), as the kernel indexes them."""
    found = {role: x.shape for role, x in zip(STEP_ROLES, node.inputs)}
    found["o"] = node.type[1].shape
    return found


def token_step_kernel(batch: tuple, shapes: dict, K: int, V: int, Kg: int, dtype: str, narrow: dict | None = None):
    """S1 [*batch, K, V] and O [*batch, V] from the state and the vectors, each in its own
    shape `shapes[name]` (batch axes first: nothing is reshaped around the call). narrow: role ->
    dtype of a bf16/fp16 operand, widened to `dtype` as it is loaded."""
    heads = math.prod(batch)
    threads = min(V, 128)
    tiles = V // threads
    per_key = 1 if Kg == K else 0
    nb = len(batch)

    def at(name, bx, e):                   # element e of the block's head in operand `name`
        return unravel_index(bx // tiles, batch) + unravel_index(e, shapes[name][nb:])

    def load(buf, name, bx, e):            # that element in `dtype` (a half operand widened here)
        value = buf[at(name, bx, e)]
        return T.Cast(dtype, value) if narrow and name in narrow else value

    @T.macro
    def body(S0, D, Kc, Kr, Qr, Vv, B, QK, S1, O):
        for bx in T.thread_binding(heads * tiles, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                col = T.alloc_local((K,), dtype)
                acc = T.alloc_local((2 * PARTIALS,), dtype)      # chains of k_row . col, then q_row . col
                for p in T.unroll(2 * PARTIALS):
                    acc[p] = T.cast(0, dtype)
                for kk in T.unroll(K):
                    col[kk] = S0[at("state", bx, kk * V + bx % tiles * threads + tx)]
                    acc[kk % PARTIALS] = acc[kk % PARTIALS] + load(Kr, "k_row", bx, kk) * col[kk]
                    acc[PARTIALS + kk % PARTIALS] = acc[PARTIALS + kk % PARTIALS] + load(Qr, "q_row", bx, kk) * col[kk]
                add_partials(acc, 2)
                # acc[0] becomes u = (v - pred) beta
                acc[0] = (load(Vv, "v", bx, bx % tiles * threads + tx) - acc[0]) * load(B, "beta", bx, 0)
                O[at("o", bx, bx % tiles * threads + tx)] = acc[PARTIALS] + acc[0] * load(QK, "qk", bx, 0)
                for kk in T.unroll(K):
                    S1[at("state", bx, kk * V + bx % tiles * threads + tx)] = (
                        col[kk] * load(D, "decay", bx, kk * per_key) + load(Kc, "k_col", bx, kk) * acc[0])
    return token_step_function(shapes, dtype, body, narrow=narrow)


def decode_sizes(node: Node):
    """(batch, K, V, Kg, group) of a decode_step node."""
    return fused_decode_sizes([i.type for i in node.inputs])


def decode_shapes(node: Node) -> dict:
    """decode_step's operands' shapes by role, and the output's ("o")."""
    found = {role: x.shape for role, x in zip(DECODE_ROLES, node.inputs)}
    found["o"] = node.type[1].shape
    return found


def decode_step_kernel(batch: tuple, shapes: dict, K: int, V: int, Kg: int, group: int, scale: float, dtype: str,
                       narrow: dict | None = None):
    """token_step_kernel's outputs from the layer's raw vectors (the op decode_step, dnir/fused.py): a
    block first makes its head's k_col, k_row, q_row and decays from q, k, g (the scale, the gate's
    exp, the GQA repeat: value head j reads q/k head j // group) in shared memory, one element per
    thread. Then a state column is two threads' (rows 0 .. K/2 - 1 and K/2 .. K - 1, K/2 registers
    each: a whole column in one thread's registers spilled): each adds up its rows' parts of
    pred = k_row . col, o1 = q_row . col and q . k in PARTIALS chains, the two swap them through shared
    memory and add them in one order (both get the same u), and each updates its own rows."""
    heads, HV = math.prod(batch), batch[-1]
    cols = 64 if V % 64 == 0 else 32       # state columns a block (rejects: V is a multiple of 32)
    threads, tiles, rows = 2 * cols, V // cols, K // 2
    per_key = 1 if Kg == K else 0
    rounds = -(-K // threads)

    def load(buf, name, e):                # flat element e of operand `name`, in `dtype`
        value = buf[unravel_index(e, shapes[name])]
        return T.Cast(dtype, value) if narrow and name in narrow else value

    def qk_at(h, kk):                      # flat index of q/k element kk of value head h's q/k head
        return (h // HV * (HV // group) + h % HV // group) * K + kk

    def state(h, e):
        return unravel_index(h, batch) + unravel_index(e, (K, V))

    def column(bx, tx):                    # the thread's state column in its head
        return bx % tiles * cols + tx % cols

    def row(tx, kk):                       # the thread's row kk (< K/2) of that column
        return tx // cols * rows + kk

    @T.macro
    def body(S0, Q, Kx, Vv, G, B, S1, O):
        for bx in T.thread_binding(heads * tiles, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                kc = T.alloc_shared((K,), dtype)
                kr = T.alloc_shared((K,), dtype)
                qr = T.alloc_shared((K,), dtype)
                qs = T.alloc_shared((K,), dtype)
                dc = T.alloc_shared((K,), dtype)
                half = T.alloc_shared((3 * threads,), dtype)   # each thread's three half sums
                col = T.alloc_local((rows,), dtype)
                acc = T.alloc_local((3 * PARTIALS,), dtype)    # chains of kr . col, qr . col, q . k
                for r in T.unroll(rounds):
                    if r * threads + tx < K:
                        kc[r * threads + tx] = load(Kx, "k", qk_at(bx // tiles, r * threads + tx))
                        qs[r * threads + tx] = load(Q, "q", qk_at(bx // tiles, r * threads + tx)) * T.cast(scale, dtype)
                        # dc: the decays (one per key row; all alike for one gate per head)
                        dc[r * threads + tx] = T.exp(load(G, "g", bx // tiles * Kg + (r * threads + tx) * per_key))
                        kr[r * threads + tx] = kc[r * threads + tx] * dc[r * threads + tx]
                        qr[r * threads + tx] = qs[r * threads + tx] * dc[r * threads + tx]
                T.tvm_storage_sync("shared")
                for p in T.unroll(3 * PARTIALS):
                    acc[p] = T.cast(0, dtype)
                for kk in T.unroll(rows):
                    col[kk] = S0[state(bx // tiles, row(tx, kk) * V + column(bx, tx))]
                    acc[kk % PARTIALS] = acc[kk % PARTIALS] + kr[row(tx, kk)] * col[kk]
                    acc[PARTIALS + kk % PARTIALS] = acc[PARTIALS + kk % PARTIALS] + qr[row(tx, kk)] * col[kk]
                    acc[2 * PARTIALS + kk % PARTIALS] = (acc[2 * PARTIALS + kk % PARTIALS]
                                                         + qs[row(tx, kk)] * kc[row(tx, kk)])
                add_partials(acc, 3)
                for c in T.unroll(3):
                    half[c * threads + tx] = acc[c * PARTIALS]
                T.tvm_storage_sync("shared")
                for c in T.unroll(3):          # upper rows' sum + lower rows': one order for both threads
                    acc[c * PARTIALS] = half[c * threads + tx % cols] + half[c * threads + cols + tx % cols]
                # acc[0] becomes u = (v - pred) beta
                acc[0] = (load(Vv, "v", bx // tiles * V + column(bx, tx)) - acc[0]) * load(B, "beta", bx // tiles)
                if tx < cols:
                    O[unravel_index(bx // tiles, batch) + (column(bx, tx),)] = (
                        acc[PARTIALS] + acc[0] * acc[2 * PARTIALS])
                for kk in T.unroll(rows):
                    S1[state(bx // tiles, row(tx, kk) * V + column(bx, tx))] = (
                        col[kk] * dc[row(tx, kk)] + kc[row(tx, kk)] * acc[0])
    return decode_step_function(shapes, dtype, body, narrow=narrow)
