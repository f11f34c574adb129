"""The float64 oracle checked on its own: against the unrolled closed form of the
recurrence, and for the consistency properties every delta rule must have."""
import numpy as np
import pytest

from dnir.models import delta_rule_reference, relative_rms_error
from dnir.models.reference import l2normalize


def _inputs(rng, B, T, H, HV, K, V, kda):
    q, k = l2normalize(rng.standard_normal((B, T, H, K))), l2normalize(rng.standard_normal((B, T, H, K)))
    v = rng.standard_normal((B, T, HV, V))
    g = -rng.uniform(0.0, 1.0, (B, T, HV, K) if kda else (B, T, HV))
    beta = rng.uniform(0.1, 0.9, (B, T, HV))
    return q, k, v, g, beta


def _unrolled(q, k, v, g, beta, scale, s0):
    """o_t = scale * S_t^T q_t with S_t = P(t, 0) S0 + sum_s P(t, s) beta_s k_s v_s^T and
    P(t, s) = M_t ... M_{s+1}, M_t = (I - beta_t k_t k_t^T) diag(exp(g_t)): the recurrence solved
    in closed form, one head at a time with explicit matrices."""
    B, T, H, K = q.shape
    HV = v.shape[2]
    o = np.zeros(v.shape)
    for b in range(B):
        for j in range(HV):
            h = j // (HV // H)
            M = []
            for t in range(T):
                decay = np.diag(np.exp(g[b, t, j]) * np.ones(K))
                M.append((np.eye(K) - beta[b, t, j] * np.outer(k[b, t, h], k[b, t, h])) @ decay)
            for t in range(T):
                def P(s):   # M_t ... M_{s+1}
                    out = np.eye(K)
                    for r in range(s + 1, t + 1):
                        out = M[r] @ out
                    return out
                S = P(-1) @ s0[b, j]
                for s in range(t + 1):
                    S = S + P(s) @ (beta[b, s, j] * np.outer(k[b, s, h], v[b, s, j]))
                o[b, t, j] = scale * S.T @ q[b, t, h]
    return o


@pytest.mark.parametrize("kda", [False, True], ids=["gdn", "kda"])
def test_oracle_matches_unrolled_closed_form(rng, kda):
    B, T, H, HV, K, V = 2, 6, 1, 2, 3, 2
    q, k, v, g, beta = _inputs(rng, B, T, H, HV, K, V, kda)
    s0 = rng.standard_normal((B, HV, K, V))
    o, _ = delta_rule_reference(q, k, v, g, beta, scale=0.7, initial_state=s0)
    np.testing.assert_allclose(o, _unrolled(q, k, v, g, beta, 0.7, s0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kda", [False, True], ids=["gdn", "kda"])
def test_oracle_state_passing_equals_whole_run(rng, kda):
    q, k, v, g, beta = _inputs(rng, 2, 40, 2, 4, 5, 3, kda)
    s0 = rng.standard_normal((2, 4, 5, 3))
    o, s = delta_rule_reference(q, k, v, g, beta, initial_state=s0)
    first = [x[:, :17] for x in (q, k, v, g, beta)]
    second = [x[:, 17:] for x in (q, k, v, g, beta)]
    o1, s1 = delta_rule_reference(*first, initial_state=s0)
    o2, s2 = delta_rule_reference(*second, initial_state=s1)
    np.testing.assert_allclose(np.concatenate([o1, o2], axis=1), o, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s2, s, rtol=1e-12, atol=1e-12)


def test_oracle_gqa_reads_head_j_div_ratio(rng):
    q, k, v, g, beta = _inputs(rng, 1, 12, 2, 6, 4, 3, False)
    o, s = delta_rule_reference(q, k, v, g, beta)
    # value heads 0, 1, 2 read q/k head 0; value heads 3, 4, 5 read head 1
    o_rep, s_rep = delta_rule_reference(np.repeat(q, 3, axis=2), np.repeat(k, 3, axis=2), v, g, beta)
    np.testing.assert_allclose(o, o_rep, rtol=1e-12)
    np.testing.assert_allclose(s, s_rep, rtol=1e-12)
    o_tiled, _ = delta_rule_reference(np.tile(q, (1, 1, 3, 1)), np.tile(k, (1, 1, 3, 1)), v, g, beta)
    assert relative_rms_error(o_tiled, o) > 1e-3   # the other mapping is really different


@pytest.mark.parametrize("kda", [False, True], ids=["gdn", "kda"])
def test_oracle_varlen_runs_each_sequence_alone(rng, kda):
    cu = [0, 15, 100, 300]
    q, k, v, g, beta = _inputs(rng, 1, 300, 1, 2, 4, 3, kda)
    s0 = rng.standard_normal((3, 2, 4, 3))
    o, s = delta_rule_reference(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu, cu[1:])):
        part = [x[:, a:b] for x in (q, k, v, g, beta)]
        o_n, s_n = delta_rule_reference(*part, initial_state=s0[n:n + 1])
        np.testing.assert_allclose(o[:, a:b], o_n, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(s[n:n + 1], s_n, rtol=1e-12, atol=1e-12)


def test_oracle_gdn_is_kda_with_one_gate_for_all_channels(rng):
    q, k, v, g, beta = _inputs(rng, 2, 20, 2, 2, 4, 3, False)
    o, s = delta_rule_reference(q, k, v, g, beta)
    o_kda, s_kda = delta_rule_reference(q, k, v, np.repeat(g[..., None], 4, axis=-1), beta)
    np.testing.assert_allclose(o, o_kda, rtol=1e-12)
    np.testing.assert_allclose(s, s_kda, rtol=1e-12)


def test_oracle_l2norm_removes_the_size_of_q_and_k(rng):
    q, k, v, g, beta = _inputs(rng, 1, 20, 2, 2, 4, 3, True)
    o, _ = delta_rule_reference(q, k, v, g, beta, l2norm=True)
    o_scaled, _ = delta_rule_reference(7.0 * q, 0.3 * k, v, g, beta, l2norm=True)
    assert relative_rms_error(o_scaled, o) < 1e-5
    o_raw, _ = delta_rule_reference(7.0 * q, 0.3 * k, v, g, beta)
    assert relative_rms_error(o_raw, o) > 0.1


def test_oracle_without_writes_only_decays_the_state(rng):
    """beta = 0: o_t = scale * (exp(g_1 + ... + g_t) S0)^T q_t."""
    q, k, v, g, beta = _inputs(rng, 1, 9, 1, 1, 4, 3, True)
    s0 = rng.standard_normal((1, 1, 4, 3))
    o, s = delta_rule_reference(q, k, v, g, np.zeros_like(beta), scale=0.5, initial_state=s0)
    decay = np.exp(np.cumsum(g[0, :, 0], axis=0))                     # [T, K]
    want = 0.5 * np.einsum("tk,kv,tk->tv", decay, s0[0, 0], q[0, :, 0])
    np.testing.assert_allclose(o[0, :, 0], want, rtol=1e-12)
    np.testing.assert_allclose(s[0, 0], decay[-1][:, None] * s0[0, 0], rtol=1e-12)


def test_relative_rms_error():
    ref = np.array([3.0, -4.0])
    assert relative_rms_error(ref, ref) == 0.0
    assert relative_rms_error(ref * 1.001, ref) == pytest.approx(1e-3)
    assert relative_rms_error(np.ones(2), np.zeros(2)) == 1.0
