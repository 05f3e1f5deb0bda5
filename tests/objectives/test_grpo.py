"""The group-relative functions against values computed by hand: advantages of each kind, the three loss
aggregations (with a masked token inside a response), their `Mean`s pooled over two halves, NaN in masked slots, and
DAPO's overlong penalty at its boundaries."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.errors import JaxalignError
from jaxalign.objectives import grpo

NAN = float("nan")


def f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


# --- advantages ---

def test_hand_check_of_the_three_kinds():
    rewards = f32([1, 0, 0, 1])
    # mean .5, deviations ±.5; ddof 1: s = sqrt(4 · .25 / 3) = .57735, .5 / (.57735 + 1e-6) = .866024
    np.testing.assert_allclose(grpo.group_advantages(rewards, 4, "grpo"), [.866024, -.866024, -.866024, .866024],
                               atol=1e-6)
    np.testing.assert_allclose(grpo.group_advantages(rewards, 4, "dr_grpo"), [.5, -.5, -.5, .5], atol=1e-7)
    # rloo: 1 - (0 + 0 + 1)/3 = 2/3, 0 - 2/3 = -2/3
    np.testing.assert_allclose(grpo.group_advantages(rewards, 4, "rloo"), [2 / 3, -2 / 3, -2 / 3, 2 / 3],
                               atol=1e-6)


def test_ddof_zero_and_one():
    rewards = f32([3, 1])
    # mean 2, deviations ±1; ddof 0: s = 1 → ±1/(1 + eps); ddof 1: s = sqrt(2) → ±0.707106
    np.testing.assert_allclose(grpo.group_advantages(rewards, 2, "grpo", ddof=0), [1 / (1 + 1e-6), -1 / (1 + 1e-6)],
                               rtol=1e-7)
    np.testing.assert_allclose(grpo.group_advantages(rewards, 2, "grpo", ddof=1, eps=0.0),
                               [1 / math.sqrt(2), -1 / math.sqrt(2)], rtol=1e-6)
    # eps matters for a small std: deviations ±.001, ddof 0 s = .001 → ±.001 / (.001 + .001) = ±.5
    np.testing.assert_allclose(grpo.group_advantages(f32([1.001, 0.999]), 2, "grpo", eps=1e-3, ddof=0), [.5, -.5],
                               atol=1e-3)


def test_several_groups_are_independent():
    rewards = f32([1, 2, 3, 10, 10, 10, 0, 4, 2])
    # group 1: mean 2, deviations -1, 0, 1; group 2: all equal; group 3: mean 2, deviations -2, 2, 0
    np.testing.assert_allclose(grpo.group_advantages(rewards, 3, "dr_grpo"), [-1, 0, 1, 0, 0, 0, -2, 2, 0], atol=1e-6)
    # rloo = 3/2 (r - mean)
    np.testing.assert_allclose(grpo.group_advantages(rewards, 3, "rloo"), [-1.5, 0, 1.5, 0, 0, 0, -3, 3, 0],
                               atol=1e-6)
    # grpo, ddof 1: s = 1 for group 1, s = 2 for group 3
    np.testing.assert_allclose(grpo.group_advantages(rewards, 3, "grpo", eps=0.0), [-1, 0, 1, 0, 0, 0, -1, 1, 0],
                               atol=1e-6)
    assert grpo.all_equal_groups(rewards, 3).tolist() == [False, True, False]


@pytest.mark.parametrize("kind", grpo.ADVANTAGE_KINDS)
@pytest.mark.parametrize("ddof", [0, 1])
def test_all_equal_groups_give_exactly_zero(kind, ddof):
    # 0.1 summed three times is not 3 · 0.1 in float32: the mean may differ from the values by a rounding step
    rewards = f32([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0, 0, 0])
    advantages = grpo.group_advantages(rewards, 3, kind, eps=0.0, ddof=ddof)
    assert advantages.dtype == jnp.float32
    assert np.asarray(advantages).tolist() == [0.0] * 9
    assert grpo.all_equal_groups(rewards, 3).tolist() == [True, True, True]


def test_advantages_compile_under_jit():
    rewards = f32([1, 0, 0, 1, 2, 2, 5, 1])
    jitted = jax.jit(grpo.group_advantages, static_argnums=(1, 2))
    np.testing.assert_allclose(jitted(rewards, 4, "grpo"), grpo.group_advantages(rewards, 4, "grpo"), rtol=1e-6)


def test_bad_groups_and_kinds_raise():
    with pytest.raises(JaxalignError, match="at least 2 responses"):
        grpo.group_advantages(f32([1, 2]), 1, "grpo")
    with pytest.raises(JaxalignError, match="5 rewards do not split into groups of 2"):
        grpo.group_advantages(f32([1, 2, 3, 4, 5]), 2, "grpo")
    with pytest.raises(JaxalignError, match="unknown advantage kind 'ppo'"):
        grpo.group_advantages(f32([1, 2]), 2, "ppo")
    with pytest.raises(JaxalignError, match="ddof must be in"):
        grpo.group_advantages(f32([1, 2]), 2, "grpo", ddof=2)
    with pytest.raises(JaxalignError, match="at least 2 responses"):
        grpo.all_equal_groups(f32([1, 2]), 1)


# --- aggregation ---

# sequence 0: tokens 1, (masked NaN), 3, 2 → 3 valid tokens, sum 6; sequence 1: 4, then padding (NaN);
# sequence 2: no valid token at all
LOSS = [[1.0, NAN, 3.0, 2.0], [4.0, NAN, NAN, NAN], [NAN, NAN, NAN, NAN]]
MASK = [[1, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_token_mean_by_hand():
    # (1 + 3 + 2 + 4) / 4 tokens
    assert float(grpo.aggregate(f32(LOSS), f32(MASK), "token_mean")) == pytest.approx(2.5)
    mean = grpo.aggregate_mean(f32(LOSS), f32(MASK), "token_mean")
    assert (float(mean.total), float(mean.count)) == (10.0, 4.0)


def test_sequence_mean_by_hand():
    # sequence 0: 6 / 3 = 2; sequence 1: 4; sequence 2 has no tokens and is not counted → (2 + 4) / 2
    assert float(grpo.aggregate(f32(LOSS), f32(MASK), "sequence_mean")) == pytest.approx(3.0)
    mean = grpo.aggregate_mean(f32(LOSS), f32(MASK), "sequence_mean")
    assert (float(mean.total), float(mean.count)) == (6.0, 2.0)


def test_token_sum_norm_by_hand():
    # (6 / 8 + 4 / 8) / 2 sequences with tokens
    assert float(grpo.aggregate(f32(LOSS), f32(MASK), "token_sum_norm", max_length=8)) == pytest.approx(0.625)
    mean = grpo.aggregate_mean(f32(LOSS), f32(MASK), "token_sum_norm", max_length=8)
    assert (float(mean.total), float(mean.count)) == (1.25, 2.0)
    with pytest.raises(JaxalignError, match="needs the maximum length"):
        grpo.aggregate(f32(LOSS), f32(MASK), "token_sum_norm")
    with pytest.raises(JaxalignError, match="unknown loss aggregation 'mean'"):
        grpo.aggregate(f32(LOSS), f32(MASK), "mean")


def test_nothing_valid_gives_zero():
    for kind in grpo.AGGREGATIONS:
        assert float(grpo.aggregate(f32([[NAN, NAN]]), f32([[0, 0]]), kind, max_length=4)) == 0.0


@pytest.mark.parametrize("kind", grpo.AGGREGATIONS)
def test_means_of_two_halves_pool_to_the_whole(kind):
    rng = np.random.default_rng(0)
    loss = rng.normal(size=(6, 5)).astype(np.float32)
    mask = np.ones((6, 5), np.float32)
    mask[0, 3:] = 0
    mask[1, 1] = 0
    mask[3, :] = 0
    mask[4, 2:] = 0
    loss[mask == 0] = np.nan
    whole = grpo.aggregate(f32(loss), f32(mask), kind, max_length=5)
    pooled = (grpo.aggregate_mean(f32(loss[:2]), f32(mask[:2]), kind, max_length=5)
              + grpo.aggregate_mean(f32(loss[2:]), f32(mask[2:]), kind, max_length=5))
    assert pooled.value() == pytest.approx(float(whole), rel=1e-6)
    # the halves' own values differ from the whole: plain averaging of the two would be wrong
    first = grpo.aggregate(f32(loss[:2]), f32(mask[:2]), kind, max_length=5)
    second = grpo.aggregate(f32(loss[2:]), f32(mask[2:]), kind, max_length=5)
    assert float((first + second) / 2) != pytest.approx(float(whole), rel=1e-3)


@pytest.mark.parametrize("kind", grpo.AGGREGATIONS)
def test_nan_in_masked_slots_reaches_neither_values_nor_gradients(kind):
    loss, mask = f32(LOSS), f32(MASK)
    value, grad = jax.value_and_grad(lambda x: grpo.aggregate(x, mask, kind, max_length=8))(loss)
    assert np.isfinite(float(value))
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[np.asarray(MASK) == 0] == 0)
    # d/dx of each aggregation by hand: token_mean 1/4 per token; sequence_mean 1/(2 · n_b); token_sum_norm 1/(2 · 8)
    expected = {"token_mean": [0.25, 0.25], "sequence_mean": [1 / 6, 0.5], "token_sum_norm": [1 / 16, 1 / 16]}[kind]
    np.testing.assert_allclose([grad[0, 0], grad[1, 0]], expected, rtol=1e-6)


def test_aggregate_compiles_under_jit():
    jitted = jax.jit(grpo.aggregate, static_argnums=(2, 3))
    assert float(jitted(f32(LOSS), f32(MASK), "sequence_mean", None)) == pytest.approx(3.0)


# --- overlong penalty ---

def test_overlong_penalty_at_the_boundaries():
    # L_max 20, L_cache 4: 0 up to 16, then -1/4 per token, -1 at 20 and beyond
    lengths = jnp.asarray([0, 15, 16, 17, 18, 20, 21, 100], jnp.int32)
    penalty = grpo.overlong_penalty(lengths, 20, 4)
    assert penalty.dtype == jnp.float32
    np.testing.assert_allclose(penalty, [0, 0, 0, -0.25, -0.5, -1, -1, -1], atol=1e-7)
    np.testing.assert_allclose(grpo.overlong_penalty([7, 8, 9], 8, 8), [-7 / 8, -1, -1], atol=1e-7)
    for cache, max_length in ((0, 20), (21, 20)):
        with pytest.raises(JaxalignError, match="0 < cache <= max_length"):
            grpo.overlong_penalty(lengths, max_length, cache)
