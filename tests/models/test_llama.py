"""The LLaMA module on its own: KV-cache decoding, packed rows, padding, logical axes, dropout and remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxalign.errors import JaxalignError
from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM, LlamaModel, init_cache, logical_axes

from tests.params import init_params


def _init(config, length=8):
    model = LlamaForCausalLM(config)
    params = init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32))
    return model, params


def _tokens(batch, length, seed=1, vocab=256):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 3, vocab)


@pytest.fixture(scope="module", params=[(True, "dense"), (False, "dense"), (True, "blockwise")],
                ids=["scan", "unrolled", "blockwise"])
def tiny(request):
    scan_layers, attention = request.param
    config = LlamaConfig.tiny(scan_layers=scan_layers, sliding_window=6, attention=attention, attention_block=4)
    model, params = _init(config)
    return config, model, params, jax.jit(model.apply)


def test_cache_decode_matches_full_forward(tiny):
    config, model, params, apply = tiny
    ids = _tokens(2, 12)
    full = apply({"params": params}, ids)
    cache = init_cache(config, batch_size=2, max_length=16, dtype=jnp.float32)
    logits, cache = apply({"params": params}, ids[:, :5], cache=cache)
    steps = [logits]
    for t in range(5, 12):
        logits, cache = apply({"params": params}, ids[:, t : t + 1], cache=cache)
        steps.append(logits)
    decoded = jnp.concatenate(steps, axis=1)
    assert full.dtype == jnp.float32 and full.shape == (2, 12, config.vocab_size)
    assert int(cache["index"]) == 12
    assert cache["k"].shape == (config.num_layers, 2, config.num_kv_heads, 16, config.head_dim)
    np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=0)
    with pytest.raises(JaxalignError, match="needs 17 slots, the cache has 16"):
        model.apply({"params": params}, ids[:, :5], cache=cache)


def test_packed_row_equals_separate_rows(tiny):
    config, model, params, apply = tiny
    lengths = [5, 4, 3]
    examples = [_tokens(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = jnp.concatenate(examples + [jnp.zeros((1, 2), jnp.int32)], axis=1)
    segment_ids = jnp.asarray([sum(([i + 1] * n for i, n in enumerate(lengths)), []) + [0, 0]])
    positions = jnp.asarray([sum((list(range(n)) for n in lengths), []) + [0, 0]])
    packed_logits = apply({"params": params}, packed, positions=positions, segment_ids=segment_ids)
    assert bool(jnp.all(jnp.isfinite(packed_logits)))
    start = 0
    for example in examples:
        alone = apply({"params": params}, example)
        np.testing.assert_allclose(packed_logits[:, start : start + example.shape[1]], alone, atol=1e-5, rtol=0)
        start += example.shape[1]


def test_left_padded_prompts_decode_like_unpadded(tiny):
    config, model, params, apply = tiny
    short, long = _tokens(1, 3, seed=3), _tokens(1, 6, seed=4)
    prompts = jnp.concatenate([jnp.concatenate([jnp.zeros((1, 3), jnp.int32), short], axis=1), long])
    segment_ids = jnp.asarray([[0, 0, 0, 1, 1, 1], [1] * 6])
    positions = jnp.asarray([[0, 0, 0, 0, 1, 2], list(range(6))])
    cache = init_cache(config, batch_size=2, max_length=8)
    logits, cache = apply({"params": params}, prompts, positions=positions, segment_ids=segment_ids, cache=cache)
    next_ids = jnp.asarray([[7], [9]])
    step, _ = apply(
        {"params": params}, next_ids, positions=jnp.asarray([[3], [6]]), segment_ids=jnp.ones((2, 1)), cache=cache
    )
    for row, prompt in enumerate([short, long]):
        alone = apply({"params": params}, jnp.concatenate([prompt, next_ids[row : row + 1]], axis=1))
        np.testing.assert_allclose(logits[row, -prompt.shape[1] :], alone[0, :-1], atol=1e-5, rtol=0)
        np.testing.assert_allclose(step[row, 0], alone[0, -1], atol=1e-5, rtol=0)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_parameters_carry_logical_axes():
    config = LlamaConfig.tiny(tie_word_embeddings=True)
    axes = logical_axes(LlamaForCausalLM(config))
    assert "lm_head" not in axes
    assert tuple(axes["model"]["embed_tokens"]["embedding"]) == ("vocab", "embed")
    assert tuple(axes["model"]["layers"]["self_attn"]["k_proj"]["kernel"]) == (
        "layers",
        "embed",
        "kv_heads",
        "head_dim",
    )
    assert tuple(axes["model"]["layers"]["mlp"]["down_proj"]["kernel"]) == ("layers", "mlp", "embed")


def test_trunk_hidden_states_and_bf16_logits_are_float32():
    config = LlamaConfig.tiny(dtype="bfloat16", remat="dots", residual_dropout=(0.0, 0.3))
    model, params = _init(config)
    ids = _tokens(2, 8)
    hidden = LlamaModel(config).apply({"params": params["model"]}, ids)
    assert hidden.shape == (2, 8, config.hidden_size)
    plain = model.apply({"params": params}, ids)
    dropped = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(5)})
    assert plain.dtype == jnp.float32 and dropped.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(plain - dropped))) > 0
    np.testing.assert_array_equal(config.layer_dropout_rates(), np.asarray([0.0, 0.3], np.float32))


def test_bad_config_values_are_reported():
    with pytest.raises(JaxalignError, match="num_kv_heads"):
        LlamaConfig.tiny(num_kv_heads=3)
    with pytest.raises(JaxalignError, match="rope_type"):
        LlamaConfig.tiny(rope_scaling={"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("attention", [pytest.param("dense", marks=pytest.mark.slow), "blockwise"])
def test_sharded_forward_and_gradients_equal_unsharded(attention):
    config = LlamaConfig.tiny(attention=attention, attention_block=4)
    model, params = _init(config)
    ids = _tokens(4, 10)

    def loss(p, x):
        logits = model.apply({"params": p}, x)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (_, expected), expected_grads = jax.value_and_grad(loss, has_aux=True)(params, ids)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = (("batch", "data"), ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
             ("vocab", "tensor"))
    shardings = nn.logical_to_mesh_sharding(logical_axes(model), mesh, rules)
    sharded = jax.device_put(params, shardings)
    q_kernel = sharded["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(sharded, ids)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)


def test_bfloat16_compute_stays_close_to_float32():
    config = LlamaConfig.tiny()
    model, params = _init(config)
    ids = _tokens(2, 8)
    reference = model.apply({"params": params}, ids)
    low = LlamaForCausalLM(LlamaConfig.tiny(dtype="bfloat16")).apply({"params": params}, ids)
    assert low.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(low - reference)) / jnp.max(jnp.abs(reference))) < 5e-2


def test_remat_keeps_gradients():
    ids = _tokens(2, 6)
    config = LlamaConfig.tiny()
    _, params = _init(config)

    def grads(config):
        loss = lambda p: jnp.mean(LlamaForCausalLM(config).apply({"params": p}, ids) ** 2)  # noqa: E731
        return jax.grad(loss)(params)

    expected = grads(config)
    for remat in ("full", "dots"):
        got = grads(dataclasses.replace(config, remat=remat))
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), got, expected)
