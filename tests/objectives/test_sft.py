import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.errors import JaxalignError
from jaxalign.objectives.sft import make_loss_fn, perplexity, resize_embeddings

from tests.params import init_params


class TableModel:
    """Hidden states looked up per input token and used as the logits: enough to check masking and sums without a
    transformer."""

    config = types.SimpleNamespace(vocab_size=11, logits_chunk_length=None)

    def apply(self, variables, inputs, positions=None, segment_ids=None, deterministic=True, rngs=None, method=None):
        if method == "logits":
            return inputs
        self.last_call = {"deterministic": deterministic, "rngs": rngs}
        return variables["params"]["table"][inputs]


def lm_batch(rng, batch=3, length=7, vocab=11):
    input_ids = rng.integers(0, vocab, (batch, length), dtype=np.int32)
    return {
        "input_ids": input_ids,
        "targets": rng.integers(0, vocab, (batch, length), dtype=np.int32),
        "loss_mask": (rng.random((batch, length)) < 0.6).astype(np.int32),
        "segment_ids": np.ones((batch, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
    }


def test_loss_sums_only_trained_tokens():
    rng = np.random.default_rng(0)
    batch = lm_batch(rng)
    table = jnp.asarray(rng.normal(size=(11, 11)), jnp.float32)
    model = TableModel()
    objective, metrics = make_loss_fn(model)({"table": table}, batch, None)
    log_probs = np.asarray(jax.nn.log_softmax(table[batch["input_ids"]]))
    picked = np.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    assert float(objective.total) == pytest.approx(-(picked * batch["loss_mask"]).sum(), rel=1e-5)
    assert float(objective.count) == batch["loss_mask"].sum()
    predicted = np.argmax(log_probs, axis=-1)
    assert float(metrics["correct"].total) == ((predicted == batch["targets"]) * batch["loss_mask"]).sum()
    assert float(metrics["correct"].count) == batch["loss_mask"].sum()
    assert model.last_call == {"deterministic": True, "rngs": None}


def test_loss_sums_add_over_batch_splits():
    rng = np.random.default_rng(1)
    batch = lm_batch(rng, batch=4)
    params = {"table": jnp.asarray(rng.normal(size=(11, 11)), jnp.float32)}
    loss_fn = make_loss_fn(TableModel())
    whole, _ = loss_fn(params, batch, None)
    halves = [loss_fn(params, {k: v[i : i + 2] for k, v in batch.items()}, None)[0] for i in (0, 2)]
    pooled = halves[0] + halves[1]
    assert float(pooled.total) == pytest.approx(float(whole.total), rel=1e-6)
    assert float(pooled.count) == float(whole.count)


def test_rng_switches_to_training_mode():
    rng = np.random.default_rng(2)
    model = TableModel()
    key = jax.random.key(3)
    make_loss_fn(model)({"table": jnp.zeros((11, 11))}, lm_batch(rng), key)
    assert model.last_call["deterministic"] is False
    assert model.last_call["rngs"]["dropout"] is key


def test_perplexity_is_exp_of_mean_eval_loss():
    assert perplexity({"step": 3, "eval_loss": 1.5}) == {"eval_perplexity": pytest.approx(math.exp(1.5))}
    assert math.isfinite(perplexity({"eval_loss": 1e6})["eval_perplexity"])


@pytest.fixture(scope="module")
def tiny_model():
    from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.tiny(vocab_size=64)
    model = LlamaForCausalLM(config)
    return config, model, init_params(model, jax.random.key(0))


def test_resize_embeddings_appends_mean_rows_and_keeps_old_logits(tiny_model):
    from jaxalign.models.llama import LlamaForCausalLM

    config, model, params = tiny_model
    new_params, new_config = resize_embeddings(params, config, 66)
    assert new_config.vocab_size == 66
    embedding = np.asarray(new_params["model"]["embed_tokens"]["embedding"])
    kernel = np.asarray(new_params["lm_head"]["kernel"])
    assert embedding.shape == (66, config.hidden_size) and kernel.shape == (config.hidden_size, 66)
    old_embedding = np.asarray(params["model"]["embed_tokens"]["embedding"])
    np.testing.assert_allclose(embedding[64], old_embedding.mean(axis=0), atol=1e-7)
    np.testing.assert_allclose(embedding[65], embedding[64])
    np.testing.assert_allclose(kernel[:, 65], np.asarray(params["lm_head"]["kernel"]).mean(axis=1), atol=1e-7)
    tokens = jnp.array([[5, 9, 3, 7]], jnp.int32)
    old_logits = model.apply({"params": params}, tokens)
    new_logits = LlamaForCausalLM(new_config).apply({"params": new_params}, tokens)
    np.testing.assert_allclose(new_logits[..., :64], old_logits, rtol=1e-5, atol=1e-5)


def test_resize_embeddings_leaves_a_table_that_already_fits_unchanged(tiny_model):
    config, _, params = tiny_model
    assert resize_embeddings(params, config, 64) == (params, config)
    assert resize_embeddings(params, config, 60) == (params, config)
    with pytest.raises(JaxalignError, match=r"added token ids \[64\] are not ids of a tokenizer with 60 tokens"):
        resize_embeddings(params, config, 60, [59, 64])


def test_added_tokens_on_the_padding_rows_of_a_padded_table_get_the_mean_of_the_real_rows(tiny_model):
    """A 64-row table for a tokenizer of 60 tokens (rows 60-63 padding, as Qwen2 pads), then two added tokens."""
    from jaxalign.models.llama import LlamaForCausalLM

    config, model, params = tiny_model
    old_embedding = np.asarray(params["model"]["embed_tokens"]["embedding"])
    old_kernel = np.asarray(params["lm_head"]["kernel"])
    new_params, new_config = resize_embeddings(params, config, 62, [60, 61])
    assert new_config.vocab_size == 64
    embedding = np.asarray(new_params["model"]["embed_tokens"]["embedding"])
    kernel = np.asarray(new_params["lm_head"]["kernel"])
    assert embedding.shape == old_embedding.shape and kernel.shape == old_kernel.shape
    for new_id in (60, 61):
        np.testing.assert_allclose(embedding[new_id], old_embedding[:60].mean(axis=0), atol=1e-7)
        np.testing.assert_allclose(kernel[:, new_id], old_kernel[:, :60].mean(axis=1), atol=1e-7)
    np.testing.assert_array_equal(embedding[:60], old_embedding[:60])
    np.testing.assert_array_equal(embedding[62:], old_embedding[62:])
    np.testing.assert_array_equal(kernel[:, 62:], old_kernel[:, 62:])
    tokens = jnp.array([[5, 9, 3, 7]], jnp.int32)
    old_logits = model.apply({"params": params}, tokens)
    new_logits = LlamaForCausalLM(new_config).apply({"params": new_params}, tokens)
    np.testing.assert_allclose(new_logits[..., :60], old_logits[..., :60], rtol=1e-5, atol=1e-5)


def test_added_tokens_past_a_padded_table_grow_it_and_share_the_same_mean(tiny_model):
    config, _, params = tiny_model
    old_embedding = np.asarray(params["model"]["embed_tokens"]["embedding"])
    new_params, new_config = resize_embeddings(params, config, 66, [62, 63, 64, 65])
    embedding = np.asarray(new_params["model"]["embed_tokens"]["embedding"])
    assert new_config.vocab_size == 66 and embedding.shape[0] == 66
    mean = old_embedding[:62].mean(axis=0)
    np.testing.assert_allclose(embedding[62:], np.broadcast_to(mean, (4, mean.size)), atol=1e-7)
    np.testing.assert_array_equal(embedding[:62], old_embedding[:62])


def test_an_added_token_inside_the_tokenizer_range_is_averaged_over_the_other_tokens(tiny_model):
    config, _, params = tiny_model
    old_embedding = np.asarray(params["model"]["embed_tokens"]["embedding"])
    new_params, _ = resize_embeddings(params, config, 64, [10])
    embedding = np.asarray(new_params["model"]["embed_tokens"]["embedding"])
    np.testing.assert_allclose(embedding[10], np.delete(old_embedding, 10, axis=0).mean(axis=0), atol=1e-7)


def test_residual_dropout_is_active_only_with_an_rng():
    from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=11, residual_dropout=(0.0, 0.3)))
    params = init_params(model, jax.random.key(0))
    batch = lm_batch(np.random.default_rng(4))
    loss_fn = jax.jit(make_loss_fn(model))
    deterministic = float(loss_fn(params, batch, None)[0].total)
    first = float(loss_fn(params, batch, jax.random.key(1))[0].total)
    assert first != deterministic
    assert float(loss_fn(params, batch, jax.random.key(1))[0].total) == first
    assert float(loss_fn(params, batch, jax.random.key(2))[0].total) != first
