"""What a user would run instead of dnir on the CPU, all float32 PyTorch:

- flash-linear-attention's pure-PyTorch references (PyPI `fla-core`): the
  chunked and the per-token recurrent forms of both layers. Their `naive.py`
  files are loaded by path, so that importing `fla` (which pulls in Triton) is
  not needed.
- `torch_loop`: a plain per-token loop, the way the recurrence is written by
  hand with in-place tensor ops.

Every function takes torch tensors in the flash-linear-attention layouts
(q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV] or [B, T, HV, K];
beta [B, T, HV]; state [B, HV, K, V]) and returns (o, final_state).
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

NAIVE_FILES = {"gdn": "ops/gated_delta_rule/naive.py", "kda": "ops/kda/naive.py"}


class PeerMissing(RuntimeError):
    """A peer library is not installed (the `bench` extra installs it)."""


def fla_version() -> str | None:
    try:
        return version("fla-core")
    except PackageNotFoundError:
        return None


@lru_cache(maxsize=None)
def fla_naive(variant: str):
    """flash-linear-attention's naive.py for `variant` as a module, without importing `fla`."""
    spec = importlib.util.find_spec("fla")   # locates the package; does not run its __init__
    if spec is None or not spec.submodule_search_locations:
        raise PeerMissing("flash-linear-attention is not installed: pip install 'dnir[bench]' (fla-core)")
    path = Path(list(spec.submodule_search_locations)[0]) / NAIVE_FILES[variant]
    module_spec = importlib.util.spec_from_file_location(f"_fla_naive_{variant}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _value_heads(x, hv: int):
    """[B, T, H, K] -> [B, T, HV, K]: the GDA references take one q/k head per value head."""
    return x if x.shape[2] == hv else x.repeat_interleave(hv // x.shape[2], dim=2)


def fla_chunk(variant: str, q, k, v, g, beta, state):
    naive = fla_naive(variant)
    if variant == "gdn":
        hv = v.shape[2]
        return naive.naive_chunk_gated_delta_rule(_value_heads(q, hv), _value_heads(k, hv), v, g, beta,
                                                  chunk_size=64, initial_state=state, output_final_state=True)
    return naive.naive_chunk_kda(q, k, v, g, beta, initial_state=state, output_final_state=True, chunk_size=64)


def fla_recurrent(variant: str, q, k, v, g, beta, state):
    naive = fla_naive(variant)
    if variant == "gdn":
        hv = v.shape[2]
        # Note the argument order of this one reference: beta before g.
        return naive.naive_recurrent_gated_delta_rule(_value_heads(q, hv), _value_heads(k, hv), v, beta, g,
                                                      initial_state=state, output_final_state=True)
    return naive.naive_recurrent_kda(q, k, v, g, beta, initial_state=state, output_final_state=True)


def torch_loop(variant: str, q, k, v, g, beta, state):
    """The recurrence token by token: S *= exp(g); u = beta (v - S^T k); S += k u^T; o = S^T q."""
    import torch

    B, T, H, K = q.shape
    HV = v.shape[2]
    q = _value_heads(q, HV) * K ** -0.5
    k = _value_heads(k, HV)
    decay = torch.exp(g if variant == "kda" else g[..., None]).unsqueeze(-1)  # [B, T, HV, K or 1, 1]
    S = state.clone()
    o = torch.empty_like(v)
    for t in range(T):
        k_t = k[:, t].unsqueeze(-2)                                   # [B, HV, 1, K]
        S.mul_(decay[:, t])
        u = (v[:, t] - torch.matmul(k_t, S).squeeze(-2)) * beta[:, t, :, None]
        S.add_(k_t.transpose(-1, -2) * u.unsqueeze(-2))
        o[:, t] = torch.matmul(q[:, t].unsqueeze(-2), S).squeeze(-2)
    return o, S
