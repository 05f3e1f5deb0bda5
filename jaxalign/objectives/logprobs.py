"""Log-probabilities of given tokens: the one computation behind SFT, scoring, sampling and every RL objective.

`token_log_probs` turns logits into log p(target); `model_token_log_probs` runs the model over an LM batch (the keys
of `jaxalign.data.packing`) and applies it, slice by slice of positions (`model_token_statistics` also gives the
entropy and arg-max match); `sequence_log_probs` sums the per-token values of each row under a mask.
"""

from collections.abc import Mapping
from typing import NamedTuple

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


class TokenStatistics(NamedTuple):
    """Per-token values of one forward pass, each float32 `[B, L]`: `log_probs` of the targets, and when asked for
    the `entropy` of the (temperature-scaled) distribution (0 where the batch's `loss_mask` is 0) and `correct`
    (1.0 where the target is the arg-max token)."""

    log_probs: jax.Array
    entropy: jax.Array | None = None
    correct: jax.Array | None = None


def model_token_log_probs(
    model,
    params,
    batch: Mapping[str, jax.Array],
    *,
    temperature: float | jax.Array = 1.0,
    rng: jax.Array | None = None,
    needed: jax.Array | None = None,
) -> jax.Array:
    """log p(`targets[b, t]` | the row's tokens up to t), float32 `[B, L]`, from one forward pass of `model`.

    batch: `input_ids`, `targets`, `segment_ids`, `positions`, all `[B, L]` int32 as `jaxalign.data.packing`
      builds them (other keys, such as `loss_mask`, are ignored: padding and prompt slots hold log-probs of
      whatever their target is, to be masked by the caller).
    With `rng` the forward pass runs in training mode (dropout draws from it); with `rng=None` it is
    deterministic, as reference models, PPO's recomputation and evaluation need. `needed`: see
    `model_token_statistics` (slices of positions it masks in every row skip the LM head and hold 0).
    """
    return model_token_statistics(model, params, batch, temperature=temperature, rng=rng, needed=needed).log_probs


