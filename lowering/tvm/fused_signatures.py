"""The fused ops' kernel signatures, one per op, shared by its GPU and its CPU kernel.

A fused op's kernel takes the op's operands and outputs in their own shapes
(nothing is reshaped around the call), the same on every target; only the loop
nest differs. So each op's function, its buffers and their shapes are declared
here once, and a kernel passes its loop nest as a `T.macro` taking the buffers
in the order of the op's operands, then its outputs.
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .kernels import ATTRS


def chunk_scan_function(steps: int, batch: tuple, C: int, K: int, V: int, Kg: int, dtype: str, body):
    """body(S0, W, U, Qd, A, Kte, LD, S1, O): S1 [*batch, K, V] and O [steps, *batch, C, V] from
    S0 and the per-step operands W, Qd, Kte [steps, *batch, C, K], U [steps, *batch, C, V],
    A [steps, *batch, C, C], LD [steps, *batch, Kg, 1]."""
    @T.prim_func(private=True, s_tir=True)
    def kernel(s0: T.handle, w: T.handle, u: T.handle, qd: T.handle, aqk: T.handle, kte: T.handle,
               ld: T.handle, s1: T.handle, o: T.handle):
        T.func_attr(ATTRS)
        S0 = T.match_buffer(s0, (*batch, K, V), dtype)
        W = T.match_buffer(w, (steps, *batch, C, K), dtype)
        U = T.match_buffer(u, (steps, *batch, C, V), dtype)
        Qd = T.match_buffer(qd, (steps, *batch, C, K), dtype)
        A = T.match_buffer(aqk, (steps, *batch, C, C), dtype)
        Kte = T.match_buffer(kte, (steps, *batch, C, K), dtype)
        LD = T.match_buffer(ld, (steps, *batch, Kg, 1), dtype)
        S1 = T.match_buffer(s1, (*batch, K, V), dtype)
        O = T.match_buffer(o, (steps, *batch, C, V), dtype)
        with T.sblock("root"):
            body(S0, W, U, Qd, A, Kte, LD, S1, O)
    return kernel


def chunk_states_function(steps: int, batch: tuple, C: int, K: int, V: int, Kg: int, dtype: str, body,
                          stored: str = "", narrow: dict | None = None):
    """body(S0, W, U, Kte, LD, S1, St, N): the final state S1 [*batch, K, V], each chunk's starting
    state St [steps, *batch, K, V] and v_new N [steps, *batch, C, V] from S0 and the per-step
    operands W, Kte [steps, *batch, C, K], U [steps, *batch, C, V], LD [steps, *batch, Kg, 1].
    stored: St's and N's dtype where it is narrower than `dtype` (bf16/fp16, the body rounds as it
    stores); narrow: role (dnir.fused.STATES_ROLES) -> the dtype of an operand narrower than `dtype`,
    which the body widens as it loads it."""
    of = {role: (narrow or {}).get(role, dtype) for role in ("w", "u", "k_to_end", "last_decay")}
    @T.prim_func(private=True, s_tir=True)
    def kernel(s0: T.handle, w: T.handle, u: T.handle, kte: T.handle, ld: T.handle, s1: T.handle,
               st: T.handle, vn: T.handle):
        T.func_attr(ATTRS)
        S0 = T.match_buffer(s0, (*batch, K, V), dtype)
        W = T.match_buffer(w, (steps, *batch, C, K), of["w"])
        U = T.match_buffer(u, (steps, *batch, C, V), of["u"])
        Kte = T.match_buffer(kte, (steps, *batch, C, K), of["k_to_end"])
        LD = T.match_buffer(ld, (steps, *batch, Kg, 1), of["last_decay"])
        S1 = T.match_buffer(s1, (*batch, K, V), dtype)
        St = T.match_buffer(st, (steps, *batch, K, V), stored or dtype)
        N = T.match_buffer(vn, (steps, *batch, C, V), stored or dtype)
        with T.sblock("root"):
            body(S0, W, U, Kte, LD, S1, St, N)
    return kernel


def chunk_output_function(steps: int, batch: tuple, C: int, K: int, V: int, dtype: str, body,
                          token_major: bool = False, out_dtype: str = "", narrow: dict | None = None):
    """body(Qd, St, A, N, O): O [steps, *batch, C, V] (token_major: [R, steps C, HV, V] for the batch
    axes (R, HV)) from Qd [steps, *batch, C, K], the starting states St [steps, *batch, K, V],
    A [steps, *batch, C, C] and v_new N [steps, *batch, C, V]. out_dtype: O's dtype where it is
    narrower than `dtype` (bf16/fp16, the body rounds as it stores); narrow: role (dnir.fused.OUTPUT_ROLES)
    -> the dtype of an operand narrower than `dtype`, which the body widens as it loads it."""
    out_shape = (batch[0], steps * C, batch[1], V) if token_major else (steps, *batch, C, V)
    of = {role: (narrow or {}).get(role, dtype) for role in ("q_decayed", "starts", "aqk", "v_new")}
    @T.prim_func(private=True, s_tir=True)
    def kernel(qd: T.handle, st: T.handle, aqk: T.handle, vn: T.handle, o: T.handle):
        T.func_attr(ATTRS)
        Qd = T.match_buffer(qd, (steps, *batch, C, K), of["q_decayed"])
        St = T.match_buffer(st, (steps, *batch, K, V), of["starts"])
        A = T.match_buffer(aqk, (steps, *batch, C, C), of["aqk"])
        N = T.match_buffer(vn, (steps, *batch, C, V), of["v_new"])
        O = T.match_buffer(o, out_shape, out_dtype or dtype)
        with T.sblock("root"):
            body(Qd, St, A, N, O)
    return kernel


def intra_chunk_function(R: int, NC: int, HV: int, C: int, K: int, V: int, Kg: int, dtype: str, body,
                         group: int = 1, narrow: dict | None = None, stored: str = ""):
    """body(Q, Kx, Vx, G, Bt, W, U, Qd, A, Ke, LD): the loop's operands W, U, Qd, A, Ke, LD (dnir/fused.py's
    order, chunk-major: [NC, R, HV, C, X], LD [NC, R, HV, Kg, 1]) from q, k [R, Tp, HV / group, K],
    v [R, Tp, HV, V], g [R, Tp, HV, Kg] and beta [R, Tp, HV, 1], Tp = NC C tokens. group: value heads per
    head of q and k (GQA read without its repeated copy); narrow: role (dnir.fused.INTRA_ROLES) -> the
    dtype of an operand narrower than `dtype` (bf16/fp16), which the body widens as it loads it; stored:
    the dtype of W, U, Qd and Ke where narrower than `dtype` (the body rounds as it stores)."""
    Tp, HQ = NC * C, HV // group
    of = {role: (narrow or {}).get(role, dtype) for role in ("q", "k", "v", "g", "beta")}

    @T.prim_func(private=True, s_tir=True)
    def kernel(q: T.handle, k: T.handle, v: T.handle, g: T.handle, beta: T.handle, w: T.handle, u: T.handle,
               qd: T.handle, aqk: T.handle, kte: T.handle, ld: T.handle):
        T.func_attr(ATTRS)
        Q = T.match_buffer(q, (R, Tp, HQ, K), of["q"])
        Kx = T.match_buffer(k, (R, Tp, HQ, K), of["k"])
        Vx = T.match_buffer(v, (R, Tp, HV, V), of["v"])
        G = T.match_buffer(g, (R, Tp, HV, Kg), of["g"])
        Bt = T.match_buffer(beta, (R, Tp, HV, 1), of["beta"])
        W = T.match_buffer(w, (NC, R, HV, C, K), stored or dtype)
        U = T.match_buffer(u, (NC, R, HV, C, V), stored or dtype)
        Qd = T.match_buffer(qd, (NC, R, HV, C, K), stored or dtype)
        A = T.match_buffer(aqk, (NC, R, HV, C, C), dtype)
        Ke = T.match_buffer(kte, (NC, R, HV, C, K), stored or dtype)
        LD = T.match_buffer(ld, (NC, R, HV, Kg, 1), dtype)
        with T.sblock("root"):
            body(Q, Kx, Vx, G, Bt, W, U, Qd, A, Ke, LD)
    return kernel


def token_step_function(shapes: dict, dtype: str, body, state_align: int = -1, narrow: dict | None = None,
                        checksum: bool = False):
    """body(S0, D, Kc, Kr, Qr, Vv, B, QK, S1, O): the new state S1 and the output O from the
    state S0 and the step's vectors, each in its own shape `shapes[role]` (dnir.fused.STEP_ROLES,
    and "o" for the output). state_align: the alignment S0 is declared with (-1: the default).
    narrow: role -> the dtype of an operand narrower than `dtype` (bf16/fp16), which the body widens.
    checksum: a third output CHK in O's shape, body(..., S1, O, CHK) (the CPU kernel's column sums
    of S1: a finite sum says every entry is finite, without reading the state again)."""
    of = {role: (narrow or {}).get(role, dtype) for role in shapes}
    if checksum:
        @T.prim_func(private=True, s_tir=True)
        def checked(s0: T.handle, decay: T.handle, kc: T.handle, kr: T.handle, qr: T.handle, v: T.handle,
                    beta: T.handle, qk: T.handle, s1: T.handle, o: T.handle, chk: T.handle):
            T.func_attr(ATTRS)
            S0 = T.match_buffer(s0, shapes["state"], dtype, align=state_align)
            D = T.match_buffer(decay, shapes["decay"], of["decay"])
            Kc = T.match_buffer(kc, shapes["k_col"], of["k_col"])
            Kr = T.match_buffer(kr, shapes["k_row"], of["k_row"])
            Qr = T.match_buffer(qr, shapes["q_row"], of["q_row"])
            Vv = T.match_buffer(v, shapes["v"], of["v"])
            B = T.match_buffer(beta, shapes["beta"], of["beta"])
            QK = T.match_buffer(qk, shapes["qk"], of["qk"])
            S1 = T.match_buffer(s1, shapes["state"], dtype)
            O = T.match_buffer(o, shapes["o"], dtype)
            CHK = T.match_buffer(chk, shapes["o"], dtype)
            with T.sblock("root"):
                body(S0, D, Kc, Kr, Qr, Vv, B, QK, S1, O, CHK)
        return checked

    @T.prim_func(private=True, s_tir=True)
    def kernel(s0: T.handle, decay: T.handle, kc: T.handle, kr: T.handle, qr: T.handle, v: T.handle,
               beta: T.handle, qk: T.handle, s1: T.handle, o: T.handle):
        T.func_attr(ATTRS)
        S0 = T.match_buffer(s0, shapes["state"], dtype, align=state_align)
        D = T.match_buffer(decay, shapes["decay"], of["decay"])
        Kc = T.match_buffer(kc, shapes["k_col"], of["k_col"])
        Kr = T.match_buffer(kr, shapes["k_row"], of["k_row"])
        Qr = T.match_buffer(qr, shapes["q_row"], of["q_row"])
        Vv = T.match_buffer(v, shapes["v"], of["v"])
        B = T.match_buffer(beta, shapes["beta"], of["beta"])
        QK = T.match_buffer(qk, shapes["qk"], of["qk"])
        S1 = T.match_buffer(s1, shapes["state"], dtype)
        O = T.match_buffer(o, shapes["o"], dtype)
        with T.sblock("root"):
            body(S0, D, Kc, Kr, Qr, Vv, B, QK, S1, O)
    return kernel


def decode_step_function(shapes: dict, dtype: str, body, loose: bool = False, narrow: dict | None = None,
                         report: int = 0):
    """body(S0, Q, Kx, Vv, G, B, S1, O[, REP]): token_step_function's outputs from the state and the
    layer's raw vectors (dnir.fused.DECODE_ROLES), each in its own shape `shapes[role]`. loose: every
    operand declared aligned to its element only (the caller's arrays taken where they are). report:
    a third output REP [report], a few numbers (the CPU kernel's checks); loose, that kernel's new
    state too (it may be the caller's initial state, updated in place)."""
    of = {role: (narrow or {}).get(role, dtype) for role in shapes}
    align = {role: tvm.DataType(of[role]).bits // 8 if loose else -1 for role in shapes}
    if report:
        @T.prim_func(private=True, s_tir=True)
        def checked(s0: T.handle, q: T.handle, k: T.handle, v: T.handle, g: T.handle, beta: T.handle,
                    s1: T.handle, o: T.handle, rep: T.handle):
            T.func_attr(ATTRS)
            S0 = T.match_buffer(s0, shapes["state"], dtype, align=align["state"])
            Q = T.match_buffer(q, shapes["q"], of["q"], align=align["q"])
            Kx = T.match_buffer(k, shapes["k"], of["k"], align=align["k"])
            Vv = T.match_buffer(v, shapes["v"], of["v"], align=align["v"])
            G = T.match_buffer(g, shapes["g"], of["g"], align=align["g"])
            B = T.match_buffer(beta, shapes["beta"], of["beta"], align=align["beta"])
            S1 = T.match_buffer(s1, shapes["state"], dtype, align=align["state"])
            O = T.match_buffer(o, shapes["o"], dtype)
            REP = T.match_buffer(rep, (report,), dtype)
            with T.sblock("root"):
                body(S0, Q, Kx, Vv, G, B, S1, O, REP)
        return checked

    @T.prim_func(private=True, s_tir=True)
    def kernel(s0: T.handle, q: T.handle, k: T.handle, v: T.handle, g: T.handle, beta: T.handle,
               s1: T.handle, o: T.handle):
        T.func_attr(ATTRS)
        S0 = T.match_buffer(s0, shapes["state"], dtype, align=align["state"])
        Q = T.match_buffer(q, shapes["q"], of["q"], align=align["q"])
        Kx = T.match_buffer(k, shapes["k"], of["k"], align=align["k"])
        Vv = T.match_buffer(v, shapes["v"], of["v"], align=align["v"])
        G = T.match_buffer(g, shapes["g"], of["g"], align=align["g"])
        B = T.match_buffer(beta, shapes["beta"], of["beta"], align=align["beta"])
        S1 = T.match_buffer(s1, shapes["state"], dtype)
        O = T.match_buffer(o, shapes["o"], dtype)
        with T.sblock("root"):
            body(S0, Q, Kx, Vv, G, B, S1, O)
    return kernel
