"""Supervised fine-tuning: next-token cross-entropy on the trained tokens of an LM batch.

`make_loss_fn(model)` gives the pure `loss_fn(params, batch, rng) -> (loss_sum, aux)` of the training contract:
`loss_sum` is the summed negative log-likelihood of the trained tokens and `aux["weight"]` their count, so the loop's
division by the weight of the whole global batch yields the mean over trained tokens, independent of how the batch is
split over devices or accumulation steps.
"""

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets[b, t]) for logits `[B, L, V]`, in float32, by a gather rather than a one-hot over the vocab."""
    logits = logits.astype(jnp.float32)
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_logits - log_normaliser


def make_loss_fn(model) -> Callable:
    """The SFT loss of `model` (a `LlamaForCausalLM`).

    With an `rng` the forward pass runs in training mode (dropout, e.g. LIMA's residual dropout, draws from it);
    with `rng=None` it is deterministic, as evaluation needs. aux holds sums: `weight` (trained tokens) and
    `correct` (trained tokens whose target is the arg-max prediction).
    """

    def loss_fn(params, batch: Mapping[str, jax.Array], rng: jax.Array | None):
        deterministic = rng is None
        logits = model.apply(
            {"params": params},
            batch["input_ids"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            deterministic=deterministic,
            rngs=None if deterministic else {"dropout": rng},
        )
        mask = batch["loss_mask"].astype(jnp.float32)
        targets = batch["targets"]
        loss_sum = -jnp.sum(token_log_probs(logits, targets) * mask)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * mask)
        return loss_sum, {"weight": jnp.sum(mask), "correct": correct}

    return loss_fn


def eval_metrics(loss_sum: float, weight: float) -> dict[str, float]:
    """`eval_loss` (mean NLL per trained token) and `eval_perplexity` from sums over a whole evaluation split."""
    if weight <= 0:
        return {"eval_loss": float("nan"), "eval_perplexity": float("nan")}
    loss = float(loss_sum) / float(weight)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
