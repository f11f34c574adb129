"""The delta-net layer graph, one builder for both variants and all modes.

The graph takes the flash-linear-attention layouts (q, k [B, T, H, K];
v [B, T, HV, V]; g [B, T, HV] or [B, T, HV, K]; beta [B, T, HV]; states
[N, HV, K, V]) and is written the way the layer is written by hand for ggml
today: layout changes as permute + cont, padding to whole chunks, explicit
repeats. It is exact as written; making it fast is the passes' job.

From here on the two variants differ only in the size Kg of the gate's last
axis: 1 for gdn (one gate per value head) and K for kda (one per key channel).
"""
from __future__ import annotations

from ..builder import Builder
from ..graph import Graph
from .chunked import chunked_delta_rule
from .config import DeltaNetConfig, preset
from .recurrent import recurrent_delta_rule
from .reference import L2NORM_EPS


def build_delta_net(cfg: DeltaNetConfig) -> Graph:
    """The layer graph for `cfg`: outputs `o` [B, T, HV, V] and, when asked, `final_state`."""
    b = Builder()
    x = {name: b.input(name, shape) for name, shape in cfg.input_shapes().items()}
    q, k = x["q"], x["k"]
    if cfg.l2norm:
        q, k = _l2norm(b, q), _l2norm(b, k)
    q = b.mul(q, cfg.scale)
    q, k = _repeat_heads(b, q, cfg), _repeat_heads(b, k, cfg)
    B, T, HV = x["beta"].shape
    g = b.reshape(x["g"], (B, T, HV, cfg.gate_channels))
    beta = b.reshape(x["beta"], (B, T, HV, 1))
    q, k, v, g, beta = (_pack(b, t, cfg) for t in (q, k, x["v"], g, beta))
    state = x["initial_state"] if cfg.initial_state else b.zeros(cfg.state_shape)
    if cfg.mode == "chunked":
        o, state = chunked_delta_rule(b, cfg, q, k, v, g, beta, state)
    else:
        o, state = recurrent_delta_rule(b, cfg, q, k, v, g, beta, state)
    outputs, names = [_unpack(b, o, cfg)], ["o"]
    if cfg.final_state:
        outputs.append(state)
        names.append("final_state")
    return b.build(outputs, names, meta=cfg.to_meta())


def build(variant_or_preset: str, **options) -> Graph:
    """build("gdn", seq_len=200, heads=2, value_heads=4) or build("qwen3-next", seq_len=4096)."""
    if variant_or_preset in ("gdn", "kda"):
        return build_delta_net(DeltaNetConfig(variant_or_preset, **options))
    return build_delta_net(preset(variant_or_preset, **options))


def _l2norm(b: Builder, x):
    """x / sqrt(sum x^2 + eps) per token: the row sum as ggml's sum_rows(sqr(x))."""
    sum_sq = b.sum(b.mul(x, x), axis=-1, keepdims=True)
    return b.mul(x, b.rsqrt(b.add(sum_sq, L2NORM_EPS)))


def _repeat_heads(b: Builder, x, cfg: DeltaNetConfig):
    """[B, T, H, K] -> [B, T, HV, K], value head j reading head j // (HV // H) (ggml_repeat)."""
    r = cfg.value_heads // cfg.heads
    if r == 1:
        return x
    B, T, H, K = x.shape
    x = b.broadcast_to(b.reshape(x, (B, T, H, 1, K)), (B, T, H, r, K))
    return b.reshape(x, (B, T, H * r, K))


def _needs_padding(cfg: DeltaNetConfig) -> bool:
    # Padding is emitted whenever this kind of graph can need it, even by zero
    # tokens (as ggml_pad is), so the node count never depends on T.
    return cfg.mode == "chunked" or cfg.cu_seqlens is not None


def _pack(b: Builder, x, cfg: DeltaNetConfig):
    """[B, T, ...] -> [N, Tp, ...]: one row per sequence, zero-padded to Tp tokens.

    Zero padding keeps the state unchanged: g = 0 decays by exp(0) = 1 and
    k = beta = 0 writes nothing.
    """
    if not _needs_padding(cfg):
        return x
    Tp = cfg.padded_len
    if cfg.cu_seqlens is None:
        return b.pad(x, [(0, 0), (0, Tp - cfg.seq_len)])
    rows = []
    for start, end in zip(cfg.cu_seqlens, cfg.cu_seqlens[1:]):
        rows.append(b.pad(b.slice_axis(x, 1, start, end), [(0, 0), (0, Tp - (end - start))]))
    return b.concat(rows, axis=0)


def _unpack(b: Builder, o, cfg: DeltaNetConfig):
    """[N, Tp, HV, V] -> [B, T, HV, V]: drop the padding, re-pack the sequences."""
    if not _needs_padding(cfg):
        return o
    if cfg.cu_seqlens is None:
        return b.slice_axis(o, 1, 0, cfg.seq_len)
    _, _, HV, V = o.shape
    rows = [b.slice(o, (n, 0, 0, 0), (n + 1, length, HV, V)) for n, length in enumerate(cfg.seq_lens)]
    return b.concat(rows, axis=1)
