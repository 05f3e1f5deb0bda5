"""Scalar head on the LLaMA trunk."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models.heads import LlamaForScore, last_token_scores, score_params_from_causal_lm
from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM, LlamaModel, logical_axes

from tests.params import init_params


def test_scores_are_a_linear_head_on_the_trunk_hidden_states():
    config = LlamaConfig.tiny(dtype="bfloat16")
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 6), 3, config.vocab_size)
    lm_params = init_params(LlamaForCausalLM(config), jax.random.PRNGKey(1), ids)
    model = LlamaForScore(config)
    params = init_params(model, jax.random.PRNGKey(2), ids)
    params = score_params_from_causal_lm(lm_params, params)
    assert set(params["score"]) == {"kernel"}  # bias-free, as transformers' sequence classifiers
    scores = model.apply({"params": params}, ids)
    assert scores.shape == (2, 6) and scores.dtype == jnp.float32
    hidden = LlamaModel(config).apply({"params": lm_params["model"]}, ids)
    expected = hidden.astype(jnp.float32) @ params["score"]["kernel"].astype(jnp.bfloat16).astype(jnp.float32)
    np.testing.assert_allclose(scores, expected, atol=1e-2)
    assert tuple(logical_axes(model)["score"]["kernel"]) == ("embed",)


def test_last_token_scores_skips_padding_on_either_side():
    scores = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
    segment_ids = jnp.asarray([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(last_token_scores(scores, segment_ids), [1.0, 7.0, 8.0])
