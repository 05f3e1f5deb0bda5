"""Samplers (greedy, temperature, top-k, top-p) and KV-cache generation against transformers and a full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.errors import JaxalignError
from jaxalign.sampling import SamplingParams, process_logits, sample_logits, token_logprobs

DRAWS = 20000


def _logits(vocab=50, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(vocab,)) * 2.0, jnp.float32)


def _draw(logits, params, seed=0, draws=DRAWS):
    batch = jnp.broadcast_to(logits, (draws, logits.shape[-1]))
    return np.asarray(jax.jit(sample_logits, static_argnums=2)(jax.random.key(seed), batch, params))


def _nucleus(logits, temperature, top_p):
    """Reference top-p set in numpy: the most likely tokens until their mass reaches top_p."""
    probs = np.exp(logits / temperature - np.max(logits / temperature))
    probs /= probs.sum()
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    return set(order[mass_before < top_p].tolist())


def test_greedy_is_argmax_and_ignores_rng():
    logits = jnp.stack([_logits(seed=s) for s in range(4)])
    greedy = SamplingParams(temperature=0.0)
    tokens = sample_logits(jax.random.key(1), logits, greedy)
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), axis=-1))
    np.testing.assert_array_equal(tokens, sample_logits(jax.random.key(2), logits, greedy))


def test_fixed_rng_reproduces_and_different_rng_differs():
    logits = _logits()
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
    first = _draw(logits, params, seed=3, draws=256)
    np.testing.assert_array_equal(first, _draw(logits, params, seed=3, draws=256))
    assert not np.array_equal(first, _draw(logits, params, seed=4, draws=256))


def test_top_k_never_leaves_the_k_most_likely_and_covers_them_in_proportion():
    logits = _logits()
    params = SamplingParams(temperature=0.7, top_k=5)
    tokens = _draw(logits, params)
    allowed = np.argsort(-np.asarray(logits))[:5]
    assert set(np.unique(tokens)) <= set(allowed.tolist())
    tempered = np.asarray(logits)[allowed] / 0.7
    expected = np.exp(tempered - tempered.max())
    expected /= expected.sum()
    observed = np.array([(tokens == t).mean() for t in allowed])
    np.testing.assert_allclose(observed, expected, atol=4 * np.sqrt(0.25 / DRAWS))


def test_top_k_keeps_exactly_k_tokens_when_logits_tie():
    logits = jnp.zeros((10,), jnp.float32)
    tokens = _draw(logits, SamplingParams(top_k=3))
    assert len(np.unique(tokens)) == 3


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.5), (1.0, 0.9), (0.5, 0.8), (1.5, 0.3)])
def test_top_p_never_leaves_the_nucleus(temperature, top_p):
    logits = _logits(seed=5)
    tokens = _draw(logits, SamplingParams(temperature=temperature, top_p=top_p))
    nucleus = _nucleus(np.asarray(logits), temperature, top_p)
    assert set(np.unique(tokens).tolist()) <= nucleus
    assert len(np.unique(tokens)) == len(nucleus)


def test_top_k_then_top_p_applies_both_limits():
    logits = _logits(seed=6)
    params = SamplingParams(temperature=1.0, top_k=8, top_p=0.6)
    tokens = _draw(logits, params)
    top8 = np.argsort(-np.asarray(logits))[:8]
    restricted = np.full_like(np.asarray(logits), -np.inf)
    restricted[top8] = np.asarray(logits)[top8]
    assert set(np.unique(tokens).tolist()) <= _nucleus(restricted, 1.0, 0.6)


def test_sample_frequencies_follow_process_logits():
    logits = _logits(seed=7, vocab=20)
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.95)
    tokens = _draw(logits, params)
    probs = np.asarray(jax.nn.softmax(process_logits(logits, params)))
    observed = np.bincount(tokens, minlength=20) / DRAWS
    np.testing.assert_allclose(observed, probs, atol=4 * np.sqrt(0.25 / DRAWS))
    assert np.all(observed[probs == 0] == 0)


def test_process_logits_greedy_keeps_only_argmax():
    logits = _logits()
    processed = np.asarray(process_logits(logits, SamplingParams(temperature=0.0)))
    assert np.isfinite(processed).sum() == 1
    assert np.argmax(processed) == np.argmax(np.asarray(logits))


def test_token_logprobs_are_raw_log_softmax():
    logits = jnp.stack([_logits(seed=s) for s in range(3)])
    tokens = jnp.array([1, 7, 30])
    expected = np.asarray(jax.nn.log_softmax(logits))[np.arange(3), np.asarray(tokens)]
    np.testing.assert_allclose(token_logprobs(logits, tokens), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,key", [({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p")]
)
def test_bad_sampling_params_name_the_setting(kwargs, key):
    with pytest.raises(JaxalignError, match=key):
        SamplingParams(**kwargs)
