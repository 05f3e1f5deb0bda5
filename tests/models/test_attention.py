"""Blockwise attention against the dense reference, and how the train step's memory grows with length."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.errors import JaxalignError
from jaxalign.models import attention
from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM
from jaxalign.objectives.sft import make_loss_fn


def _inputs(segments, positions, key_segments=None, key_positions=None, key_slots=None):
    segments, positions = jnp.asarray(segments, jnp.int32), jnp.asarray(positions, jnp.int32)
    slots = jnp.arange(segments.shape[1], dtype=jnp.int32)
    return attention.MaskInputs(
        segments, positions, slots,
        segments if key_segments is None else jnp.asarray(key_segments, jnp.int32),
        positions if key_positions is None else jnp.asarray(key_positions, jnp.int32),
        slots if key_slots is None else jnp.asarray(key_slots, jnp.int32),
    )


def _qkv(batch, length, keys, dtype=jnp.float32, seed=0):
    q_key, k_key, v_key = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(q_key, (batch, length, 2, 3, 8), dtype)
    k = jax.random.normal(k_key, (batch, 2, keys, 8), dtype)
    v = jax.random.normal(v_key, (batch, 2, keys, 8), dtype)
    return q, k, v


PACKED = (
    [[1] * 9 + [2] * 7 + [0] * 3, [0] * 4 + [1] * 15],
    [list(range(9)) + list(range(7)) + [0] * 3, [0] * 4 + list(range(15))],
)


@pytest.mark.parametrize("block, window", [(3, 4), (5, None), (32, None)])
def test_blockwise_equals_dense_with_packing_padding_and_window(window, block):
    inputs = _inputs(*PACKED)
    q, k, v = _qkv(2, 19, 19)
    weights = jax.random.normal(jax.random.key(7), (2 * 19, 6, 8))

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * weights), out

    def dense(q, k, v):
        return attention.dense_attention(q, k, v, attention.attention_mask(inputs, window))

    def blockwise(q, k, v):
        return attention.blockwise_attention(q, k, v, inputs, window, block)

    (_, want), want_grads = jax.value_and_grad(lambda *a: loss(dense, *a), (0, 1, 2), has_aux=True)(q, k, v)
    (_, got), got_grads = jax.jit(jax.value_and_grad(lambda *a: loss(blockwise, *a), (0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(got, want, atol=2e-6)
    padding = np.asarray(inputs.query_segments).reshape(-1) == 0
    assert np.all(np.asarray(got)[padding] == 0)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=5e-6)


def test_blockwise_reads_a_kv_cache_with_empty_slots():
    # 3 new tokens at slots 5..7 of a 12-slot cache: the slots past 7 are empty (segment 0) and in the future
    keys = 12
    key_segments = [[1] * 8 + [0] * 4]
    key_positions = [list(range(8)) + [0] * 4]
    inputs = attention.MaskInputs(
        jnp.ones((1, 3), jnp.int32), jnp.asarray([[5, 6, 7]]), jnp.arange(5, 8),
        jnp.asarray(key_segments), jnp.asarray(key_positions), jnp.arange(keys),
    )
    q, k, v = _qkv(1, 3, keys, seed=2)
    want = attention.dense_attention(q, k, v, attention.attention_mask(inputs, None))
    np.testing.assert_allclose(attention.blockwise_attention(q, k, v, inputs, None, 2), want, atol=2e-6)


def test_bfloat16_blockwise_stays_close_to_dense():
    inputs = _inputs(*PACKED)
    q, k, v = _qkv(2, 19, 19, jnp.bfloat16, seed=3)
    want = attention.dense_attention(q, k, v, attention.attention_mask(inputs, None)).astype(jnp.float32)
    got = attention.blockwise_attention(q, k, v, inputs, None, 4)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)


def test_auto_is_blockwise_but_for_decoding():
    assert attention.choose("auto", 2) == "blockwise"
    assert attention.choose("auto", 8192) == "blockwise"
    assert attention.choose("auto", 1) == "dense"
    assert attention.choose("dense", 4096) == "dense"
    assert attention.choose("blockwise", 1) == "blockwise"
    with pytest.raises(JaxalignError, match="attention='flash'"):
        LlamaConfig.tiny(attention="flash")
    with pytest.raises(JaxalignError, match="attention_block=0"):
        LlamaConfig.tiny(attention_block=0)


def _train_step_temp_bytes(config: LlamaConfig, length: int) -> int:
    """XLA's temporary bytes for the compiled SFT loss and gradient at batch 1 (compiled, never run)."""
    model = LlamaForCausalLM(config)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    batch = dict.fromkeys(("input_ids", "targets", "segment_ids", "positions", "loss_mask"), tokens)
    loss_fn = make_loss_fn(model)
    step = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None)[0].total))
    return step.lower(params, batch).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("remat", ["none", pytest.param("dots_no_batch", marks=pytest.mark.slow)])
def test_train_step_memory_grows_linearly_with_length(remat):
    config = LlamaConfig.tiny(max_position_embeddings=8192, remat=remat)
    short, long = _train_step_temp_bytes(config, 2048), _train_step_temp_bytes(config, 8192)
    assert long <= 5 * short, (short, long)
    dense_long = _train_step_temp_bytes(dataclasses.replace(config, attention="dense"), 8192)
    assert long < dense_long / 10, (long, dense_long)
