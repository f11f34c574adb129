"""Use dnir from PyTorch code, in place of flash-linear-attention's kernels.

`dnir.chunk_gated_delta_rule` and `dnir.chunk_kda` (and the `fused_recurrent_*`
forms) take flash-linear-attention's arguments and layouts: q, k [B, T, H, K],
v [B, T, HV, V], g [B, T, HV] (or [B, T, HV, K] for KDA), beta [B, T, HV], states
[N, HV, K, V]. Torch tensors in, torch tensors out. The graph is built and
optimised (O2) once per shapes and options and cached, so the second call only
runs it. Packed sequences of different lengths go in as one row with
`cu_seqlens`, as in flash-linear-attention.

Here the result is checked against a plain PyTorch loop over tokens, the
delta rule as the papers write it; then the same layer with bf16 q, k, v and
beta, which returns o in bf16 and the state in float32.

    python examples/05_torch_drop_in.py
"""
import time

import torch
import torch.nn.functional as F

import dnir


def delta_rule_loop(q, k, v, g, beta, scale, state):
    """The delta rule token by token, per head, in float64: decay the state S = exp(g_t) S,
    write u = beta_t (v_t - S^T k_t) and S = S + k_t u^T, read o_t = S^T (scale q_t).
    One sequence: q, k [T, H, K], v [T, HV, V], state [HV, K, V]."""
    group = v.shape[1] // q.shape[1]
    q, k = q.repeat_interleave(group, dim=1).double() * scale, k.repeat_interleave(group, dim=1).double()
    state, out = state.double().clone(), []
    for t in range(q.shape[0]):
        decay = g[t].double().exp()
        state = state * (decay[:, :, None] if decay.dim() == 2 else decay[:, None, None])
        u = beta[t, :, None].double() * (v[t].double() - torch.einsum("hkv,hk->hv", state, k[t]))
        state = state + torch.einsum("hk,hv->hkv", k[t], u)
        out.append(torch.einsum("hkv,hk->hv", state, q[t]))
    return torch.stack(out), state


torch.manual_seed(0)
B, T, H, HV, K, V = 1, 300, 2, 4, 64, 64
cu_seqlens = torch.tensor([0, 100, 300])            # two sequences packed into one row
q = F.normalize(torch.randn(B, T, H, K), dim=-1)
k = F.normalize(torch.randn(B, T, H, K), dim=-1)
v = torch.randn(B, T, HV, V)
g = F.logsigmoid(torch.randn(B, T, HV) + 3)         # log-decay per value head, < 0
beta = torch.sigmoid(torch.randn(B, T, HV))
h0 = torch.randn(len(cu_seqlens) - 1, HV, K, V) * 0.1

for call in ("first call (build, optimise, run)", "second call (cached graph)"):
    start = time.perf_counter()
    o, final_state = dnir.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                 cu_seqlens=cu_seqlens)
    print(f"{call}: {(time.perf_counter() - start) * 1e3:.0f} ms")
print(f"o {tuple(o.shape)} {o.dtype}, final_state {tuple(final_state.shape)}")

worst = 0.0
for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
    o_ref, s_ref = delta_rule_loop(q[0, start:end], k[0, start:end], v[0, start:end], g[0, start:end],
                                   beta[0, start:end], K ** -0.5, h0[n])
    worst = max(worst, (o[0, start:end].double() - o_ref).abs().max().item(),
                (final_state[n].double() - s_ref).abs().max().item())
print(f"largest difference from the PyTorch loop: {worst:.1e}")
assert worst < 1e-4

# bf16 activations, as inference engines run these layers: q, k, v and beta in bf16, the gate and
# the state float32. dnir reads the bf16 values, computes in float32 and returns o in bf16 (one
# rounding of the float32 result) and the state in float32, as flash-linear-attention does.
half = {name: x.to(torch.bfloat16) for name, x in dict(q=q, k=k, v=v, beta=beta).items()}
o16, state16 = dnir.chunk_gated_delta_rule(**half, g=g, initial_state=h0, output_final_state=True,
                                           cu_seqlens=cu_seqlens)
print(f"bf16 inputs: o {o16.dtype}, final_state {state16.dtype}")
o_ref, s_ref = delta_rule_loop(half["q"][0, :100], half["k"][0, :100], half["v"][0, :100], g[0, :100],
                               half["beta"][0, :100], K ** -0.5, h0[0])
assert o16.dtype == torch.bfloat16 and state16.dtype == torch.float32
assert (o16[0, :100].double() - o_ref).abs().max().item() <= 2 ** -8 * o_ref.abs().max().item() + 1e-5
assert (state16[0].double() - s_ref).abs().max().item() < 1e-4
