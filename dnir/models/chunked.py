"""The chunked (prefill) form: intra-chunk work for all chunks at once, then a
`scan` over chunks that carries the state.

Inside a chunk of C tokens with the state S0 at its start, gam the cumulative
gate from the chunk start (a [C, Kg] matrix) and D_ij = gam_i - gam_j:

    Akk[i,j] = beta_i sum_c k_i[c] k_j[c] exp(D_ij[c])   (j < i)
    Aqk[i,j] =        sum_c q_i[c] k_j[c] exp(D_ij[c])   (j <= i)
    W = (I + Akk)^-1 (beta k exp(gam)),   U = (I + Akk)^-1 (beta v)
    Vn = U - W S0,   O = (q exp(gam)) S0 + Aqk Vn
    S  = exp(gam_C) S0 + (k exp(gam_C - gam))^T Vn

The work local to each chunk (the scores, W, U and the decays, every exponent a
sum of gates over its own segment) is dnir/intra_chunk.py; this module pads,
runs the loop over chunks and unpads.
"""
from __future__ import annotations

from ..builder import Builder
from ..intra_chunk import chunk_operands
from .config import DeltaNetConfig


def chunked_delta_rule(b: Builder, cfg: DeltaNetConfig, q, k, v, g, beta, state):
    """q, k [B, T, HV, K]; v [B, T, HV, V]; g [B, T, HV, Kg]; beta [B, T, HV, 1];
    state [N, HV, K, V]. Returns o [B, T, HV, V] and the final state."""
    C = cfg.chunk_size
    q, k, v, g, beta = (_pad_to_chunks(b, cfg, x) for x in (q, k, v, g, beta))
    R, Tp, HV, K = q.shape           # R rows of whole chunks: B, or 1 with all sequences packed
    V = v.shape[-1]
    xs = chunk_operands(b, q, k, v, g, beta, C, cfg.block_size, cfg.factorized_decay)
    body = _chunk_step(xs, (R, HV, K, V))
    if cfg.cu_seqlens is None:
        state, o = b.scan(body, [state], xs)                     # o [NC, R, HV, C, V]
    else:   # R = 1: one recurrence per sequence, over its own chunks, from its own initial state
        states, outs = [], []
        for n, (c0, c1) in enumerate(_chunk_spans(cfg)):
            s_n, o_n = b.scan(body, [b.slice_axis(state, 0, n, n + 1)],
                              [b.slice_axis(x, 0, c0, c1) for x in xs])
            states.append(s_n)
            outs.append(o_n)
        state, o = b.concat(states, axis=0), b.concat(outs, axis=0)
    o = b.cont(b.permute(o, (1, 0, 3, 2, 4)))                    # [R, NC, C, HV, V]
    return _drop_padding(b, cfg, b.reshape(o, (R, Tp, HV, V))), state


def _padded(length: int, C: int) -> int:
    return -(-length // C) * C


def _chunk_spans(cfg: DeltaNetConfig) -> list[tuple[int, int]]:
    """[first, last) chunk of each packed sequence, each padded to whole chunks."""
    spans, start = [], 0
    for length in cfg.seq_lens:
        n = _padded(length, cfg.chunk_size) // cfg.chunk_size
        spans.append((start, start + n))
        start += n
    return spans


def _pad_to_chunks(b: Builder, cfg: DeltaNetConfig, x):
    """[B, T, ...] -> [R, Tp, ...]: every sequence zero-padded to whole chunks.

    The pad is emitted even when it adds nothing (as ggml_pad is), so the node
    count never depends on T. Zero padding leaves a state unchanged: g = 0
    decays by exp(0) = 1 and k = beta = 0 writes nothing.
    """
    C = cfg.chunk_size
    if cfg.cu_seqlens is None:
        return b.pad(x, [(0, 0), (0, _padded(cfg.seq_len, C) - cfg.seq_len)])
    parts = [b.pad(b.slice_axis(x, 1, start, end), [(0, 0), (0, _padded(end - start, C) - (end - start))])
             for start, end in zip(cfg.cu_seqlens, cfg.cu_seqlens[1:])]
    return b.concat(parts, axis=1)


def _drop_padding(b: Builder, cfg: DeltaNetConfig, o):
    """[R, Tp, HV, V] -> [B, T, HV, V]."""
    if cfg.cu_seqlens is None:
        return b.slice_axis(o, 1, 0, cfg.seq_len)
    parts = [b.slice_axis(o, 1, c0 * cfg.chunk_size, c0 * cfg.chunk_size + length)
             for (c0, _), length in zip(_chunk_spans(cfg), cfg.seq_lens)]
    return b.concat(parts, axis=1)


def _chunk_step(xs, state_shape):
    """Body of the scan over chunks: the only sequential part."""
    bb = Builder()
    s0 = bb.input("state", state_shape)
    w, u, q_decayed, aqk, k_to_end, last_decay = (
        bb.input(name, x.shape[1:]) for name, x in
        zip(("w", "u", "q_decayed", "aqk", "k_to_end", "last_decay"), xs))
    v_new = bb.sub(u, bb.matmul(w, s0))
    o = bb.add(bb.matmul(q_decayed, s0), bb.matmul(aqk, v_new))
    s1 = bb.add(bb.mul(s0, last_decay), bb.matmul(k_to_end, v_new, transpose_a=True))
    return bb.build([s1, o], names=["state", "o"])
