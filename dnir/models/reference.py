"""The float64 recurrent oracle, written from the recurrence in the math notes.

Per sequence and value head, with the state S a K x V matrix and q_t already
multiplied by `scale`:

    S   = S * exp(g_t)              # gdn: one scalar; kda: row c of S times exp(g_t[c])
    u   = beta_t * (v_t - S^T k_t)
    S   = S + k_t u^T
    o_t = S^T q_t

Value head j reads q/k head j // (HV // H). With `cu_seqlens` (B = 1) every
packed sequence starts from its own initial state and sees only its own tokens.
"""
from __future__ import annotations

import numpy as np

L2NORM_EPS = 1e-6


def l2normalize(x: np.ndarray) -> np.ndarray:
    """x / sqrt(sum x^2 + 1e-6) over the last axis."""
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def delta_rule_reference(q, k, v, g, beta, *, scale=None, initial_state=None, l2norm=False,
                         cu_seqlens=None):
    """Returns (o [B, T, HV, V], final_state [N, HV, K, V]), both float64.

    q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV] (gdn) or [B, T, HV, K] (kda);
    beta [B, T, HV]; initial_state [N, HV, K, V] or None (zeros).
    """
    q, k, v, g, beta = (np.asarray(x, dtype=np.float64) for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    per_channel_gate = g.ndim == 4
    if l2norm:
        q, k = l2normalize(q), l2normalize(k)
    q = q * (K ** -0.5 if scale is None else scale)
    head_of = np.arange(HV) // (HV // H)
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        cu = [int(x) for x in cu_seqlens]
        spans = [(0, start, end) for start, end in zip(cu, cu[1:])]

    o = np.zeros((B, T, HV, V))
    final = np.zeros((len(spans), HV, K, V))
    for n, (b, start, end) in enumerate(spans):
        S = np.zeros((HV, K, V)) if initial_state is None else np.array(initial_state[n], dtype=np.float64)
        for t in range(start, end):
            qt, kt = q[b, t, head_of], k[b, t, head_of]          # [HV, K]
            decay = np.exp(g[b, t])
            S = S * (decay[:, :, None] if per_channel_gate else decay[:, None, None])
            u = beta[b, t][:, None] * (v[b, t] - np.einsum("hkv,hk->hv", S, kt))
            S = S + np.einsum("hk,hv->hkv", kt, u)
            o[b, t] = np.einsum("hkv,hk->hv", S, qt)
        final[n] = S
    return o, final


def relative_rms_error(out, ref) -> float:
    """rms(out - ref) / rms(ref); 0 when both are zero."""
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    err = np.sqrt(np.mean((out - ref) ** 2))
    scale = np.sqrt(np.mean(ref ** 2))
    if scale == 0:
        return float(err)
    return float(err / scale)
