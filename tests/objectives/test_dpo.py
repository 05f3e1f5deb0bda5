"""The DPO-family losses against hand-computed values, their metrics, and the loss function on a tiny model: a live
reference and reference log-probs carried in the batch give the same losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.data import packing
from jaxalign.errors import JaxalignError
from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM
from jaxalign.objectives import dpo

from tests.params import init_params


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def one(x: float) -> jax.Array:
    return jnp.asarray([x], jnp.float32)


def loss(loss_type, pc, pr, rc, rr, beta, **settings) -> float:
    settings = {k: one(v) if k.endswith("_count") else v for k, v in settings.items()}
    ref = (one(rc), one(rr)) if rc is not None else (None, None)
    return float(dpo.preference_loss(loss_type, one(pc), one(pr), *ref, beta, **settings)[0])


# π_c = -10, π_r = -12, ref_c = ref_r = -11, β = 0.1: z = 2, βz = 0.2.
@pytest.mark.parametrize("loss_type, settings, expected", [
    ("sigmoid", {}, softplus(-0.2)),  # 0.598139
    ("hinge", {}, 0.8),
    ("sigmoid", {"label_smoothing": 0.1}, 0.9 * softplus(-0.2) + 0.1 * softplus(0.2)),  # cDPO: 0.618139
    ("robust", {"label_smoothing": 0.1}, (0.9 * softplus(-0.2) - 0.1 * softplus(0.2)) / 0.8),  # 0.573139
    # IPO on per-token averages over 4 tokens: z = (-2.5 + 3) - (-2.75 + 2.75) = 0.5; (0.5 - 1/(2·0.1))² = 20.25
    ("ipo", {"chosen_count": 4.0, "rejected_count": 4.0}, 20.25),
])
def test_losses_with_a_reference_match_hand_values(loss_type, settings, expected):
    assert loss(loss_type, -10.0, -12.0, -11.0, -11.0, 0.1, **settings) == pytest.approx(expected, rel=1e-6)


def test_published_hand_check_values():
    assert loss("sigmoid", -10.0, -12.0, -11.0, -11.0, 0.1) == pytest.approx(0.598139, abs=1e-6)
    assert loss("sigmoid", -10.0, -12.0, -11.0, -11.0, 0.1, label_smoothing=0.1) == pytest.approx(0.618139, abs=1e-6)


def test_simpo_averages_per_token_and_subtracts_gamma():
    # π̄_c = -10/5 = -2, π̄_r = -12/4 = -3, β 2, γ 0.5: -log σ(2·1 - 0.5)
    value = loss("simpo", -10.0, -12.0, None, None, 2.0, chosen_count=5.0, rejected_count=4.0, simpo_gamma=0.5)
    assert value == pytest.approx(softplus(-1.5), rel=1e-6)


def test_orpo_is_the_chosen_nll_plus_the_weighted_odds_ratio_loss():
    # π̄_c = -2/2 = -1, π̄_r = -6/3 = -2; log-odds = π̄ - log(1 - exp π̄)
    odds_c = -1.0 - math.log(1.0 - math.exp(-1.0))
    odds_r = -2.0 - math.log(1.0 - math.exp(-2.0))
    expected = 1.0 + 0.1 * softplus(-(odds_c - odds_r))
    assert loss("orpo", -2.0, -6.0, None, None, 0.1, chosen_count=2.0, rejected_count=3.0) == pytest.approx(expected,
                                                                                                          rel=1e-6)


def test_sigmoid_dpo_is_ln2_when_the_policy_is_the_reference():
    logps = jnp.asarray([-3.0, -40.5, -7.25], jnp.float32)
    other = jnp.asarray([-5.0, -1.0, -90.0], jnp.float32)
    values = dpo.preference_loss("sigmoid", logps, other, logps, other, 0.1)
    np.testing.assert_array_equal(values, np.full(3, math.log(2.0), np.float32))


def test_large_margins_give_finite_losses_and_gradients():
    def total(pc):
        return jnp.sum(dpo.preference_loss("sigmoid", pc, one(0.0), one(0.0), one(0.0), 1.0, label_smoothing=0.2))

    for value in (-1e4, 1e4):
        assert np.isfinite(float(total(one(value)))) and np.isfinite(float(jax.grad(total)(one(value))[0]))


def test_kto_losses_match_hand_values():
    # ρ = -10 - (-12) = 2, KL 0.5, β 0.1: desirable 1 - σ(0.15), undesirable 1 - σ(-0.15), each with its weight
    values = dpo.kto_loss(jnp.asarray([-10.0, -10.0]), jnp.asarray([-12.0, -12.0]), jnp.asarray([1.0, 0.0]), 0.5, 0.1,
                          desirable_weight=1.0, undesirable_weight=1.5)
    np.testing.assert_allclose(values, [1 - sigmoid(0.15), 1.5 * (1 - sigmoid(-0.15))], rtol=1e-6)


def test_kto_reference_point_is_the_clipped_detached_mean_over_real_rows():
    mask = jnp.asarray([1.0, 1.0, 0.0])
    point = dpo.kto_reference_point(jnp.asarray([-1.0, -2.0, 50.0]), jnp.asarray([-2.0, -2.0, 0.0]), mask)
    assert float(point) == pytest.approx(0.5)
    assert float(dpo.kto_reference_point(jnp.asarray([-3.0]), jnp.asarray([-1.0]), jnp.ones(1))) == 0.0
    assert float(jax.grad(lambda p: dpo.kto_reference_point(p, jnp.zeros(3), mask))(jnp.ones(3)).sum()) == 0.0


def test_bad_calls_name_what_is_missing():
    with pytest.raises(JaxalignError, match="unknown preference loss type 'dpo'"):
        dpo.preference_loss("dpo", one(0), one(0), one(0), one(0), 0.1)
    with pytest.raises(JaxalignError, match="chosen_count and rejected_count"):
        dpo.preference_loss("ipo", one(0), one(0), one(0), one(0), 0.1)
    with pytest.raises(JaxalignError, match="needs the reference"):
        dpo.preference_loss("hinge", one(0), one(0), None, None, 0.1)


def test_pair_metrics_are_trls_implicit_rewards_over_real_pairs():
    policy = (jnp.asarray([-10.0, -4.0, 0.0]), jnp.asarray([-12.0, -3.0, 0.0]))
    ref = (jnp.asarray([-11.0, -5.0, 0.0]), jnp.asarray([-11.0, -5.0, 0.0]))
    counts = (jnp.ones(3), jnp.ones(3))
    mask = jnp.asarray([1.0, 1.0, 0.0])
    metrics = dpo.pair_metrics("sigmoid", 0.5, policy, ref, counts, jnp.zeros(3), mask)
    values = {k: m.value() for k, m in metrics.items()}
    # chosen rewards 0.5·(1, 1), rejected 0.5·(-1, 2)
    assert values["rewards/chosen"] == pytest.approx(0.5)
    assert values["rewards/rejected"] == pytest.approx(0.25)
    assert values["rewards/margins"] == pytest.approx(0.25)
    assert values["rewards/accuracies"] == pytest.approx(0.5)
    assert values["logps/chosen"] == pytest.approx(-7.0) and values["logps/rejected"] == pytest.approx(-7.5)


@pytest.fixture(scope="module")
def tiny_policy_and_batch():
    config = LlamaConfig.tiny(vocab_size=40, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    init = lambda seed: init_params(model, jax.random.PRNGKey(seed))  # noqa: E731
    rng = np.random.default_rng(0)

    def half(prompt, answer):
        ids = np.concatenate([prompt, answer]).astype(np.int32)
        return ids, np.concatenate([np.zeros(prompt.size, bool), np.ones(answer.size, bool)])

    pairs = []
    for n_prompt, n_chosen, n_rejected in ((5, 4, 7), (3, 9, 2), (8, 1, 1)):
        prompt = rng.integers(1, 40, n_prompt)
        pairs.append((half(prompt, rng.integers(1, 40, n_chosen)), half(prompt, rng.integers(1, 40, n_rejected)), -1, -1))
    batch = packing.preference_batch(pairs + [None], 20, 0)
    batch["example_index"] = np.asarray([0, 1, 2, -1], np.int32)
    return model, init(0), init(1), batch


def test_sequence_log_probs_sum_the_response_tokens_only(tiny_policy_and_batch):
    model, params, _, batch = tiny_policy_and_batch
    (chosen, chosen_count), (rejected, rejected_count) = dpo.stacked_sequence_log_probs(
        model, params, batch, ("chosen_", "rejected_"))
    np.testing.assert_array_equal(chosen_count, [4, 9, 1, 0])
    np.testing.assert_array_equal(rejected_count, [7, 2, 1, 0])
    logits = model.apply({"params": params}, jnp.asarray(batch["chosen_input_ids"][:1, :9]))
    logps = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
    ids = batch["chosen_input_ids"][0]
    by_hand = sum(float(logps[t - 1, ids[t]]) for t in range(5, 9))  # the 4 answer tokens after a 5-token prompt
    assert float(chosen[0]) == pytest.approx(by_hand, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_live_and_batch_reference_give_the_same_loss(tiny_policy_and_batch, loss_type):
    model, params, ref_params, batch = tiny_policy_and_batch
    settings = dpo.LossSettings(type=loss_type, beta=0.1)
    live = dpo.make_loss_fn(model, settings, reference_model=model)
    stored = dpo.make_loss_fn(model, settings)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    with_ref = {**batch, **dpo.reference_log_probs(model, ref_params, batch, "preference")}
    objective, metrics = live(params, ref_params, batch, None)
    objective_stored, metrics_stored = stored(params, None, with_ref, None)
    assert float(objective.count) == 3.0
    assert objective.value() == pytest.approx(objective_stored.value(), rel=1e-6)
    for key in metrics:
        assert metrics[key].value() == pytest.approx(metrics_stored[key].value(), rel=1e-6, abs=1e-7)
    at_init, _ = live(params, params, batch, None)
    if loss_type == "sigmoid":
        assert at_init.value() == pytest.approx(math.log(2.0), rel=1e-7)


def test_kto_needs_unpaired_data_and_pairs_need_the_pair_losses(tiny_policy_and_batch):
    model = tiny_policy_and_batch[0]
    with pytest.raises(JaxalignError, match="'kto' does not train on preference examples"):
        dpo.make_loss_fn(model, dpo.LossSettings(type="kto"), "preference")
    with pytest.raises(JaxalignError, match="'sigmoid' does not train on unpaired examples"):
        dpo.make_loss_fn(model, dpo.LossSettings(type="sigmoid"), "unpaired")
