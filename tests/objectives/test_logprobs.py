import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.errors import JaxalignError
from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM
from jaxalign.objectives.logprobs import (
    entropy_from_logits,
    model_token_log_probs,
    model_token_statistics,
    sequence_log_probs,
    token_log_probs,
)

from tests.params import init_params


def test_hand_computed_values_with_and_without_temperature():
    logits = jnp.log(jnp.array([1.0, 2.0, 5.0]))
    assert float(token_log_probs(logits, jnp.array(2))) == pytest.approx(math.log(5 / 8), abs=1e-6)
    assert float(token_log_probs(logits, jnp.array(0))) == pytest.approx(math.log(1 / 8), abs=1e-6)
    halved = 1 + math.sqrt(2) + math.sqrt(5)
    assert float(token_log_probs(logits, jnp.array(1), temperature=2.0)) == pytest.approx(
        math.log(math.sqrt(2) / halved), abs=1e-6
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_matches_log_softmax_of_the_tempered_logits(temperature):
    logits = jax.random.normal(jax.random.key(0), (2, 5, 13)) * 4
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 13)
    expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits / temperature)), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_log_probs(logits, targets, temperature), expected, rtol=1e-6, atol=1e-6)


def test_temperature_may_be_traced_or_an_array():
    logits = jax.random.normal(jax.random.key(2), (3, 11)) * 3
    targets = jnp.array([0, 4, 10])
    expected = token_log_probs(logits, targets, 0.5)
    np.testing.assert_allclose(jax.jit(token_log_probs)(logits, targets, 0.5), expected, rtol=1e-6)
    per_row = jnp.array([0.5, 1.0, 2.0])
    for row, temperature in enumerate([0.5, 1.0, 2.0]):
        np.testing.assert_allclose(
            token_log_probs(logits, targets, per_row)[row], token_log_probs(logits[row], targets[row], temperature),
            rtol=1e-6,
        )


def test_bf16_logits_are_upcast_before_tempering():
    logits = (jax.random.normal(jax.random.key(3), (4, 7, 29)) * 6).astype(jnp.bfloat16)
    targets = jax.random.randint(jax.random.key(4), (4, 7), 0, 29)
    log_probs = token_log_probs(logits, targets, 0.6)
    assert log_probs.dtype == jnp.float32
    expected = jax.nn.log_softmax(logits.astype(jnp.float32) / 0.6)
    np.testing.assert_allclose(log_probs, np.take_along_axis(np.asarray(expected), targets[..., None], -1)[..., 0],
                               rtol=1e-6, atol=1e-6)


def test_stable_for_huge_bf16_logits():
    logits = jnp.array([[[16384.0, 0.0, -16384.0]]], jnp.bfloat16)
    assert float(token_log_probs(logits, jnp.array([[0]]))[0, 0]) == pytest.approx(0.0, abs=1e-6)
    assert float(token_log_probs(logits, jnp.array([[1]]))[0, 0]) == pytest.approx(-16384.0, rel=1e-6)
    assert float(token_log_probs(logits, jnp.array([[1]]), 0.5)[0, 0]) == pytest.approx(-32768.0, rel=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_is_refused(temperature):
    with pytest.raises(JaxalignError, match="temperature must be > 0"):
        token_log_probs(jnp.zeros((3,)), jnp.array(0), temperature)


def test_sequence_sums_and_counts_only_masked_tokens():
    token_logps = jnp.array([[-1.0, -2.0, -0.5, jnp.nan], [-3.0, -jnp.inf, -1.5, -0.25]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 1]])
    total, count = sequence_log_probs(token_logps, mask)
    np.testing.assert_allclose(total, [-3.5, -3.25])
    np.testing.assert_array_equal(count, [3.0, 2.0])
    assert total.dtype == count.dtype == jnp.float32


