import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.errors import JaxalignError
from jaxalign.objectives.logprobs import model_token_log_probs, sequence_log_probs, token_log_probs


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


class TableModel:
    """Logits looked up per input token; records how it was called."""

    def apply(self, variables, input_ids, positions=None, segment_ids=None, deterministic=True, rngs=None):
        self.last_call = {"positions": positions, "segment_ids": segment_ids, "deterministic": deterministic,
                          "rngs": rngs}
        return variables["params"]["table"][input_ids]


def test_model_token_log_probs_runs_the_batch_through_the_model():
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(11, 11)) * 3, jnp.float32)
    batch = {
        "input_ids": rng.integers(0, 11, (2, 6), dtype=np.int32),
        "targets": rng.integers(0, 11, (2, 6), dtype=np.int32),
        "segment_ids": np.ones((2, 6), np.int32),
        "positions": np.broadcast_to(np.arange(6, dtype=np.int32), (2, 6)).copy(),
    }
    model = TableModel()
    log_probs = model_token_log_probs(model, {"table": table}, batch, temperature=0.8)
    expected = np.asarray(jax.nn.log_softmax(table[batch["input_ids"]] / 0.8))
    np.testing.assert_allclose(log_probs, np.take_along_axis(expected, batch["targets"][..., None], -1)[..., 0],
                               rtol=1e-6, atol=1e-6)
    assert model.last_call["positions"] is batch["positions"] and model.last_call["segment_ids"] is batch["segment_ids"]
    assert model.last_call["deterministic"] is True and model.last_call["rngs"] is None
    key = jax.random.key(1)
    model_token_log_probs(model, {"table": table}, batch, rng=key)
    assert model.last_call["deterministic"] is False and model.last_call["rngs"]["dropout"] is key
