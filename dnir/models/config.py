"""Options of a delta-net layer graph, the named presets, and their metadata form.

One `DeltaNetConfig` describes both variants: the gate is one scalar per value
head (`gdn`, Gated DeltaNet of Qwen3-Next) or one value per key channel (`kda`,
Kimi Delta Attention of Kimi Linear). Everything a graph computes is recorded
in its metadata, so that a `.dnir` file alone is enough to rebuild the oracle.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import DnirError, InputError
from ..limits import oversize
from ..types import PRECISIONS, TensorType, canonical_dtype, default_precision

VARIANTS = ("gdn", "kda")
MODES = ("chunked", "recurrent", "decode")
CHUNK_SIZES = (16, 32, 64)
# The activations' dtype (q, k, v, beta and o). The gate g and the states are float32 always:
# a half state would round every step, and both models compute their gates in float32.
DTYPES = ("f32", "bf16", "f16")
WIDE_INPUTS = ("g", "initial_state")
PRESETS = {
    "qwen3-next": dict(variant="gdn", heads=16, value_heads=32, head_dim=128, value_dim=128),
    "kimi-linear": dict(variant="kda", heads=32, value_heads=32, head_dim=128, value_dim=128),
}


@dataclass(frozen=True)
class DeltaNetConfig:
    variant: str                      # "gdn" (scalar gate per value head) or "kda" (gate per key channel)
    batch: int = 1                    # B
    seq_len: int = 64                 # T (packed length when cu_seqlens is given)
    heads: int = 2                    # H: q/k heads
    value_heads: int = 2              # HV: value heads; head j reads q/k head j // (HV // H)
    head_dim: int = 16                # K
    value_dim: int = 16               # V
    mode: str = "chunked"
    chunk_size: int = 64
    block_size: int | None = None     # None, or a divisor of chunk_size: build C x C matrices from blocks
    l2norm: bool = False              # l2-normalise q and k per token first
    scale: float | None = None        # None: head_dim ** -0.5
    initial_state: bool = False       # the graph takes `initial_state` [N, HV, K, V]
    final_state: bool = False         # the graph returns `final_state` [N, HV, K, V]
    cu_seqlens: tuple[int, ...] | None = None   # packed sequences (needs batch 1)
    factorized_decay: bool = False    # the overflowing exp(gam_i) * exp(-gam_j) form, for range analysis
    dtype: str = "f32"                # q, k, v, beta and o: f32, bf16 or f16 (g and the states f32)
    precision: str | None = None      # CUDA's tensor-core products (PRECISIONS); None: by dtype

    def __post_init__(self):
        if self.cu_seqlens is not None:
            cu = self.cu_seqlens
            if not isinstance(cu, (tuple, list)) or not all(_is_int(x) for x in cu):
                raise InputError(f"cu_seqlens={cu!r}; expected a sequence of integers [0, ..., T]")
            object.__setattr__(self, "cu_seqlens", tuple(int(x) for x in cu))
        try:    # 'bfloat16', np.float16, torch's names as NumPy spells them
            object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        except DnirError:
            pass    # _check names the choices
        _check(self)
        if self.precision is None:
            object.__setattr__(self, "precision", default_precision(self.dtype))
        object.__setattr__(self, "scale", float(self.head_dim ** -0.5 if self.scale is None else self.scale))

    @property
    def num_sequences(self) -> int:
        """N: rows of the state."""
        return self.batch if self.cu_seqlens is None else len(self.cu_seqlens) - 1

    @property
    def gate_channels(self) -> int:
        """Kg: how many key channels have their own gate (1 or K)."""
        return 1 if self.variant == "gdn" else self.head_dim

    @property
    def seq_lens(self) -> tuple[int, ...]:
        if self.cu_seqlens is None:
            return (self.seq_len,) * self.batch
        return tuple(b - a for a, b in zip(self.cu_seqlens, self.cu_seqlens[1:]))

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Graph inputs in the flash-linear-attention layouts, by name, in order."""
        B, T, H, HV, K, V = (self.batch, self.seq_len, self.heads, self.value_heads,
                             self.head_dim, self.value_dim)
        shapes = {"q": (B, T, H, K), "k": (B, T, H, K), "v": (B, T, HV, V),
                  "g": (B, T, HV) if self.variant == "gdn" else (B, T, HV, K), "beta": (B, T, HV)}
        if self.initial_state:
            shapes["initial_state"] = self.state_shape
        return shapes

    @property
    def state_shape(self) -> tuple[int, int, int, int]:
        return (self.num_sequences, self.value_heads, self.head_dim, self.value_dim)

    def dtype_of(self, name: str) -> str:
        """The dtype of the graph input or output `name`: the activations' dtype, f32 for
        the gate and the states."""
        return "f32" if name in WIDE_INPUTS or name == "final_state" else self.dtype

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Graph outputs by name, in order."""
        shapes = {"o": (self.batch, self.seq_len, self.value_heads, self.value_dim)}
        if self.final_state:
            shapes["final_state"] = self.state_shape
        return shapes

    def to_meta(self) -> dict:
        """The graph metadata; None-valued options are left out (metadata has no null)."""
        return {"model": "delta_net", **{k: v for k, v in asdict(self).items() if v is not None}}

    @classmethod
    def from_meta(cls, meta) -> "DeltaNetConfig":
        if meta.get("model") != "delta_net":
            raise InputError("the graph has no delta-net model metadata (meta {model=\"delta_net\", ...}); "
                             "build it with `dnir build gdn|kda`")
        names = {f.name for f in fields(cls)}
        if "variant" not in meta:
            raise InputError("the delta-net metadata has no variant (meta {variant=\"gdn\"|\"kda\", ...})")
        return cls(**{k: v for k, v in meta.items() if k in names})

    @classmethod
    def of_graph(cls, graph, where: str = "graph") -> "DeltaNetConfig":
        """The config in the graph's metadata, checked against the graph: the inputs and
        outputs it describes are the graph's own (names, order, shapes, float32), so that
        inputs drawn and an oracle built from the metadata fit the graph."""
        try:
            cfg = cls.from_meta(graph.meta)
        except InputError as e:
            raise InputError(f"{where}: meta: {e}") from None
        for kind, want, names, types in (
                ("inputs", cfg.input_shapes(), graph.input_names, graph.input_types),
                ("outputs", cfg.output_shapes(), graph.output_names, graph.output_types)):
            have = {n: t for n, t in zip(names, types)}
            expect = {n: TensorType(s, cfg.dtype_of(n)) for n, s in want.items()}
            if list(have) != list(expect):
                raise InputError(f"{where}: meta describes {kind} {list(expect)}, the graph has {list(have)}")
            for n, t in have.items():
                if t != expect[n]:
                    raise InputError(f"{where}: meta describes {kind[:-1]} {n} as {expect[n]}, the graph "
                                     f"has {t}")
        return cfg


def preset(name: str, **overrides) -> DeltaNetConfig:
    """A config with a real layer's sizes, e.g. preset("qwen3-next", seq_len=4096)."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    sizes = dict(PRESETS[name])
    if overrides.get("variant", sizes["variant"]) != sizes["variant"]:
        raise InputError(f"preset {name!r} is a {sizes['variant']} layer, not {overrides['variant']}")
    sizes.update(overrides)
    return DeltaNetConfig(**sizes)


