"""LoRA through the loop: only adapters train (the optimiser state holds adapter-shaped arrays only), they shard
like the weights they adapt, a step on 8 devices equals one device, the loss falls, and the base stays frozen."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import linen as nn

from jaxalign import sharding as shd
from jaxalign.config import LoraConfig, MeshConfig, OptimizerConfig, RunConfig, TrainConfig
from jaxalign.models import lora
from jaxalign.models.llama import LlamaForCausalLM
from jaxalign.models.loading import ModelSource
from jaxalign.objectives.sft import make_algorithm
from jaxalign.train.adapters import BASE, adapt
from jaxalign.train.loop import fresh_state, plan
from jaxalign.train.step import train_step

from tests.train.tiny_run import SyntheticTokens, tiny_model

BATCH, SEQ = 8, 16
LORA = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def base():
    return tiny_model()


@pytest.fixture(scope="module")
def batches(base):
    data = SyntheticTokens(BATCH, SEQ, base.config.vocab_size, seed=3)
    return [next(data) for _ in range(12)]


def run_config(data=1, fsdp=1, tensor=1) -> RunConfig:
    return RunConfig(train=TrainConfig(steps=12, batch_size=BATCH, seq_len=SEQ),
                     optimizer=OptimizerConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0),
                     mesh=MeshConfig(data=data, fsdp=fsdp, tensor=tensor))


def adapted_algorithm(base, config):
    model = LlamaForCausalLM(lora.apply_to(base.config, LORA))
    return adapt(make_algorithm(model, config.optimizer, iter(())), ModelSource(base.config), seed=0).algorithm


def run_steps(base, batches, config, devices=None):
    """(losses of each step, final trained params, final opt state, frozen base) on the config's mesh."""
    algorithm = adapted_algorithm(base, config)
    layout = plan(config, algorithm.trainables, algorithm.frozen, devices=devices)
    batch_spec = shd.spec_for(("batch",), layout.rules)
    with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        frozen = {name: f.load(layout.frozen_shardings[name]) for name, f in algorithm.frozen.items()}
        state = fresh_state(layout, algorithm.trainables, 0)
        step = jax.jit(lambda s, f, b: train_step(s, f, b, loss=algorithm.loss, txs=layout.txs,
                                                  schedules=layout.schedules, batch_spec=batch_spec))
        losses = []
        for batch in batches:
            state, metrics = step(state, frozen, shd.global_batch(batch, layout.mesh, layout.rules))
            losses.append(metrics["loss"].value())
        return losses, jax.device_get(state.params), state.opt_state, frozen, layout


@pytest.fixture(scope="module")
def single_device(base, batches):
    return run_steps(base, batches[:2], run_config(), devices=jax.devices()[:1])


def test_only_adapters_are_trained_and_hold_optimizer_state(single_device):
    _, params, opt_state, frozen, _ = single_device
    layers = params["model"]["model"]["layers"]
    assert set(layers["self_attn"]) == {"q_proj_lora", "v_proj_lora"} and set(layers["mlp"]) == {"down_proj_lora"}
    adapter_shapes = {leaf.shape for leaf in jax.tree.leaves(params)}
    state_shapes = {leaf.shape for leaf in jax.tree.leaves(opt_state) if leaf.ndim}
    assert state_shapes == adapter_shapes
    assert all(leaf.shape[-1] == LORA.rank or leaf.shape[1] == LORA.rank for leaf in jax.tree.leaves(params))
    base_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(frozen[BASE])[0]}
    assert not any("lora" in p for p in base_paths) and any("q_proj']['kernel" in p for p in base_paths)


def test_zero_initialised_adapters_start_at_the_base_model(base, batches, single_device):
    algorithm = adapted_algorithm(base, run_config())
    layout = plan(run_config(), algorithm.trainables, algorithm.frozen, devices=jax.devices()[:1])
    with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        frozen = {BASE: algorithm.frozen[BASE].load(layout.frozen_shardings[BASE])}
        state = fresh_state(layout, algorithm.trainables, 0)
        ids = batches[0]["input_ids"]
        whole = lora.merge(frozen[BASE], state.params["model"])
        adapted = algorithm.trainables["model"].model.apply({"params": whole}, ids)
        plain = base.apply({"params": frozen[BASE]}, ids)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))


@pytest.mark.parametrize("mesh", [pytest.param((1, 8, 1), marks=pytest.mark.slow), (2, 2, 2)])
def test_sharded_steps_equal_one_device(base, batches, single_device, mesh):
    losses, params, _, _, layout = run_steps(base, batches[:2], run_config(*mesh))
    ref_losses, ref_params = single_device[:2]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_adapters_shard_like_the_weights_they_adapt(base):
    config = run_config(fsdp=4, tensor=2)
    algorithm = adapted_algorithm(base, config)
    layout = plan(config, algorithm.trainables, algorithm.frozen)
    adapters = layout.shardings.params["model"]["model"]["layers"]
    kernels = layout.frozen_shardings[BASE]["model"]["layers"]
    # q_proj kernel [layers, embed, heads, head_dim]: A [layers, embed, r] splits embed like it, B [layers, r, heads,
    # head_dim] the heads
    assert adapters["self_attn"]["q_proj_lora"]["lora_a"].spec[1] == kernels["self_attn"]["q_proj"]["kernel"].spec[1]
    assert adapters["self_attn"]["q_proj_lora"]["lora_b"].spec[2] == kernels["self_attn"]["q_proj"]["kernel"].spec[2]
    assert adapters["mlp"]["down_proj_lora"]["lora_a"].spec[1] == kernels["mlp"]["down_proj"]["kernel"].spec[1]
    assert "fsdp" in str(adapters["self_attn"]["q_proj_lora"]["lora_a"].spec)


def test_loss_falls_with_adapters_only(base, batches):
    """Twelve steps on one batch of random tokens: the adapters alone fit part of it (5.56 -> 5.31 nats)."""
    losses = run_steps(base, batches[:1] * 12, run_config(), devices=jax.devices()[:1])[0]
    assert losses[-1] < losses[0] - 0.15 and losses[-1] == min(losses)


def test_adapter_config_errors_name_the_key():
    from jaxalign.config import from_dict
    from jaxalign.errors import JaxalignError

    for bad, message in [({"rank": 0}, "'model.lora.rank'"), ({"alpha": 0}, "'model.lora.alpha'"),
                         ({"targets": ["attention"]}, "'attention' matches no projection"),
                         ({"targets": ["q_proj("]}, "not a valid regex"), ({"dropout": 1.0}, "'model.lora.dropout'")]:
        with pytest.raises(JaxalignError, match=message):
            from_dict(LoraConfig, bad, prefix="model.lora")
    assert LoraConfig(targets=("all-linear",)).projections() == lora.PROJECTIONS
    assert LoraConfig(targets=(".*_proj", "q_proj")).projections() == lora.PROJECTIONS
    assert LoraConfig(targets=("(gate|up)_proj",)).projections() == ("gate_proj", "up_proj")
    assert dataclasses.replace(LoraConfig(), rank=2).scale == 8.0
