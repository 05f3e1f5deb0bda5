"""Log-probabilities of given tokens: the one computation behind SFT, scoring, sampling and every RL objective.

`token_log_probs` turns logits into log p(target); `model_token_log_probs` runs the model over an LM batch (the keys
of `jaxalign.data.packing`) and applies it; `sequence_log_probs` sums the per-token values of each row under a mask.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxalign.errors import JaxalignError


def token_log_probs(logits: jax.Array, targets: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """log p(target) under `softmax(logits / temperature)`, as float32 `[...]`.

    logits: `[..., V]`, any float dtype; they are upcast to float32 before the division, so bf16 logits lose nothing
      more than they already lost. targets: `[...]` integer token ids in `0..V-1`.
    temperature: a positive number, or a float array broadcastable to `[...]`; PPO / GRPO pass the sampling
      temperature so that the log-probs are those of the distribution the tokens were drawn from (before top-k /
      top-p truncation).

    Computed as `logits[target] - logsumexp(logits)`: a gather, never a one-hot or a full log-softmax over the vocab.
    Raises JaxalignError for a temperature <= 0 given as a Python number (greedy decoding has no distribution).
    """
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise JaxalignError(f"temperature must be > 0 for log-probabilities, got {temperature}")
    logits = logits.astype(jnp.float32)
    if not (isinstance(temperature, (int, float)) and temperature == 1):
        logits = logits / jnp.asarray(temperature, jnp.float32)[..., None]
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_logits - log_normaliser


def model_token_log_probs(
    model,
    params,
    batch: Mapping[str, jax.Array],
    *,
    temperature: float | jax.Array = 1.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """log p(`targets[b, t]` | the row's tokens up to t), float32 `[B, L]`, from one forward pass of `model`.

    batch: `input_ids`, `targets`, `segment_ids`, `positions`, all `[B, L]` int32 as `jaxalign.data.packing`
      builds them (other keys, such as `loss_mask`, are ignored: padding and prompt slots hold log-probs of
      whatever their target is, to be masked by the caller).
    With `rng` the forward pass runs in training mode (dropout draws from it); with `rng=None` it is
    deterministic, as reference models, PPO's recomputation and evaluation need.
    """
    return token_log_probs(model_logits(model, params, batch, rng), batch["targets"], temperature)


def model_logits(model, params, batch: Mapping[str, jax.Array], rng: jax.Array | None = None) -> jax.Array:
    """The logits `[B, L, V]` of one forward pass of `model` over `batch["input_ids"]` with its `positions` and
    `segment_ids`: in training mode (dropout from `rng`) with an `rng`, deterministic without."""
    deterministic = rng is None
    return model.apply(
        {"params": params},
        batch["input_ids"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng},
    )


def sequence_log_probs(token_logps: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: the sum of `token_logps [B, L]` where `mask [B, L]` is non-zero, and the count of such tokens.

    Returns `(sum [B], count [B])`, both float32; `sum / count` is the per-token average (SimPO, IPO, ORPO).
    Masked-out slots are excluded with `where`, so a NaN or -inf there does not reach the sum.
    """
    keep = mask != 0
    total = jnp.sum(jnp.where(keep, token_logps.astype(jnp.float32), 0.0), axis=-1)
    return total, jnp.sum(keep, axis=-1, dtype=jnp.float32)