def logits_slice_length(config, batch_size: int) -> int:
    """Positions per slice of the LM head's logits in `model_token_statistics`: `config.logits_chunk_length`, or about
    2**25 float32 logits (128 MiB) per slice of a `batch_size`-row batch."""
    return config.logits_chunk_length or max(1, 2**25 // (batch_size * config.vocab_size))


def model_token_statistics(
    model,
    params,
    batch: Mapping[str, jax.Array],
    *,
    temperature: float | jax.Array = 1.0,
    rng: jax.Array | None = None,
    entropy: bool = False,
    correct: bool = False,
    needed: jax.Array | None = None,
) -> TokenStatistics:
    """`model_token_log_probs` plus, on request, the entropy (needs `batch["loss_mask"]`) and the arg-max match of
    every position, without holding the float32 logits `[B, L, V]` of the whole batch.

    The logits are made from the final hidden states a slice of `model.config.logits_chunk_length` positions at a
    time (default: about 2**25 logits per slice), and the backward pass recomputes each slice's logits, so a
    128K-token vocabulary costs `[B, chunk, V]` float32 of memory rather than `[B, L, V]`. `temperature`: a number,
    or an array broadcastable to `[B, L]`.
    `needed` (`[B, L]`, optional; the caller's loss mask) lets positions where it is 0 skip the LM head: each row's
    needed positions are moved to the front (a stable per-row permutation: every value depends on its own position
    only), and the slices of that order in which no row needs a position skip the head, forward and backward, and
    hold 0 in every returned value. A preference or rollout batch whose prompts fill half of each row so projects
    about half of its positions through the head. Values where `needed` is non-zero are unchanged. The skipping
    applies when the computation runs on one device (one JAX device, or a mesh of one): under a larger mesh the
    head's branch would hold collectives (the gathered head weights), which XLA:CPU deadlocks on inside a
    conditional, so there `needed` is ignored and every position is computed.
    """
    if needed is not None and not _single_device():
        needed = None
    deterministic = rng is None
    hidden = model.apply(
        {"params": params},
        batch["input_ids"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng},
        method="hidden_states",
    )
    batch_size, length = hidden.shape[:2]
    per_position = {"targets": batch["targets"]}
    if not isinstance(temperature, (int, float)):
        per_position["temperature"] = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch_size, length))
    if entropy:
        per_position["mask"] = batch["loss_mask"]
    if needed is not None:
        per_position["needed"] = needed

    def statistics(hidden_slice, values):
        logits = model.apply({"params": params}, hidden_slice, method="logits")
        scale = values.get("temperature", temperature)
        return TokenStatistics(
            token_log_probs(logits, values["targets"], scale),
            entropy_from_logits(logits, values["mask"], scale) if entropy else None,
            (jnp.argmax(logits, axis=-1) == values["targets"]).astype(jnp.float32) if correct else None,
        )

    def statistics_or_zeros(args):
        hidden_slice, values = args
        if needed is None:
            return statistics(hidden_slice, values)

        def zeros(hidden_slice, values):
            zero = jnp.zeros(values["targets"].shape, jnp.float32)
            return TokenStatistics(zero, zero if entropy else None, zero if correct else None)

        return jax.lax.cond(jnp.any(values["needed"] != 0), statistics, zeros, hidden_slice, values)

    chunk = logits_slice_length(model.config, batch_size)
    if length <= chunk:
        return statistics_or_zeros((hidden, per_position))
    count = -(-length // chunk)

    def permute(x, order):
        return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)

    if needed is not None:
        needed_first = jnp.argsort(needed == 0, axis=1, stable=True)
        hidden = permute(hidden, needed_first)
        per_position = jax.tree.map(lambda x: permute(x, needed_first), per_position)

    def slices(x):
        x = jnp.pad(x, [(0, 0), (0, count * chunk - length)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch_size, count, chunk, *x.shape[2:]), 1, 0)

    out = jax.lax.map(jax.checkpoint(statistics_or_zeros), (slices(hidden), jax.tree.map(slices, per_position)))
    out = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(batch_size, count * chunk)[:, :length], out)
    if needed is not None:
        original_order = jnp.argsort(needed_first, axis=1)
        out = jax.tree.map(lambda x: permute(x, original_order), out)
    return out


def _single_device() -> bool:
    """Whether the computation being traced can only run on one device: one JAX device, or a mesh of one."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.device_count() == 1 or (not mesh.empty and mesh.size == 1)


def entropy_from_logits(logits: jax.Array, mask: jax.Array | None = None,
                        temperature: float | jax.Array = 1.0) -> jax.Array:
    """Entropy `[...]` float32 of `softmax(logits / temperature)` for logits `[..., V]` (any float dtype; e.g.
    `[B, T, V]` → `[B, T]`), 0 where `mask` (`[...]`, optional) is 0. Vocabulary entries with probability 0
    (logits -inf) add nothing, and masked slots neither their value nor a NaN gradient.
    Raises JaxalignError for a temperature <= 0 given as a number."""
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise JaxalignError(f"temperature must be > 0 for an entropy, got {temperature}")
    logits = jnp.asarray(logits, jnp.float32)
    valid = jnp.ones(logits.shape[:-1], bool) if mask is None else mask != 0
    logits = jnp.where(valid[..., None], logits, 0.0)
    if not (isinstance(temperature, (int, float)) and temperature == 1):
        logits = logits / jnp.asarray(temperature, jnp.float32)[..., None]
    log_p = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(log_p)
    entropy = -jnp.sum(p * jnp.where(p > 0, log_p, 0.0), axis=-1)
    return jnp.where(valid, entropy, 0.0)


def sequence_log_probs(token_logps: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: the sum of `token_logps [B, L]` where `mask [B, L]` is non-zero, and the count of such tokens.

    Returns `(sum [B], count [B])`, both float32; `sum / count` is the per-token average (SimPO, IPO, ORPO).
    Masked-out slots are excluded with `where`, so a NaN or -inf there does not reach the sum.
    """
    keep = mask != 0
    total = jnp.sum(jnp.where(keep, token_logps.astype(jnp.float32), 0.0), axis=-1)
    return total, jnp.sum(keep, axis=-1, dtype=jnp.float32)
