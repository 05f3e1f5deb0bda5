"""Reward-model loss, margins, centering and pair metrics against hand-computed values; rewards do not depend on the
padding side or the pad id."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.data.packing import MARGINS, preference_batch
from jaxalign.models.heads import LlamaForScore
from jaxalign.models.llama import LlamaConfig
from jaxalign.objectives.reward import make_loss_fn, pair_metrics, pair_rewards, pairwise_loss

from tests.params import init_params

R_CHOSEN = jnp.array([1.0, 0.5, -0.2])
R_REJECTED = jnp.array([0.0, 0.7, -1.2])


def test_pairwise_loss_hand_values():
    losses = pairwise_loss(R_CHOSEN, R_REJECTED, jnp.array([0.5, 0.0, 1.0]))
    np.testing.assert_allclose(losses, [0.474077, 0.798139, 0.693147], atol=1e-6)
    assert float(losses.mean()) == pytest.approx(0.655121, abs=1e-6)
    assert float(pairwise_loss(R_CHOSEN, R_REJECTED).mean()) == pytest.approx(0.474887, abs=1e-6)


def test_centering_adds_the_mean_squared_reward_sum():
    centered = pairwise_loss(R_CHOSEN, R_REJECTED, jnp.array([0.5, 0.0, 1.0]), center_coefficient=0.01)
    # 0.01 * mean([1.0, 1.44, 1.96]) = 0.0146667
    assert float(centered.mean()) == pytest.approx(0.655121 + 0.0146667, abs=1e-6)


def test_margin_tables_by_strength():
    assert MARGINS["small"] == pytest.approx((1.0, 2 / 3, 1 / 3, 0.0))
    assert MARGINS["large"] == (3.0, 2.0, 1.0, 0.0)
    pair = ((np.array([1, 2, 3]), np.array([0, 1, 1], bool)), (np.array([1, 2, 4]), np.array([0, 1, 1], bool)))
    pairs = [(*pair, strength, -1) for strength in (0, 1, 2, 3, -1)]
    np.testing.assert_allclose(preference_batch(pairs, 4, 0, "large")["margin"], [3, 2, 1, 0, 0])
    np.testing.assert_allclose(preference_batch(pairs, 4, 0, "small")["margin"], [1, 2 / 3, 1 / 3, 0, 0], atol=1e-7)


def test_large_reward_gaps_stay_finite():
    losses = pairwise_loss(jnp.array([200.0, -200.0]), jnp.array([-200.0, 200.0]))
    assert np.all(np.isfinite(losses)) and float(losses[0]) == 0.0 and float(losses[1]) == pytest.approx(400.0)


def test_pair_metrics_overall_and_per_strength_bucket():
    r_chosen, r_rejected = jnp.array([1.0, 0.5, -0.2, 2.0]), jnp.array([0.0, 0.7, -0.2, 9.0])
    losses = pairwise_loss(r_chosen, r_rejected)
    metrics = pair_metrics(r_chosen, r_rejected, losses, jnp.array([0, 0, 2, -1]), jnp.array([1.0, 1.0, 1.0, 0.0]))
    assert metrics["accuracy"].value() == pytest.approx(1 / 3)  # the tie at -0.2 is wrong; the padding pair ignored
    assert metrics["rewards/chosen"].value() == pytest.approx((1.0 + 0.5 - 0.2) / 3)
    assert metrics["rewards/margins"].value() == pytest.approx((1.0 - 0.2 + 0.0) / 3)
    assert metrics["accuracy/significantly_better"].value() == pytest.approx(0.5)
    assert float(metrics["accuracy/significantly_better"].count) == 2.0
    assert metrics["accuracy/slightly_better"].value() == 0.0 and float(metrics["accuracy/better"].count) == 0.0
    assert metrics["loss/slightly_better"].value() == pytest.approx(np.log(2.0))


@pytest.fixture(scope="module")
def score_model():
    model = LlamaForScore(LlamaConfig.tiny(vocab_size=32))
    params = init_params(model, jax.random.key(0))
    return model, params


def pair_batch(pad_id: int, left: bool, seq_len: int = 12) -> dict:
    """Two pairs (prompt + response ending with eos 2), padded on the left or right with `pad_id`."""
    chosen = [np.array([1, 7, 8, 9, 10, 2]), np.array([1, 5, 6, 2])]
    rejected = [np.array([1, 7, 8, 11, 2]), np.array([1, 5, 6, 12, 13, 14, 2])]
    batch = {}
    for name, rows in (("chosen", chosen), ("rejected", rejected)):
        ids = np.full((2, seq_len), pad_id, np.int32)
        segments = np.zeros((2, seq_len), np.int32)
        positions = np.zeros((2, seq_len), np.int32)
        for b, row in enumerate(rows):
            span = slice(seq_len - row.size, seq_len) if left else slice(0, row.size)
            ids[b, span], segments[b, span], positions[b, span] = row, 1, np.arange(row.size)
        batch.update({f"{name}_input_ids": ids, f"{name}_segment_ids": segments, f"{name}_positions": positions})
    batch.update(margin=np.zeros(2, np.float32), pair_mask=np.ones(2, np.float32), strength=np.array([0, 1]))
    return batch


def test_rewards_do_not_depend_on_padding_side_or_pad_id(score_model):
    model, params = score_model
    rewards = jax.jit(lambda p, b: pair_rewards(model, p, b))
    expected = np.asarray(rewards(params, pair_batch(pad_id=0, left=False)))
    for pad_id, left in ((0, True), (2, False), (2, True)):  # pad == eos (2) on both sides
        np.testing.assert_allclose(np.asarray(rewards(params, pair_batch(pad_id, left))), expected, rtol=1e-5,
                                   atol=1e-6, err_msg=f"pad {pad_id}, left {left}")


def test_loss_fn_is_the_mean_over_real_pairs(score_model):
    model, params = score_model
    batch = pair_batch(pad_id=0, left=False)
    batch["pair_mask"] = np.array([1.0, 0.0], np.float32)
    objective, metrics = make_loss_fn(model)(params, batch, None)
    r_chosen, r_rejected = pair_rewards(model, params, batch)
    assert float(objective.count) == 1.0
    assert float(objective.total) == pytest.approx(float(pairwise_loss(r_chosen, r_rejected)[0]), rel=1e-6)
    assert float(metrics["accuracy"].count) == 1.0
