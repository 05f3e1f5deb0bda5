"""Sharded = unsharded: loss and gradients on meshes (8,1,1), (1,8,1), (2,2,2) and (1,4,2) with 2 accumulation
steps equal the single-device result; FSDP really splits params + optimiser state; memory prediction = measurement."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from jaxalign import sharding as shd
from jaxalign.config import MeshConfig, RunConfig, TrainConfig
from jaxalign.objectives.sft import make_loss_fn
from jaxalign.train import state as st
from jaxalign.train.algorithm import Trainable
from jaxalign.train.loop import fresh_state, plan
from jaxalign.train.step import accumulate_gradients, train_step

from tests.train.tiny_run import SyntheticTokens, tiny_model

BATCH, SEQ = 8, 16


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batch(model):
    return next(SyntheticTokens(BATCH, SEQ, model.config.vocab_size, seed=3))


def run_config(data=1, fsdp=1, tensor=1, grad_accum=1) -> RunConfig:
    return RunConfig(train=TrainConfig(steps=10, batch_size=BATCH, seq_len=SEQ, grad_accum=grad_accum),
                     mesh=MeshConfig(data=data, fsdp=fsdp, tensor=tensor))


def trainables(model, config: RunConfig) -> dict:
    return {"model": Trainable(model, config.optimizer)}


def sft_loss(model):
    loss_fn = make_loss_fn(model)
    return lambda params, frozen, batch, rng: loss_fn(params["model"], batch, rng)


def loss_and_grads(model, batch, config: RunConfig, devices=None):
    """(loss, grads, initial params) of one step on the config's mesh, fetched to the host."""
    layout = plan(config, trainables(model, config), devices=devices)
    batch_spec = shd.spec_for(("batch",), layout.rules)
    with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        state = fresh_state(layout, trainables(model, config), 0)
        global_batch = shd.global_batch(batch, layout.mesh, layout.rules)

        def grads_fn(params, batch):
            objective, _, grads = accumulate_gradients(sft_loss(model), params, {}, batch, jax.random.PRNGKey(1),
                                                       config.train.grad_accum, batch_spec)
            return objective.total / objective.count, jax.tree.map(lambda g: g / objective.count, grads)

        loss, grads = jax.jit(grads_fn, out_shardings=(None, layout.shardings.params))(state.params, global_batch)
        return jax.device_get((loss, grads, state.params))


@pytest.fixture(scope="module")
def single_device(model, batch):
    return loss_and_grads(model, batch, run_config(), devices=jax.devices()[:1])


def assert_trees_close(actual, expected, rtol=1e-5) -> float:
    """Checks every leaf's max difference relative to the leaf's scale; returns the largest."""
    worst = 0.0
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        scale = max(float(np.max(np.abs(b))), 1e-12)
        err = float(np.max(np.abs(a - b))) / scale
        assert err <= rtol, f"{jax.tree_util.keystr(path)}: relative difference {err:.2e}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("mesh, grad_accum", [((8, 1, 1), 1), ((1, 8, 1), 1), ((2, 2, 2), 1), ((1, 4, 2), 2)])
def test_sharded_gradients_equal_single_device(model, batch, single_device, mesh, grad_accum):
    loss, grads, params = loss_and_grads(model, batch, run_config(*mesh, grad_accum))
    ref_loss, ref_grads, ref_params = single_device
    assert_trees_close(params, ref_params, rtol=0.0)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    worst = assert_trees_close(grads, ref_grads)
    print(f"mesh {mesh} accum {grad_accum}: loss rel diff {abs(loss - ref_loss) / abs(ref_loss):.1e}, "
          f"largest gradient rel diff {worst:.1e}")


def test_fsdp_splits_params_and_optimizer_state(model):
    config = run_config(fsdp=8)
    layout = plan(config, trainables(model, config))
    with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        state = fresh_state(layout, trainables(model, config), 0)
    held = (state.params, state.opt_state)
    total = sum(x.nbytes for x in jax.tree.leaves(held))
    per_device = st.measured_bytes_per_device(held)
    print(f"fsdp=8: total {total} B, largest device {per_device} B = {per_device / (total / 8):.4f} x total/8")
    assert per_device <= 1.05 * total / 8
    predicted = (st.predicted_bytes_per_device(layout.abstract.params, layout.shardings.params)
                 + st.predicted_bytes_per_device(layout.abstract.opt_state, layout.shardings.opt_state))
    assert predicted == per_device
    tensor = plan(run_config(fsdp=4, tensor=2), trainables(model, config))
    for path, sharding in jax.tree_util.tree_flatten_with_path(tensor.shardings.opt_state)[0]:
        if "mu" in jax.tree_util.keystr(path) and "q_proj" in jax.tree_util.keystr(path):
            assert "tensor" in str(sharding.spec) and "fsdp" in str(sharding.spec)


def test_bfloat16_compute_keeps_float32_master_weights(batch):
    from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.tiny(dtype="bfloat16", param_dtype="float32"))
    config = run_config(fsdp=8)
    layout = plan(config, trainables(model, config))
    with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        state = fresh_state(layout, trainables(model, config), 0)
        step = jax.jit(lambda s, b: train_step(s, {}, b, loss=sft_loss(model), txs=layout.txs,
                                               schedules=layout.schedules),
                       in_shardings=(layout.shardings, None), out_shardings=(layout.shardings, None),
                       donate_argnums=0)
        new_state, metrics = step(state, shd.global_batch(batch, layout.mesh, layout.rules))
    assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(new_state.opt_state) if x.ndim} == {np.dtype("float32")}
    assert np.isfinite(metrics["loss"].value()) and int(new_state.step) == 1
