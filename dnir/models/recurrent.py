"""The recurrent form: a `scan` over tokens, or one step without a scan (decode).

The state is carried transposed, S^T [N, HV, V, K], so that both S^T k and
S^T q are products along the innermost axis: `sum(mul(S^T, k))`, which is how
ggml writes them (`sum_rows`). This is the O0 reference form; O1/O2 remove
both state transposes (eliminate_transposes sinks them into the products,
relayout_scan_carries carries the scan's state as S [N, HV, K, V]), so the
optimised step reads S row by row as k^T S and q^T S.
"""
from __future__ import annotations

from ..builder import Builder
from .config import DeltaNetConfig


def recurrent_delta_rule(b: Builder, cfg: DeltaNetConfig, q, k, v, g, beta, state):
    """q, k [B, T, HV, K]; v [B, T, HV, V]; g [B, T, HV, Kg]; beta [B, T, HV, 1];
    state [N, HV, K, V]. Returns o [B, T, HV, V] and the final state."""
    B, T, HV, _ = q.shape
    V = v.shape[-1]
    state_t = b.cont(b.transpose(state))
    if cfg.mode == "decode":
        # One token per sequence: B sequences of T = 1, or T packed sequences of
        # one token each (B = 1). Either way one row per sequence, no loop.
        step = [b.reshape(x, (B * T, HV, x.shape[-1])) for x in (q, k, v, g, beta)]
        state_t, o = token_step(b, state_t, *step)
        return b.reshape(o, (B, T, HV, V)), b.cont(b.transpose(state_t))
    xs = [b.cont(b.permute(x, (1, 0, 2, 3))) for x in (q, k, v, g, beta)]     # [T, B, HV, X]
    body = _token_body(state_t, xs)
    if cfg.cu_seqlens is None:
        state_t, o = b.scan(body, [state_t], xs)
    else:   # B = 1: one recurrence per packed sequence, from its own initial state
        states, outs = [], []
        for n, (start, end) in enumerate(zip(cfg.cu_seqlens, cfg.cu_seqlens[1:])):
            s_n, o_n = b.scan(body, [b.slice_axis(state_t, 0, n, n + 1)],
                              [b.slice_axis(x, 0, start, end) for x in xs])
            states.append(s_n)
            outs.append(o_n)
        state_t, o = b.concat(states, axis=0), b.concat(outs, axis=0)
    return b.cont(b.permute(o, (1, 0, 2, 3))), b.cont(b.transpose(state_t))


def _token_body(state_t, xs):
    bb = Builder()
    s = bb.input("state_t", (xs[0].shape[1],) + state_t.shape[1:])
    step = [bb.input(name, x.shape[1:]) for name, x in zip(("q", "k", "v", "g", "beta"), xs)]
    s, o = token_step(bb, s, *step)
    return bb.build([s, o], names=["state_t", "o"])


def token_step(b: Builder, state_t, q, k, v, g, beta):
    """One token: state_t [N, HV, V, K]; q, k [N, HV, K]; v [N, HV, V]; g [N, HV, Kg]; beta [N, HV, 1].

    With a = exp(g), the decayed state S diag(a) and the new one S' = S diag(a) + k u^T,
    both products read the state as it comes in: the prediction is S^T (a k), and
    S'^T q = S^T (a q) + u (k . q). The state is read twice and written once per
    token, not decayed in a pass of its own and read again after the update."""
    N, HV, V, K = state_t.shape
    decay = b.reshape(b.exp(g), (N, HV, g.shape[-1]))
    k_decayed, q_decayed = b.mul(k, decay), b.mul(q, decay)

    def reads(x):       # S^T x, along the innermost axis
        return b.sum(b.mul(state_t, b.reshape(x, (N, HV, 1, K))), axis=-1)
    u = b.mul(b.sub(v, reads(k_decayed)), beta)
    o = b.add(reads(q_decayed), b.mul(u, b.sum(b.mul(q, k), axis=-1, keepdims=True)))
    decayed = b.mul(state_t, b.reshape(decay, (N, HV, 1, g.shape[-1])))
    state_t = b.add(decayed, b.mul(b.reshape(u, (N, HV, V, 1)), b.reshape(k, (N, HV, 1, K))))  # S += k u^T
    return state_t, o