def test_entropy_from_logits():
    logits = jnp.array([[[0.0, math.log(3.0)], [1.0, 1.0]], [[jnp.nan, jnp.nan], [0.0, -jnp.inf]]], jnp.float32)
    mask = jnp.array([[1, 1], [0, 1]], jnp.float32)
    # p = (1/4, 3/4): H = -(.25 ln .25 + .75 ln .75); uniform over 2: ln 2; one sure token: 0
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    entropy = entropy_from_logits(logits, mask)
    np.testing.assert_allclose(entropy, [[h0, math.log(2)], [0, 0]], atol=1e-6)
    # temperature 2 on [0, ln 3]: p ∝ (1, √3)
    p = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]
    np.testing.assert_allclose(entropy_from_logits(logits, mask, temperature=2.0)[0, 0],
                               -sum(q * math.log(q) for q in p), atol=1e-6)
    grad = jax.grad(lambda z: jnp.sum(entropy_from_logits(z, mask)))(logits)
    assert np.isfinite(grad).all()
    with pytest.raises(JaxalignError, match="temperature"):
        entropy_from_logits(logits, mask, temperature=0.0)


@pytest.fixture(scope="module")
def tiny_lm():
    config = LlamaConfig.tiny(residual_dropout=(0.1, 0.1))
    params = init_params(LlamaForCausalLM(config), jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": jnp.asarray(rng.integers(3, 256, (2, 21)), jnp.int32),
        "targets": jnp.asarray(rng.integers(3, 256, (2, 21)), jnp.int32),
        "segment_ids": jnp.asarray([[1] * 12 + [2] * 6 + [0] * 3, [1] * 21], jnp.int32),
        "positions": jnp.asarray([list(range(12)) + list(range(6)) + [0] * 3, list(range(21))], jnp.int32),
        "loss_mask": jnp.asarray([[0] * 4 + [1] * 8 + [0] * 2 + [1] * 4 + [0] * 3, [0] * 10 + [1] * 11], jnp.int32),
    }
    return config, params, batch


def full_logits(config, params, batch, rng=None):
    return LlamaForCausalLM(config).apply(
        {"params": params}, batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"],
        deterministic=rng is None, rngs=None if rng is None else {"dropout": rng})


@pytest.fixture(scope="module")
def full_reference(tiny_lm):
    """From the full logits of `tiny_lm`: its logits, and the gradient of the sum of masked log-probs and entropies
    at temperature 0.9."""
    config, params, batch = tiny_lm

    def full(p):
        out = full_logits(config, p, batch)
        return (jnp.sum(token_log_probs(out, batch["targets"], 0.9) * batch["loss_mask"])
                + jnp.sum(entropy_from_logits(out, batch["loss_mask"], 0.9)))

    return jax.jit(full_logits, static_argnums=0)(config, params, batch), jax.jit(jax.grad(full))(params)


@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_statistics_by_slices_equal_those_of_the_full_logits(tiny_lm, full_reference, chunk):
    config, params, batch = tiny_lm
    logits, full_grad = full_reference
    model = LlamaForCausalLM(dataclasses.replace(config, logits_chunk_length=chunk))
    temperature = jnp.asarray([[0.7], [1.3]])
    stats = jax.jit(lambda p: model_token_statistics(model, p, batch, temperature=temperature, entropy=True,
                                                     correct=True))(params)
    np.testing.assert_allclose(stats.log_probs, token_log_probs(logits, batch["targets"], temperature), atol=2e-6)
    np.testing.assert_allclose(stats.entropy, entropy_from_logits(logits, batch["loss_mask"], temperature),
                               atol=2e-6)
    np.testing.assert_array_equal(stats.correct, jnp.argmax(logits, -1) == batch["targets"])
    assert stats.log_probs.shape == stats.entropy.shape == stats.correct.shape == (2, 21)

    def sliced(p):
        out = model_token_statistics(model, p, batch, temperature=0.9, entropy=True)
        return jnp.sum(out.log_probs * batch["loss_mask"]) + jnp.sum(out.entropy)

    for got, want in zip(jax.tree.leaves(jax.jit(jax.grad(sliced))(params)), jax.tree.leaves(full_grad)):
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-4)