def _check(c: DeltaNetConfig):
    if c.variant not in VARIANTS:
        raise InputError(f"variant={c.variant!r}; expected one of {', '.join(VARIANTS)}")
    if c.dtype not in DTYPES:
        raise InputError(f"dtype={c.dtype!r}; expected one of {', '.join(DTYPES)} (the dtype of q, k, v, beta "
                         f"and o; g and the states are f32)")
    if c.precision is not None and c.precision not in PRECISIONS:
        raise InputError(f"precision={c.precision!r}; expected one of {', '.join(PRECISIONS)} (the tensor-core "
                         f"products on CUDA: 3xTF32, float32's accuracy, or one TF32 product) or None "
                         f"(tf32 for bf16/f16, highest for f32)")
    if c.mode not in MODES:
        raise InputError(f"mode={c.mode!r}; expected one of {', '.join(MODES)}")
    for name in ("batch", "seq_len", "heads", "value_heads", "head_dim", "value_dim"):
        value = getattr(c, name)
        if not _is_int(value) or value < 1:
            raise InputError(f"{name}={value!r}; expected a positive integer")
    for name in ("l2norm", "initial_state", "final_state", "factorized_decay"):
        if not isinstance(getattr(c, name), bool):
            raise InputError(f"{name}={getattr(c, name)!r}; expected true or false")
    if c.value_heads % c.heads:
        raise InputError(f"value_heads={c.value_heads} is not a multiple of heads={c.heads} "
                         f"(each q/k head serves HV // H value heads)")
    if not _is_int(c.chunk_size) or c.chunk_size not in CHUNK_SIZES:
        raise InputError(f"chunk_size={c.chunk_size!r}; expected one of {', '.join(map(str, CHUNK_SIZES))}")
    if c.block_size is not None and (not _is_int(c.block_size) or c.block_size < 1
                                     or c.chunk_size % c.block_size):
        raise InputError(f"block_size={c.block_size!r} does not divide chunk_size={c.chunk_size}; "
                         f"expected None or a divisor of it")
    # Sizes first, before anything is built or planned: the largest input or output
    # (q, k, v, g, the state) within the bound on one tensor.
    for name, shape in {**c.input_shapes(), **c.output_shapes()}.items():
        why = oversize(TensorType(shape, "f32"))
        if why:
            sizes = ", ".join(f"{n}={getattr(c, n)}" for n in ("batch", "seq_len", "heads", "value_heads",
                                                                "head_dim", "value_dim"))
            raise InputError(f"{sizes}: {name} would be f32{list(shape)}, {why}")
    if c.scale is not None and not (isinstance(c.scale, (int, float)) and math.isfinite(c.scale) and c.scale > 0):
        raise InputError(f"scale={c.scale}; expected a positive finite number")
    if c.cu_seqlens is not None:
        check_cu_seqlens(c.cu_seqlens, c.seq_len, c.batch)
    if c.mode == "decode" and max(c.seq_lens) != 1:
        raise InputError(f"mode='decode' computes one token per sequence; got sequence length(s) "
                         f"{sorted(set(c.seq_lens))} (use mode='recurrent' or 'chunked')")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_cu_seqlens(cu, seq_len: int, batch: int):
    """cu_seqlens: [0, e1, e2, ..., T], strictly increasing, with batch 1."""
    cu = list(cu)
    if batch != 1:
        raise InputError(f"cu_seqlens packs sequences along T and needs batch B=1, got B={batch} "
                         f"(pack the batch as [1, total_tokens, ...])")
    if len(cu) < 2:
        raise InputError(f"cu_seqlens={cu} needs at least two entries [0, ..., T={seq_len}]")
    if cu[0] != 0:
        raise InputError(f"cu_seqlens={cu} must start at 0")
    if any(b <= a for a, b in zip(cu, cu[1:])):
        raise InputError(f"cu_seqlens={cu} is not strictly increasing (every sequence needs >= 1 token)")
    if cu[-1] != seq_len:
        raise InputError(f"cu_seqlens={cu} ends at {cu[-1]}, expected the packed length T={seq_len}")
