"""The delta-net layer graph, one builder for both variants and all modes.

The graph takes the flash-linear-attention layouts (q, k [B, T, H, K];
v [B, T, HV, V]; g [B, T, HV] or [B, T, HV, K]; beta [B, T, HV]; states
[N, HV, K, V]) and is written the way the layer is written by hand for ggml
today: layout changes as permute + cont, padding to whole chunks, explicit
repeats. It is exact as written; making it fast is the passes' job.

From here on the two variants differ only in the size Kg of the gate's last
axis: 1 for gdn (one gate per value head) and K for kda (one per key channel).
Packed sequences (`cu_seqlens`) are cut apart by each form, and each sequence
gets its own state recurrence (a scan per sequence: the graph grows with the
number of sequences, never with their length).
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
    x = {name: _widened(b, b.input(name, shape, cfg.dtype_of(name))) for name, shape in cfg.input_shapes().items()}
    q, k = x["q"], x["k"]
    if cfg.l2norm:
        q, k = _l2norm(b, q), _l2norm(b, k)
    q = b.mul(q, cfg.scale)
    q, k = _repeat_heads(b, q, cfg), _repeat_heads(b, k, cfg)
    B, T, HV = x["beta"].shape
    g = b.reshape(x["g"], (B, T, HV, cfg.gate_channels))
    beta = b.reshape(x["beta"], (B, T, HV, 1))
    state = x["initial_state"] if cfg.initial_state else b.zeros(cfg.state_shape)
    form = chunked_delta_rule if cfg.mode == "chunked" else recurrent_delta_rule
    o, state = form(b, cfg, q, k, x["v"], g, beta, state)
    outputs, names = [o if cfg.dtype == "f32" else b.cast(o, cfg.dtype)], ["o"]
    if cfg.final_state:
        outputs.append(state)
        names.append("final_state")
    return b.build(outputs, names, meta=cfg.to_meta())


def build(variant_or_preset: str, **options) -> Graph:
    """build("gdn", seq_len=200, heads=2, value_heads=4) or build("qwen3-next", seq_len=4096)."""
    if variant_or_preset in ("gdn", "kda"):
        return build_delta_net(DeltaNetConfig(variant_or_preset, **options))
    return build_delta_net(preset(variant_or_preset, **options))


def _widened(b: Builder, x):
    """A half input read as float32: one explicit `cast` right after the input, so that
    everything after it (passes, memory plan, kernels) computes in float32, as a GPU
    does with half operands; a kernel that loads the half value may widen it itself."""
    return x if x.dtype == "f32" else b.cast(x, "f32")


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
