"""Schedules (warmup by steps or ratio, floors), the weight-decay mask, AdamW / Adafactor / SGD, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.config import OptimizerConfig
from jaxalign.errors import JaxalignError
from jaxalign.train.optim import decay_mask, make_optimizer, make_schedule, warmup_steps

PARAMS = {
    "model": {
        "embed_tokens": {"embedding": jnp.ones((16, 4))},
        "layers": {"input_layernorm": {"scale": jnp.ones((2, 4))},
                   "self_attn": {"q_proj": {"kernel": jnp.ones((2, 4, 4)), "bias": jnp.ones((2, 4))}}},
        "norm": {"scale": jnp.ones((4,))},
    },
    "lm_head": {"kernel": jnp.ones((4, 16))},
}


def test_warmup_by_steps_or_ratio():
    assert warmup_steps(OptimizerConfig(warmup_steps=10), 1000) == 10
    assert warmup_steps(OptimizerConfig(warmup_ratio=0.03), 1000) == 30
    assert warmup_steps(OptimizerConfig(warmup_steps=1), 1000) == 1
    assert warmup_steps(OptimizerConfig(warmup_ratio=1.0), 1000) == 1000


def test_warmup_longer_than_the_run_is_cut_to_it():
    schedule = make_schedule(OptimizerConfig(lr=1e-3, schedule="constant", warmup_steps=200), 100)
    assert [float(schedule(s)) for s in (0, 50, 100)] == pytest.approx([0.0, 5e-4, 1e-3])


def test_cosine_with_warmup_and_floor():
    schedule = make_schedule(OptimizerConfig(lr=1e-5, schedule="cosine", warmup_ratio=0.03, min_lr_ratio=0.1), 1000)
    assert float(schedule(0)) == 0.0
    assert float(schedule(15)) == pytest.approx(0.5e-5)
    assert float(schedule(30)) == pytest.approx(1e-5)
    assert float(schedule(30 + 485)) == pytest.approx(0.55e-5, rel=1e-4)
    assert float(schedule(1000)) == pytest.approx(1e-6)


def test_linear_to_floor_and_constant():
    linear = make_schedule(OptimizerConfig(lr=1e-5, schedule="linear", min_lr_ratio=0.1), 100)
    assert [float(linear(s)) for s in (0, 50, 100)] == pytest.approx([1e-5, 5.5e-6, 1e-6])
    constant = make_schedule(OptimizerConfig(lr=2e-3, schedule="constant", warmup_steps=1000), 5000)
    assert [float(constant(s)) for s in (500, 1000, 4000)] == pytest.approx([1e-3, 2e-3, 2e-3])


def test_bad_optimizer_values_name_the_key():
    with pytest.raises(JaxalignError, match="'optimizer.lr'"):
        OptimizerConfig(lr=0.0)
    with pytest.raises(JaxalignError, match="'optimizer.min_lr_ratio'"):
        OptimizerConfig(min_lr_ratio=1.5)


def test_decay_mask_excludes_norms_biases_and_optionally_embeddings():
    mask = decay_mask(PARAMS)
    assert mask["lm_head"]["kernel"] and mask["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert not mask["model"]["layers"]["self_attn"]["q_proj"]["bias"]
    assert not mask["model"]["layers"]["input_layernorm"]["scale"] and not mask["model"]["norm"]["scale"]
    assert not mask["model"]["embed_tokens"]["embedding"]
    assert decay_mask(PARAMS, decay_embeddings=True)["model"]["embed_tokens"]["embedding"]


def test_adamw_decays_only_masked_weights():
    tx = make_optimizer(OptimizerConfig(name="adamw", lr=0.1, schedule="constant", weight_decay=0.5), 10)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    assert float(updates["lm_head"]["kernel"][0, 0]) == pytest.approx(-0.05)
    assert float(updates["model"]["norm"]["scale"][0]) == 0.0
    assert float(updates["model"]["embed_tokens"]["embedding"][0, 0]) == 0.0


def test_adafactor_unfactored_parameter_scaled_recipe():
    """'False promise' recipe: unfactored second moment with fixed decay 0.95, momentum 0.9, updates scaled by the
    parameter RMS, so a parameter ten times larger moves ten times more."""
    config = OptimizerConfig(name="adafactor", lr=1e-2, schedule="constant", b1=0.9, decay=0.95, factored=False,
                             parameter_scale=True, clip=1.0)
    tx = make_optimizer(config, 10)
    params = {"small": jnp.full((4, 4), 1.0), "large": jnp.full((4, 4), 10.0)}
    grads = {"small": jnp.full((4, 4), 0.5), "large": jnp.full((4, 4), 0.5)}
    state = tx.init(params)
    nu = [x for x in jax.tree.leaves(state) if x.shape == (4, 4)]
    assert len(nu) == 4
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["large"], 10 * updates["small"], rtol=1e-6)
    # One step: v = (1 - 0.95) g^2, u = g / sqrt(v) clipped to RMS 1, momentum (1 - 0.9) u, times lr and scale.
    assert float(updates["small"][0, 0]) == pytest.approx(-1e-2 * 0.1 * 1.0, rel=1e-5)
    factored = make_optimizer(OptimizerConfig(name="adafactor", factored=True), 10)
    big = {"w": jnp.ones((256, 512))}
    shapes = sorted(x.shape for x in jax.tree.leaves(factored.init(big)))
    assert (256,) in shapes and (512,) in shapes


def test_sgd_and_global_norm_clipping():
    tx = make_optimizer(OptimizerConfig(name="sgd", lr=1.0, schedule="constant", b1=None, clip=1.0), 10)
    params = {"w": jnp.zeros(2)}
    updates, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)
    unclipped = make_optimizer(OptimizerConfig(name="sgd", lr=1.0, schedule="constant", b1=None, clip=0.0), 10)
    updates, _ = unclipped.update({"w": jnp.array([3.0, 4.0])}, unclipped.init(params), params)
    np.testing.assert_allclose(updates["w"], [-3.0, -4.0])
    assert isinstance(tx, optax.GradientTransformation)
