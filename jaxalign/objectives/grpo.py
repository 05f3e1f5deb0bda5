"""Group-relative policy optimisation: the pure functions of GRPO, RLOO, Dr. GRPO and DAPO.

G responses are sampled per prompt and scored with one scalar reward each; there is no critic. The advantage of a
response is its reward compared with the other rewards of its group, broadcast to all of its tokens; the policy loss
per token is PPO's clipped surrogate (`jaxalign.objectives.ppo.policy_loss`), and the variants differ in how that
loss is averaged over the batch.

| step | function | source |
|---|---|---|
| advantage `grpo` | `(r - mean) / (std + ε)` over the group | Shao et al. 2024 (DeepSeekMath) |
| advantage `dr_grpo` | `r - mean` (no division by the std) | Liu et al. 2025 (Dr. GRPO) |
| advantage `rloo` | `r - mean of the other G-1 = G/(G-1) (r - mean)` | Ahmadian et al. 2024 (RLOO) |
| dynamic sampling | `all_equal_groups`: groups that carry no signal (all advantages 0) | Yu et al. 2025 (DAPO) |
| `token_mean` | `Σ loss / Σ tokens` over the whole batch | Yu et al. 2025 (DAPO) |
| `sequence_mean` | mean over each sequence's tokens, then over sequences | Shao et al. 2024 (GRPO) |
| `token_sum_norm` | each sequence's sum / max length, mean over sequences | Liu et al. 2025 (Dr. GRPO) |
| overlong shaping | `overlong_penalty`: 0 → -1 over the last L_cache tokens before L_max | Yu et al. 2025 (DAPO) |

Rewards are `[B]` with B = groups × G, consecutive rows forming a group (rows g·G .. g·G + G - 1). Token arrays are
`[B, T]` over response tokens with `mask [B, T]` non-zero on the valid tokens; masked slots are taken out with
`where` (a NaN or inf there reaches neither the values nor the gradients). Everything returns float32 (or bool) and
is jittable with the group size, kinds and lengths as Python constants.
Hand check: rewards [1, 0, 0, 1], one group → grpo (ddof 1, ε 1e-6) ±0.866024, dr_grpo ±0.5, rloo ±0.666667.
"""

import jax
import jax.numpy as jnp

from jaxalign.errors import JaxalignError
from jaxalign.train.algorithm import Mean

ADVANTAGE_KINDS = ("grpo", "dr_grpo", "rloo")
AGGREGATIONS = ("token_mean", "sequence_mean", "token_sum_norm")


