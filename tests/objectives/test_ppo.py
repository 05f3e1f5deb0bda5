"""The PPO functions against values computed by hand or by plain-Python loops written here from the formulas; masked
slots (holding NaN) reach neither the results nor their gradients; everything compiles under `jax.jit`."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.errors import JaxalignError
from jaxalign.objectives import ppo

NAN = float("nan")


def f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def reference_gae(rewards, values, mask, gamma, lam):
    """GAE row by row in plain Python: masked slots are skipped and get 0."""
    advantages, returns = [], []
    for r_row, v_row, m_row in zip(rewards, values, mask):
        a_row, ret_row = [0.0] * len(r_row), [0.0] * len(r_row)
        v_next = a_next = 0.0
        for t in reversed(range(len(r_row))):
            if not m_row[t]:
                continue
            delta = r_row[t] + gamma * v_next - v_row[t]
            a_next = delta + gamma * lam * a_next
            v_next = v_row[t]
            a_row[t], ret_row[t] = a_next, a_next + v_row[t]
        advantages.append(a_row)
        returns.append(ret_row)
    return np.array(advantages), np.array(returns)


# --- GAE ---

def test_gae_hand_check():
    # t=2: δ = 1 - .7 = .3; t=1: δ = .7 - .6 = .1, A = .1 + .95·.3 = .385; t=0: δ = .1, A = .1 + .95·.385 = .46575
    rewards, values, mask = f32([[0, 0, 1, NAN]]), f32([[.5, .6, .7, NAN]]), f32([[1, 1, 1, 0]])
    advantages, returns = ppo.gae(rewards, values, mask, 1.0, 0.95)
    np.testing.assert_allclose(advantages, [[.46575, .385, .3, 0]], atol=1e-6)
    np.testing.assert_allclose(returns, [[.96575, .985, 1.0, 0]], atol=1e-6)


def test_gae_skips_a_masked_token_inside_a_response():
    # prompt slot, then a response with its third token masked, then padding; NaN in every masked slot
    rewards = [[NAN, 0.1, -0.2, NAN, 0.3, 1.0, NAN]]
    values = [[NAN, 0.4, 0.5, NAN, 0.2, 0.6, NAN]]
    mask = [[0, 1, 1, 0, 1, 1, 0]]
    advantages, returns = ppo.gae(f32(rewards), f32(values), f32(mask), 1.0, 0.9)
    expected_a, expected_r = reference_gae(rewards, values, mask, 1.0, 0.9)
    np.testing.assert_allclose(advantages, expected_a, atol=1e-6)
    np.testing.assert_allclose(returns, expected_r, atol=1e-6)
    # by hand: t=5: A = 1 - .6 = .4; t=4: δ = .3 + .6 - .2 = .7, A = .7 + .9·.4 = 1.06;
    # t=2 (skipping t=3): δ = -.2 + .2 - .5 = -.5, A = -.5 + .9·1.06 = .454; t=1: δ = .1 + .5 - .4 = .2,
    # A = .2 + .9·.454 = .6086
    np.testing.assert_allclose(advantages[0], [0, 0.6086, 0.454, 0, 1.06, 0.4, 0], atol=1e-6)


def test_gae_with_discount_matches_the_loop():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(3, 6)).tolist()
    values = rng.normal(size=(3, 6)).tolist()
    mask = [[1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0]]
    advantages, returns = jax.jit(ppo.gae)(f32(rewards), f32(values), f32(mask), 0.9, 0.8)
    expected_a, expected_r = reference_gae(rewards, values, mask, 0.9, 0.8)
    np.testing.assert_allclose(advantages, expected_a, atol=1e-5)
    np.testing.assert_allclose(returns, expected_r, atol=1e-5)
    # one step by hand, row 2: A_1 = r_1 - V_1, A_0 = r_0 + .9 V_1 - V_0 + .72 A_1
    a1 = rewards[2][1] - values[2][1]
    a0 = rewards[2][0] + 0.9 * values[2][1] - values[2][0] + 0.72 * a1
    np.testing.assert_allclose(advantages[2, :2], [a0, a1], atol=1e-5)


# --- KL ---

def test_kl_penalty_estimators():
    logp, ref = f32([[-1, -2, -.5]]), f32([[-1.2, -1.5, -.5]])
    np.testing.assert_allclose(ppo.kl_penalty(logp, ref, "k3"), [[.018731, .148721, 0]], atol=1e-6)
    np.testing.assert_allclose(ppo.kl_penalty(logp, ref, "k1"), [[.2, -.5, 0]], atol=1e-6)
    np.testing.assert_allclose(ppo.kl_penalty(logp, ref, "k2"), [[.02, .125, 0]], atol=1e-6)
    d = [.2, -.5, 0.0]
    np.testing.assert_allclose(ppo.kl_penalty(logp, ref, "k3")[0], [math.exp(-x) - 1 + x for x in d], atol=1e-6)


def test_kl_penalty_rejects_other_kinds():
    with pytest.raises(JaxalignError, match="k1, k2, k3"):
        ppo.kl_penalty(f32([0.0]), f32([0.0]), "abs")


def test_approx_kl_is_k3_of_the_ratio_new_over_old():
    logp, old = f32([[-1.0, -2.0, -0.3]]), f32([[-1.2, -1.5, -0.3]])
    expected = []
    for new_t, old_t in zip([-1.0, -2.0, -0.3], [-1.2, -1.5, -0.3]):
        rho = math.exp(new_t - old_t)
        expected.append(rho - 1 - math.log(rho))
    np.testing.assert_allclose(ppo.approx_kl(logp, old), [expected], atol=1e-6)
    assert float(jnp.min(ppo.approx_kl(logp, old))) >= 0


# --- whitening ---

def test_whiten_over_valid_entries():
    x, mask = f32([[1.0, 2.0], [3.0, NAN]]), f32([[1, 1], [1, 0]])
    s = math.sqrt(2 / 3 + 1e-8)  # mean 2, biased variance 2/3
    np.testing.assert_allclose(ppo.whiten(x, mask), [[-1 / s, 0], [1 / s, 0]], atol=1e-6)
    np.testing.assert_allclose(ppo.whiten(x, mask, shift_mean=False), [[2 - 1 / s, 2], [2 + 1 / s, 0]], atol=1e-6)


def test_whiten_of_one_valid_entry_is_zero():
    out = ppo.whiten(f32([[5.0, NAN, NAN]]), f32([[1, 0, 0]]))
    assert out.tolist() == [[0.0, 0.0, 0.0]]
    assert ppo.whiten(f32([[NAN, NAN]]), f32([[0, 0]])).tolist() == [[0.0, 0.0]]


def test_whiten_without_mask_is_the_sequence_score_whitening():
    from jaxalign.rewards import whiten as whiten_scores

    scores = [2.0, -1.0, 0.5, 4.0]
    mean = sum(scores) / 4
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / 4 + 1e-8)
    np.testing.assert_allclose(whiten_scores(scores), [(s - mean) / std for s in scores], atol=1e-6)
    np.testing.assert_allclose(ppo.whiten(f32(scores)), [(s - mean) / std for s in scores], atol=1e-6)


# --- token rewards ---

def reference_token_rewards(kl, scores, mask, beta):
    out = np.zeros((len(kl), len(kl[0])))
    for b, (kl_row, m_row) in enumerate(zip(kl, mask)):
        valid = [t for t, m in enumerate(m_row) if m]
        for t in valid:
            out[b, t] = -beta * kl_row[t]
        if valid:
            out[b, valid[-1]] += scores[b]
    return out


def test_score_goes_to_the_last_valid_token():
    kl = [[.1, .2, .3, NAN], [.1, -.1, .2, .4], [.5, NAN, .1, NAN], [NAN, .2, .3, NAN], [NAN] * 4]
    mask = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    scores = [1.0, 2.0, 3.0, 4.0, 5.0]
    rewards = jax.jit(ppo.sequence_score_rewards)(f32(kl), f32(scores), f32(mask), 0.1)
    np.testing.assert_allclose(rewards, reference_token_rewards(kl, scores, mask, 0.1), atol=1e-6)
    # by hand: the score sits at index 2, 3 (full width), 2 (after a masked token), 2; nowhere in an empty row
    np.testing.assert_allclose(rewards[0], [-.01, -.02, 1 - .03, 0], atol=1e-6)
    np.testing.assert_allclose(rewards[1], [-.01, .01, -.02, 2 - .04], atol=1e-6)
    np.testing.assert_allclose(rewards[2], [-.05, 0, 3 - .01, 0], atol=1e-6)
    np.testing.assert_allclose(rewards[4], [0, 0, 0, 0], atol=0)
    # nothing lands on a masked slot
    np.testing.assert_allclose(np.where(np.array(mask) == 0, rewards, 0).sum(), 0, atol=0)


def test_score_one_token_late_would_be_caught():
    # placing the score at the first slot after the response (the peer bug) differs from the result
    mask = [[1, 1, 0, 0], [1, 1, 1, 1]]
    rewards = np.asarray(ppo.sequence_score_rewards(f32(np.zeros((2, 4))), f32([1.0, 1.0]), f32(mask), 0.1))
    late = np.zeros((2, 4))
    late[0, 2] = 1.0  # the full-width row has no slot after it: the score would be lost
    assert not np.allclose(rewards, late)
    assert rewards[0].tolist() == [0, 1, 0, 0] and rewards[1].tolist() == [0, 0, 0, 1]


# --- losses ---

def test_policy_loss_hand_check():
    rho = [1.35, .7, 1.1]
    old = f32([[-1.0, -1.0, -1.0]])
    logp = old + jnp.log(f32([rho]))
    loss, clipped = ppo.policy_loss(logp, old, f32([[1, -1, 1]]), f32([[1, 1, 1]]), 0.2, 0.2)
    np.testing.assert_allclose(loss, [[-1.2, .8, -1.1]], atol=1e-6)
    assert clipped.tolist() == [[1.0, 1.0, 0.0]]


def test_policy_loss_asymmetric_clip():
    # ε_low .2, ε_high .28: ρ = 1.35 with A = 1 is cut at 1.28; ρ = .7 with A = -1 at .8
    old = f32([[0.0, 0.0]])
    logp = jnp.log(f32([[1.35, .7]]))
    loss, _ = ppo.policy_loss(logp, old, f32([[1, -1]]), f32([[1, 1]]), clip_low=0.2, clip_high=0.28)
    np.testing.assert_allclose(loss, [[-1.28, .8]], atol=1e-6)


def test_policy_loss_dual_clip():
    # A = -1, ρ = 4: max(4, 1.2) = 4, dual min(4, 3·1) = 3 (clipped)
    # A = -1, ρ = 2: max(2, 1.2) = 2 < 3: unchanged, not clipped
    # A = +1, ρ = 4: max(-4, -1.2) = -1.2; the dual clip only applies to A < 0
    # A = -2, ρ = .5: max(1, 1.6) = 1.6 (ratio clip) < 6
    rho, adv = [4.0, 2.0, 4.0, .5], [-1.0, -1.0, 1.0, -2.0]
    old = f32([[0.0] * 4])
    loss, clipped = ppo.policy_loss(jnp.log(f32([rho])), old, f32([adv]), f32([[1] * 4]), 0.2, dual_clip=3.0)
    np.testing.assert_allclose(loss, [[3.0, 2.0, -1.2, 1.6]], atol=1e-5)
    assert clipped.tolist() == [[1.0, 0.0, 1.0, 1.0]]
    plain, _ = ppo.policy_loss(jnp.log(f32([rho])), old, f32([adv]), f32([[1] * 4]), 0.2)
    np.testing.assert_allclose(plain, [[4.0, 2.0, -1.2, 1.6]], atol=1e-5)
    with pytest.raises(JaxalignError, match="dual clip"):
        ppo.policy_loss(old, old, old, old, 0.2, dual_clip=1.0)


def test_policy_loss_gradient_of_an_unclipped_token():
    # d/dlogp of mean(-A ρ) over 2 valid tokens at ρ = 1.1, A = 1: -1.1 / 2; the clipped token gives 0
    old = f32([[0.0, 0.0]])
    logp = jnp.log(f32([[1.1, 1.35]]))
    grad = jax.grad(lambda lp: ppo.masked_mean(ppo.policy_loss(lp, old, f32([[1, 1]]), f32([[1, 1]]))[0],
                                               f32([[1, 1]])))(logp)
    np.testing.assert_allclose(grad, [[-0.55, 0.0]], atol=1e-6)


def test_value_loss_clipped_and_unclipped():
    values, old, returns = f32([[1.0, 0.0, 0.5]]), f32([[0.5, 0.5, 0.5]]), f32([[0.0, 1.0, 0.6]])
    mask = f32([[1, 1, 1]])
    # t0: (1-0)² = 1 vs (.5 + .2 - 0)² = .49 → .5; t1: (0-1)² = 1 vs (.3 - 1)² = .49 → .5;
    # t2: (.5-.6)² = .01 vs (.5 - .6)² → .005
    np.testing.assert_allclose(ppo.value_loss(values, old, returns, mask, 0.2), [[.5, .5, .005]], atol=1e-6)
    # returns far away: t0 V = 1, R = 3: (1-3)² = 4 vs (.7 - 3)² = 5.29 → 2.645 (the clipped term wins)
    np.testing.assert_allclose(ppo.value_loss(f32([[1.0]]), f32([[0.5]]), f32([[3.0]]), f32([[1]]), 0.2),
                               [[2.645]], atol=1e-5)
    np.testing.assert_allclose(ppo.value_loss(values, old, returns, mask, None), [[.5, .5, .005]], atol=1e-6)
    np.testing.assert_allclose(ppo.value_loss(f32([[1.0]]), f32([[0.5]]), f32([[3.0]]), f32([[1]]), None),
                               [[2.0]], atol=1e-6)


def test_nan_in_masked_slots_reaches_neither_losses_nor_gradients():
    mask = f32([[1, 1, 0], [1, 0, 0]])
    logp = f32([[-1.0, -0.5, NAN], [-2.0, NAN, NAN]])
    old = f32([[-1.3, -0.4, NAN], [-1.9, NAN, NAN]])
    adv = f32([[0.5, -1.0, NAN], [2.0, NAN, NAN]])
    values = f32([[0.1, 0.2, NAN], [0.3, NAN, -jnp.inf]])

    def objective(lp, v):
        pg, _ = ppo.policy_loss(lp, old, adv, mask, 0.2, dual_clip=3.0)
        vf = ppo.value_loss(v, values, adv, mask, 0.2)
        white = ppo.whiten(lp, mask)
        return ppo.masked_mean(pg + vf + white, mask)

    value, (g_logp, g_values) = jax.value_and_grad(objective, argnums=(0, 1))(logp, values)
    assert np.isfinite(value)
    assert np.isfinite(g_logp).all() and np.isfinite(g_values).all()
    assert g_logp[0, 2] == 0 and g_logp[1, 1] == 0 and g_values[1, 2] == 0
    # the valid tokens' mean, by hand: only three tokens count
    # ρ = e^.3 = 1.35 (A = .5: clipped to -.5·1.2), e^-.1 = .905 (A = -1), e^-.1 (A = 2): inside the clip range
    pg = [-0.5 * 1.2, math.exp(-0.1), -2 * math.exp(-0.1)]
    vf = [0.5 * (0.1 - 0.5) ** 2, 0.5 * (0.2 + 1.0) ** 2, 0.5 * (0.3 - 2.0) ** 2]
    lp = [-1.0, -0.5, -2.0]
    m = sum(lp) / 3
    s = math.sqrt(sum((x - m) ** 2 for x in lp) / 3 + 1e-8)
    np.testing.assert_allclose(value, sum(pg[i] + vf[i] + (lp[i] - m) / s for i in range(3)) / 3, atol=1e-5)
    # GAE and the token rewards with NaN in the masked slots
    advantages, returns = ppo.gae(adv, values, mask, 1.0, 0.95)
    assert np.isfinite(advantages).all() and np.isfinite(returns).all()
    assert np.isfinite(ppo.sequence_score_rewards(logp, f32([1.0, 2.0]), mask, 0.1)).all()


# --- metrics ---

def test_masked_mean():
    x, mask = f32([[1.0, 2.0, NAN], [4.0, NAN, NAN]]), f32([[1, 1, 0], [1, 0, 0]])
    assert float(ppo.masked_mean(x, mask)) == pytest.approx(7 / 3)
    np.testing.assert_allclose(ppo.masked_mean(x, mask, axis=-1), [1.5, 4.0])
    assert float(ppo.masked_mean(x, jnp.zeros_like(mask))) == 0.0
    grad = jax.grad(lambda y: ppo.masked_mean(y, mask))(x)
    np.testing.assert_allclose(grad, [[1 / 3, 1 / 3, 0], [1 / 3, 0, 0]], atol=1e-7)


def test_explained_variance():
    values, returns = f32([[1.0, 2.0, NAN], [2.5, NAN, NAN]]), f32([[1.5, 2.0, NAN], [3.0, NAN, NAN]])
    mask = f32([[1, 1, 0], [1, 0, 0]])
    r, v = [1.5, 2.0, 3.0], [1.0, 2.0, 2.5]

    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / len(xs)

    expected = 1 - var([a - b for a, b in zip(r, v)]) / var(r)
    assert float(ppo.explained_variance(values, returns, mask)) == pytest.approx(expected, abs=1e-6)
    assert float(ppo.explained_variance(f32([[1.0, 2.0]]), f32([[3.0, 3.0]]), f32([[1, 1]]))) == 0.0
    assert float(ppo.explained_variance(returns, returns, mask)) == pytest.approx(1.0)


# --- KL controllers ---

def test_adaptive_kl_controller_updates_and_restores():
    controller = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9: e = min(9/6 - 1, .2) = .2 → β = .1 (1 + .2 · 512 / 10000)
    assert controller.update(9.0, 512) == pytest.approx(0.1 * 1.01024, rel=1e-12)
    # KL 6: e = 0, β unchanged
    assert controller.update(jnp.float32(6.0), 512) == pytest.approx(0.101024, rel=1e-12)
    # KL 3: e = max(-.5, -.2) = -.2 → β · (1 - .2 · 256 / 10000)
    assert controller.update(3.0, 256) == pytest.approx(0.101024 * 0.99488, rel=1e-12)
    # KL 6.6: e = .1 → β · (1 + .1 · 100 / 10000)
    expected = 0.101024 * 0.99488 * 1.001
    assert controller.update(6.6, 100) == pytest.approx(expected, rel=1e-12)

    state = json.loads(json.dumps(controller.state_dict()))
    resumed = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(state)
    assert resumed.value == controller.value
    assert resumed.update(12.0, 64) == controller.update(12.0, 64)


def test_fixed_kl_controller():
    controller = ppo.FixedKLController(0.01)
    assert controller.update(100.0, 512) == 0.01 and controller.value == 0.01
    other = ppo.FixedKLController(0.5)
    other.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert other.value == 0.01
    with pytest.raises(JaxalignError, match="target"):
        ppo.AdaptiveKLController(0.1, target=0.0, horizon=10000)


def test_everything_compiles():
    mask = f32([[1, 1, 0]])
    x = f32([[0.1, -0.2, 0.3]])
    jax.jit(ppo.whiten, static_argnames=("shift_mean",))(x, mask, shift_mean=False)
    jax.jit(ppo.kl_penalty, static_argnames="kind")(x, x, kind="k3")
    jax.jit(ppo.approx_kl)(x, x)
    jax.jit(ppo.policy_loss)(x, x, x, mask, 0.2, 0.28, 3.0)
    jax.jit(ppo.value_loss)(x, x, x, mask, 0.2)
    jax.jit(ppo.masked_mean)(x, mask)
    jax.jit(ppo.explained_variance)(x, x, mask)
    beta = jnp.float32(0.05)
    jax.jit(ppo.sequence_score_rewards)(x, f32([1.0]), mask, beta)
    advantages, _ = jax.jit(ppo.gae)(x, x, mask, jnp.float32(0.99), jnp.float32(0.95))
    assert advantages.dtype == jnp.float32