def test_log_probs_are_deterministic_without_an_rng_and_draw_dropout_from_one(tiny_lm, full_reference):
    config, params, batch = tiny_lm
    model = LlamaForCausalLM(dataclasses.replace(config, logits_chunk_length=5))
    key = jax.random.key(3)
    expected = token_log_probs(full_logits(config, params, batch, key), batch["targets"])
    np.testing.assert_allclose(model_token_log_probs(model, params, batch, rng=key), expected, atol=2e-6)
    deterministic = model_token_log_probs(model, params, batch)
    assert not np.allclose(deterministic, expected, atol=1e-3)
    np.testing.assert_allclose(deterministic, token_log_probs(full_reference[0], batch["targets"]), atol=2e-6)


def test_a_128k_vocabulary_step_holds_less_than_its_full_logits():
    config = LlamaConfig.tiny(vocab_size=128256, max_position_embeddings=2048)
    model = LlamaForCausalLM(config)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    length = 2048
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    batch = {"input_ids": ids, "targets": ids, "segment_ids": ids, "positions": ids, "loss_mask": ids}

    def loss(p, b):
        return -jnp.sum(model_token_log_probs(model, p, b) * b["loss_mask"])

    memory = jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile().memory_analysis()
    full_logits_bytes = length * config.vocab_size * 4
    assert memory.temp_size_in_bytes < full_logits_bytes / 2


def test_slices_not_needed_skip_the_head_and_leave_needed_values_and_gradients_unchanged(tiny_lm, full_reference):
    config, params, batch = tiny_lm
    logits, full_grad = full_reference
    model = LlamaForCausalLM(dataclasses.replace(config, logits_chunk_length=4))
    unsliced = LlamaForCausalLM(config)
    needed = batch["loss_mask"]
    # needed first: row 0's 12 needed positions, row 1's 11 (10-20) fill slices 0-2 (order 0-11); order 12-20 is
    # needed in no row, so skipped: all 9 unneeded positions of row 0 and positions 1-9 of row 1 (its position 0
    # sits at order 11, computed)
    skipped = np.zeros((2, 21), bool)
    skipped[0] = np.asarray(needed[0]) == 0
    skipped[1, 1:10] = True

    def sliced(p):
        out = model_token_statistics(model, p, batch, temperature=0.9, entropy=True, needed=needed)
        return jnp.sum(out.log_probs * batch["loss_mask"]) + jnp.sum(out.entropy)

    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        stats = jax.jit(lambda p: model_token_statistics(model, p, batch, temperature=0.9, entropy=True,
                                                         correct=True, needed=needed))(params)
        grads = jax.jit(jax.grad(sliced))(params)
        nothing_needed = model_token_log_probs(model, params, batch, needed=jnp.zeros_like(needed))
        one_slice = [model_token_log_probs(unsliced, params, batch, needed=n) for n in (needed, 0 * needed)]
    expected = (token_log_probs(logits, batch["targets"], 0.9), entropy_from_logits(logits, batch["loss_mask"], 0.9),
                (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32))
    for got, want in zip(stats, expected):
        np.testing.assert_allclose(got, np.where(skipped, 0.0, want), atol=2e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grad)):
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-4)
    np.testing.assert_array_equal(nothing_needed, np.zeros((2, 21)))
    np.testing.assert_allclose(one_slice[0], token_log_probs(logits, batch["targets"]), atol=2e-6)
    np.testing.assert_array_equal(one_slice[1], np.zeros((2, 21)))


def test_needed_is_ignored_on_a_mesh_of_several_devices(tiny_lm, full_reference):
    config, params, batch = tiny_lm
    model = LlamaForCausalLM(dataclasses.replace(config, logits_chunk_length=4))
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    log_probs = jax.jit(lambda p, b: model_token_log_probs(model, p, b, needed=b["loss_mask"]))(
        params, jax.device_put(batch, rows))
    assert log_probs.sharding.num_devices == 2
    np.testing.assert_allclose(log_probs, token_log_probs(full_reference[0], batch["targets"]), atol=2e-6)
