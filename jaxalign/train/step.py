"""The pure train step: gradient accumulation over micro-batches, normalisation by the global weight, update.

`loss_fn(params, batch, rng) -> (loss_sum, aux)` returns sums; `aux["weight"]` is the denominator (e.g. trained
tokens). Sums over every micro-batch and device are divided once by the total weight, so the result does not depend
on how the global batch is split.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from jaxalign.train.state import TrainState

LossFn = Callable[[object, dict, jax.Array], tuple[jax.Array, dict]]


def accumulate_gradients(loss_fn: LossFn, params, batch: dict, rng: jax.Array, grad_accum: int,
                         batch_spec: PartitionSpec | None = None):
    """Summed loss, summed aux and summed gradients over `grad_accum` micro-batches of `batch`.

    Micro-batch i takes rows i, i + A, i + 2A... so that every micro-batch stays spread over all devices that hold
    the batch (a local transpose, no communication).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss_sum, aux), grads = grad_fn(params, batch, rng)
        return loss_sum, aux, grads

    def split(x):
        x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)
        if batch_spec is not None:
            x = jax.lax.with_sharding_constraint(x, PartitionSpec(None, *batch_spec))
        return x

    micro_batches = jax.tree.map(split, batch)

    def body(carry, inputs):
        index, micro = inputs
        (loss_sum, aux), grads = grad_fn(params, micro, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (loss_sum, aux, grads)), None

    zero_out = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches), rng)
    (loss_shape, aux_shape), grad_shape = zero_out
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, aux_shape, grad_shape))
    (loss_sum, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro_batches))
    return loss_sum, aux, grads


def normalized_metrics(loss_sum, aux: dict) -> tuple[jax.Array, dict]:
    """Divides sums by the total weight: `loss` and every aux entry except `weight` become means."""
    weight = jnp.maximum(jnp.asarray(aux["weight"], jnp.float32), 1.0)
    metrics = {k: jnp.asarray(v, jnp.float32) / weight for k, v in aux.items() if k != "weight"}
    metrics["weight"] = jnp.asarray(aux["weight"], jnp.float32)
    metrics["loss"] = jnp.asarray(loss_sum, jnp.float32) / weight
    return weight, metrics


def train_step(state: TrainState, batch: dict, *, loss_fn: LossFn, tx: optax.GradientTransformation,
               schedule: optax.Schedule, grad_accum: int = 1, batch_spec: PartitionSpec | None = None):
    """One optimiser update on the global batch; returns the new state and the step's metrics."""
    rng = jax.random.fold_in(state.rng, state.step)
    loss_sum, aux, grads = accumulate_gradients(loss_fn, state.params, batch, rng, grad_accum, batch_spec)
    weight, metrics = normalized_metrics(loss_sum, aux)
    grads = jax.tree.map(lambda g: g / weight.astype(g.dtype), grads)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_sums(eval_fn: LossFn, params, batch: dict, rng: jax.Array | None):
    """Loss and aux sums of one eval batch (normalised by the loop after summing over all eval batches)."""
    loss_sum, aux = eval_fn(params, batch, rng)
    return {"loss": jnp.asarray(loss_sum, jnp.float32), **{k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}}
