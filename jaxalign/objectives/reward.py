"""Reward modelling on preference pairs (LLaMA-2, Touvron et al. 2023, §3.2.2).

Per pair, with rewards `r_c`, `r_r` read at the last non-padding token of prompt + response:

    loss = -log σ(r_c - r_r - m) + c · (r_c + r_r)²

`m` is the pair's margin (LLaMA-2's tables by preference strength, `jaxalign.data.packing.MARGINS`, or a numeric
`margin` field of the data; 0 without), `c` the reward-centering coefficient (0 = off; ≈ 0.01 keeps rewards near
zero). Accuracy counts `r_c > r_r` strictly: a tie is wrong.

`make_loss_fn(model)` gives the loss: chosen and rejected of every pair run in one forward pass; metrics overall
and per strength bucket. `make_algorithm` wraps it as the loop's `Algorithm`.
"""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from jaxalign.models.heads import last_token_scores
from jaxalign.train.algorithm import Algorithm, DataSource, Mean, Trainable

# Strength buckets by their index in preference batches (`strength` -1 = unknown), as metric-name suffixes.
STRENGTH_NAMES = ("significantly_better", "better", "slightly_better", "negligibly_better")


def pairwise_loss(r_chosen: jax.Array, r_rejected: jax.Array, margin: jax.Array | None = None,
                  center_coefficient: float = 0.0) -> jax.Array:
    """Per-pair losses `[B]` float32: `-log σ(r_c - r_r - m) + c (r_c + r_r)²` for rewards `[B]` and margins `[B]`
    (None = 0). The log-sigmoid is computed stably (`softplus`), so large reward gaps give no inf / NaN."""
    r_chosen = jnp.asarray(r_chosen, jnp.float32)
    r_rejected = jnp.asarray(r_rejected, jnp.float32)
    gap = r_chosen - r_rejected
    if margin is not None:
        gap = gap - jnp.asarray(margin, jnp.float32)
    loss = jax.nn.softplus(-gap)
    if center_coefficient:
        loss = loss + center_coefficient * (r_chosen + r_rejected) ** 2
    return loss


def sequence_rewards(model, params, input_ids, positions, segment_ids, rng: jax.Array | None = None) -> jax.Array:
    """Rewards `[B]` float32 of one sequence per row (`[B, L]` int32 arrays, padding has segment 0, on either side):
    the score model's output at the row's last non-padding token. With `rng` the pass runs in training mode."""
    deterministic = rng is None
    scores = model.apply({"params": params}, input_ids, positions, segment_ids, deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": rng})
    return last_token_scores(scores, segment_ids)


def pair_rewards(model, params, batch: Mapping[str, jax.Array], rng: jax.Array | None = None):
    """`(r_chosen [B], r_rejected [B])` float32 of a preference batch (`chosen_*` / `rejected_*` keys of
    `jaxalign.data.packing.preference_batch`), both halves stacked into one forward pass of a score model; each
    reward is the score at the row's last non-padding token (segment id != 0), so the padding side and the pad id
    do not matter. With `rng` the pass runs in training mode (dropout)."""
    def both(key):
        return jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)

    rewards = sequence_rewards(model, params, both("input_ids"), both("positions"), both("segment_ids"), rng)
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


def pair_metrics(r_chosen, r_rejected, losses, strength, pair_mask) -> dict[str, Mean]:
    """`accuracy` (`r_c > r_r`), `rewards/chosen`, `rewards/rejected`, `rewards/margins` (`r_c - r_r`) over the
    real pairs, and `loss/<bucket>`, `accuracy/<bucket>`, `rewards/margins/<bucket>` per strength bucket (pairs of
    unknown strength count only overall)."""
    correct = (r_chosen > r_rejected).astype(jnp.float32)
    margins = r_chosen - r_rejected
    metrics = {
        "accuracy": Mean.of(correct, pair_mask),
        "rewards/chosen": Mean.of(r_chosen, pair_mask),
        "rewards/rejected": Mean.of(r_rejected, pair_mask),
        "rewards/margins": Mean.of(margins, pair_mask),
    }
    for index, name in enumerate(STRENGTH_NAMES):
        in_bucket = pair_mask * (strength == index)
        metrics[f"loss/{name}"] = Mean.of(losses, in_bucket)
        metrics[f"accuracy/{name}"] = Mean.of(correct, in_bucket)
        metrics[f"rewards/margins/{name}"] = Mean.of(margins, in_bucket)
    return metrics


def make_loss_fn(model, center_coefficient: float = 0.0) -> Callable:
    """The reward-model loss of `model` (a `LlamaForScore`) on a preference batch: `(objective, metrics)` with the
    objective the mean pairwise loss over real pairs (`pair_mask`), margins from the batch's `margin`."""

    def loss_fn(params, batch: Mapping[str, jax.Array], rng: jax.Array | None):
        r_chosen, r_rejected = pair_rewards(model, params, batch, rng)
        losses = pairwise_loss(r_chosen, r_rejected, batch["margin"], center_coefficient)
        pair_mask = batch["pair_mask"]
        return Mean.of(losses, pair_mask), pair_metrics(r_chosen, r_rejected, losses, batch["strength"], pair_mask)

    return loss_fn


def make_algorithm(model, optimizer, train_data, *, init=None, eval_data=None,
                   center_coefficient: float = 0.0) -> Algorithm:
    """Reward modelling as the loop runs it: one trainable `model` (a `LlamaForScore`) with `optimizer`, starting
    from `init(shardings) -> params` (default: random), trained on `train_data` (preference batches with
    `state_dict()` / `load_state_dict()`); `eval_data()` gives fresh eval batches."""
    loss_fn = make_loss_fn(model, center_coefficient)
    return Algorithm(
        trainables={"model": Trainable(model, optimizer, init)},
        loss=lambda params, frozen, batch, rng: loss_fn(params["model"], batch, rng),
        source=DataSource(train_data),
        eval_batches=eval_data,
    )