def _groups(rewards, group_size: int) -> jax.Array:
    """`rewards [B]` as float32 `[B // G, G]`, after checking the shapes."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise JaxalignError(f"rewards must be one number per response, shape [B]; got shape {rewards.shape}")
    if not isinstance(group_size, int) or group_size < 2:
        raise JaxalignError(f"a group needs at least 2 responses to compare, got group size {group_size}")
    if rewards.shape[0] % group_size:
        raise JaxalignError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


def all_equal_groups(rewards, group_size: int) -> jax.Array:
    """`[B // G]` bool: True for the groups whose G rewards (`[B]`, consecutive rows per group) are all equal.

    Their advantages are 0 under every kind, so they contribute no policy gradient; DAPO's dynamic sampling (Yu et
    al. 2025) drops them and samples more prompts. Raises JaxalignError for G < 2 or B not a multiple of G.
    """
    groups = _groups(rewards, group_size)
    return jnp.all(groups == groups[:, :1], axis=1)


def group_advantages(rewards, group_size: int, kind: str, eps: float = 1e-6, ddof: int = 1) -> jax.Array:
    """Advantages `[B]` float32 of rewards `[B]` within their groups of `group_size` = G consecutive rows.

    With the group's mean `m` and standard deviation `s = sqrt(Σ (r_j - m)² / (G - ddof))`:

    - `grpo`: `(r_i - m) / (s + eps)` (Shao et al. 2024, DeepSeekMath; ddof 1 as `torch.std`, 0 as `numpy.std`);
    - `dr_grpo`: `r_i - m` (Liu et al. 2025, "Understanding R1-Zero-like training": the std division biases
      towards groups of nearly equal rewards);
    - `rloo`: `r_i - mean_{j≠i} r_j = G/(G-1) (r_i - m)` (Ahmadian et al. 2024, "Back to basics": REINFORCE with
      the leave-one-out baseline).

    A group whose rewards are all equal gets exactly 0 (never NaN, whatever eps and ddof). The advantage of the
    example [1, 0, 0, 1] (one group): grpo ±0.866024, dr_grpo ±0.5, rloo ±0.666667.
    Raises JaxalignError for an unknown kind, G < 2, B not a multiple of G, or ddof outside [0, G).
    """
    if kind not in ADVANTAGE_KINDS:
        raise JaxalignError(f"unknown advantage kind {kind!r}; expected one of {', '.join(ADVANTAGE_KINDS)}")
    groups = _groups(rewards, group_size)
    if not 0 <= ddof < group_size:
        raise JaxalignError(f"ddof must be in [0, {group_size}) for groups of {group_size}, got {ddof}")
    centred = groups - jnp.mean(groups, axis=1, keepdims=True)
    if kind == "grpo":
        std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (group_size - ddof))
        advantages = centred / (std + eps)
    elif kind == "dr_grpo":
        advantages = centred
    else:
        advantages = centred * (group_size / (group_size - 1))
    equal = jnp.all(groups == groups[:, :1], axis=1, keepdims=True)
    return jnp.where(equal, 0.0, advantages).reshape(-1)


def aggregate_mean(per_token_loss: jax.Array, mask: jax.Array, kind: str, max_length: int | None = None) -> Mean:
    """The loss of a batch as a `Mean` (total, count), so that adding the `Mean`s of micro-batches (or devices)
    gives exactly the value of the whole batch: `total / count` is `aggregate(...)`.

    per_token_loss: `[B, T]` (e.g. `ppo.policy_loss`'s first output, plus a KL term); mask: `[B, T]`, non-zero on
    the valid tokens. With `n_b` the valid tokens of sequence b and S the sequences with n_b > 0:

    - `token_mean` (DAPO, Yu et al. 2025): `(Σ_b Σ_t loss, Σ_b n_b)`: every token weighs the same;
    - `sequence_mean` (GRPO, Shao et al. 2024): `(Σ_{b∈S} Σ_t loss / n_b, |S|)`: every sequence weighs the same,
      its tokens share the weight;
    - `token_sum_norm` (Dr. GRPO, Liu et al. 2025): `(Σ_{b∈S} Σ_t loss / max_length, |S|)`: a constant
      normaliser, so no length bias; max_length (the generation budget L_max) is required.

    Raises JaxalignError for an unknown kind or a token_sum_norm without a positive max_length.
    """
    if kind not in AGGREGATIONS:
        raise JaxalignError(f"unknown loss aggregation {kind!r}; expected one of {', '.join(AGGREGATIONS)}")
    valid = jnp.asarray(mask) != 0
    loss = jnp.where(valid, jnp.asarray(per_token_loss, jnp.float32), 0.0)
    sums = jnp.sum(loss, axis=-1)
    counts = jnp.sum(valid, axis=-1, dtype=jnp.float32)
    if kind == "token_mean":
        return Mean(jnp.sum(sums), jnp.sum(counts))
    has_tokens = counts > 0
    if kind == "sequence_mean":
        per_sequence = sums / jnp.maximum(counts, 1.0)
    else:
        if max_length is None or not max_length > 0:
            raise JaxalignError(f"the token_sum_norm aggregation needs the maximum length (> 0), got {max_length}")
        per_sequence = sums / jnp.asarray(max_length, jnp.float32)
    return Mean(jnp.sum(jnp.where(has_tokens, per_sequence, 0.0)), jnp.sum(has_tokens, dtype=jnp.float32))


def aggregate(per_token_loss: jax.Array, mask: jax.Array, kind: str, max_length: int | None = None) -> jax.Array:
    """The loss of a batch, a float32 scalar: `per_token_loss [B, T]` averaged over the valid tokens of `mask
    [B, T]` as `kind` says (`token_mean`, `sequence_mean`, `token_sum_norm`; see `aggregate_mean`). A batch without
    valid tokens gives 0. Example: loss [[1, 2, 3], [4, ·, ·]] (· masked) → token_mean 10/4 = 2.5, sequence_mean
    (2 + 4)/2 = 3, token_sum_norm with max_length 4: (6/4 + 4/4)/2 = 1.25."""
    mean = aggregate_mean(per_token_loss, mask, kind, max_length)
    return mean.total / jnp.maximum(mean.count, 1.0)


def overlong_penalty(lengths, max_length: int, cache: int) -> jax.Array:
    """DAPO's soft overlong punishment (Yu et al. 2025), `[B]` float32, added to the rewards of responses of
    `lengths [B]` tokens:

        0                                     length ≤ L_max - L_cache
        ((L_max - L_cache) - length) / L_cache   L_max - L_cache < length ≤ L_max
        -1                                    length > L_max

    with max_length = L_max and cache = L_cache (DAPO: 20480 and 4096); it falls linearly from 0 to -1 over the
    last L_cache tokens. Raises JaxalignError unless 0 < cache ≤ max_length.
    """
    if not 0 < cache <= max_length:
        raise JaxalignError(f"the overlong penalty needs 0 < cache <= max_length, got cache {cache} and max_length "
                            f"{max_length}")
    lengths = jnp.asarray(lengths, jnp.float32)
    return jnp.clip(((max_length - cache) - lengths) / cache, -1.0, 0.0)
