"""The pure train step: gradient accumulation over micro-batches, normalisation by the global count, one update per
trainable parameter tree.

`loss(params, frozen, batch, rng) -> (objective, metrics)` returns `Mean`s (sums and counts). Sums over every
micro-batch and device are divided once by the total count, so the result does not depend on how the global batch
is split.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from jaxalign.train.algorithm import LossFn, Mean
from jaxalign.train.state import TrainState


def accumulate_gradients(loss: LossFn, params: dict, frozen: dict, batch: dict, rng: jax.Array, grad_accum: int,
                         batch_spec: PartitionSpec | None = None):
    """`(objective, metrics, grads)` summed over `grad_accum` micro-batches of `batch`; `grads` is the gradient of
    the summed `objective.total` (not yet divided by its count).

    Micro-batch i takes rows i, i + A, i + 2A... so that every micro-batch stays spread over all devices that hold
    the batch (a local transpose, no communication).
    """

    def objective_total(params, batch, rng):
        objective, metrics = loss(params, frozen, batch, rng)
        return objective.total, (objective, metrics)

    grad_fn = jax.grad(objective_total, has_aux=True)
    if grad_accum == 1:
        grads, (objective, metrics) = grad_fn(params, batch, rng)
        return objective, metrics, grads

    def split(x):
        x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)
        if batch_spec is not None:
            x = jax.lax.with_sharding_constraint(x, PartitionSpec(None, *batch_spec))
        return x

    micro_batches = jax.tree.map(split, batch)

    def body(carry, inputs):
        index, micro = inputs
        grads, (objective, metrics) = grad_fn(params, micro, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (objective, metrics, grads)), None

    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches), rng)
    grad_shape, (objective_shape, metrics_shape) = shapes
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (objective_shape, metrics_shape, grad_shape))
    (objective, metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro_batches))
    return objective, metrics, grads


def train_step(state: TrainState, frozen: dict, batch: dict, *, loss: LossFn,
               txs: Mapping[str, optax.GradientTransformation], schedules: Mapping[str, optax.Schedule],
               grad_accum: int = 1, batch_spec: PartitionSpec | None = None):
    """One optimiser update of every trainable on the global batch; returns the new state and the step's metrics
    (`Mean`s): `loss`, the loss's own metrics, `grad_norm` (over all trainables, after normalisation, before
    clipping) and `lr`; with several trainables also `grad_norm/<name>` and `lr/<name>` instead of `lr`."""
    rng = jax.random.fold_in(state.rng, state.step)
    objective, metrics, grads = accumulate_gradients(loss, state.params, frozen, batch, rng, grad_accum, batch_spec)
    count = jnp.maximum(jnp.asarray(objective.count, jnp.float32), 1.0)
    grads = jax.tree.map(lambda g: g / count.astype(g.dtype), grads)
    metrics = {"loss": Mean(jnp.asarray(objective.total, jnp.float32), jnp.asarray(objective.count, jnp.float32)),
               **metrics, "grad_norm": Mean.scalar(optax.tree.norm(grads))}
    params, opt_state = {}, {}
    for name, tx in txs.items():
        updates, opt_state[name] = tx.update(grads[name], state.opt_state[name], state.params[name])
        params[name] = optax.apply_updates(state.params[name], updates)
        lr = Mean.scalar(schedules[name](state.step))
        if len(txs) == 1:
            metrics["lr"] = lr
        else:
            metrics[f"lr/{name}"] = lr
            metrics[f"grad_norm/{name}"] = Mean.scalar(optax.tree.norm(grads[name]))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_sums(loss: LossFn, params: dict, frozen: dict, batch: dict) -> dict[str, Mean]:
    """The deterministic loss and metrics of one eval batch as `Mean`s (pooled by the loop over all eval batches)."""
    objective, metrics = loss(params, frozen, batch, None)
    return {"loss": Mean(jnp.asarray(objective.total, jnp.float32), jnp.asarray(objective.count, jnp.float32)),
            **metrics}
