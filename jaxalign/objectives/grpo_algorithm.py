"""Group-relative RL (GRPO, Dr. GRPO, RLOO, DAPO) as the one loop runs it, on PPO's rollout machinery.

Each iteration (`GRPOSource`, a `RolloutSource`): `prompts_per_iteration` prompts, each sampled `group_size` times
in one jitted generate call; every sample scored by the weighted sum of the reward functions (plus DAPO's overlong
penalty when set); advantages relative to the sample's group (`jaxalign.objectives.grpo.group_advantages`),
broadcast to its tokens; with `dynamic_sampling` the groups whose rewards are all equal are masked out of the loss
(they carry no signal; the batch keeps its shape instead of being refilled); one jitted pass gives the old
log-probs (and the reference's when `kl_beta` > 0). No critic. The loss per minibatch is the clipped policy loss
(ε_low, ε_high) plus `kl_beta ·` k3 KL to the reference, aggregated by `aggregation`
(`jaxalign.objectives.grpo.aggregate_mean`).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import sharding as shd
from jaxalign.objectives import grpo, ppo
from jaxalign.objectives.logprobs import model_token_log_probs, model_token_statistics
from jaxalign.objectives.ppo_algorithm import RolloutSource
from jaxalign.rollouts import Sampler
from jaxalign.train.algorithm import Algorithm, Frozen, Mean, Trainable


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """Config section `grpo`: `prompts_per_iteration`, `group_size` G, `epochs` (policy updates per batch),
    `advantage` (grpo | dr_grpo | rloo) with `eps` and `ddof` (the std of GRPO), `aggregation` (token_mean |
    sequence_mean | token_sum_norm), `clip_low` / `clip_high` (ε; DAPO: 0.2 / 0.28), `kl_beta` (the k3 KL loss
    weight; 0 = no reference model), `dynamic_sampling` (mask out all-equal groups), `overlong_cache` (DAPO's soft
    overlong penalty over the last L_cache tokens before `generation.max_new_tokens`; null = off), `eval_samples`
    (evaluation also samples each eval prompt this many times at the generation temperature; 0 = greedy only)."""

    prompts_per_iteration: int = 8
    group_size: int = 4
    epochs: int = 1
    advantage: str = "grpo"
    eps: float = 1e-6
    ddof: int = 1
    aggregation: str = "sequence_mean"
    clip_low: float = 0.2
    clip_high: float | None = None
    kl_beta: float = 0.0
    dynamic_sampling: bool = False
    overlong_cache: int | None = None
    eval_samples: int = 0

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_iteration * self.group_size


def experience(policy, reference, temperature: float, with_reference: bool) -> Callable:
    """`fn(policy_params, reference_params, batch, advantages [R], row_mask [R]) -> experience`: the rollout batch
    with `old_logp` (and `ref_logp`) `[R, L-1]`, the advantages broadcast to the response tokens, and `loss_mask`
    cleared on masked rows."""

    def fn(policy_params, reference_params, batch, advantages, row_mask):
        mask = batch["loss_mask"] * row_mask[:, None].astype(batch["loss_mask"].dtype)
        valid = mask != 0
        old_logp = model_token_log_probs(policy, policy_params, batch, temperature=temperature, needed=mask)
        out = {**batch, "loss_mask": mask, "old_logp": jnp.where(valid, old_logp, 0.0),
               "advantages": jnp.where(valid, advantages[:, None], 0.0)}
        if with_reference:
            ref_logp = model_token_log_probs(reference, reference_params, batch, temperature=temperature, needed=mask)
            out["ref_logp"] = jnp.where(valid, ref_logp, 0.0)
        return out

    return fn


def make_loss_fn(policy, settings: GRPOSettings, temperature: float, max_length: int) -> Callable:
    """`loss(params, frozen, batch, rng) -> (objective, metrics)`: the clipped policy loss (+ `kl_beta` · k3 KL)
    aggregated by `settings.aggregation`; metrics `policy_loss`, `clipfrac`, `approx_kl`, `entropy` per token and
    `kl` (k3 to the reference) when `kl_beta` > 0."""

    def loss(params, frozen, batch, rng):
        mask = batch["loss_mask"]
        stats = model_token_statistics(policy, params["policy"], batch, temperature=temperature, entropy=True,
                                       needed=mask)
        logp = stats.log_probs
        per_token, clipped = ppo.policy_loss(logp, batch["old_logp"], batch["advantages"], mask, settings.clip_low,
                                             settings.clip_high)
        metrics = {
            "policy_loss": Mean.of(per_token, mask),
            "clipfrac": Mean.of(clipped, mask),
            "approx_kl": Mean.of(ppo.approx_kl(logp, batch["old_logp"]), mask),
            "entropy": Mean.of(stats.entropy, mask),
        }
        if settings.kl_beta:
            kl = ppo.kl_penalty(logp, batch["ref_logp"], "k3")
            per_token = per_token + settings.kl_beta * jnp.where(mask != 0, kl, 0.0)
            metrics["kl"] = Mean.of(kl, mask)
        return grpo.aggregate_mean(per_token, mask, settings.aggregation, max_length), metrics

    return loss


class GRPOSource(RolloutSource):
    """GRPO's iterations: group rewards, group-relative advantages, optional dynamic sampling (see the module
    docstring). `reward(context, prompts, responses, metadata) -> {name: scores [R]}` gives each weighted reward
    function's scores; `weights` their weights; `correctness` names the function whose mean is logged as
    `accuracy`."""

    def __init__(self, loader, sampler: Sampler, reward: Callable, weights: dict, tokenizer,
                 settings: GRPOSettings, minibatch: int, experience_fn: Callable, seed: int,
                 max_new_tokens: int, lora: bool = False, correctness: str | None = None):
        super().__init__(loader, sampler, reward, tokenizer, minibatch, settings.epochs, experience_fn, seed, lora,
                         repeat=settings.group_size)
        self.settings, self.weights, self.max_new_tokens = settings, weights, max_new_tokens
        self.correctness = correctness

    def make_experience(self, context, policy_params, batch, raw, lengths, ended):
        s = self.settings
        n = float(len(lengths))
        out = {}
        total = np.zeros(len(lengths), np.float32)
        for name, scores in raw.items():
            scores = np.asarray(scores, np.float32)
            total += self.weights[name] * scores
            out[f"reward/{name}"] = Mean(float(scores.sum()), n)
            out[f"reward_std/{name}"] = Mean(float(scores.std()) * n, n)
        if self.correctness is not None:
            out["accuracy"] = Mean(float(np.sum(np.asarray(raw[self.correctness]) > 0)), n)
        if s.overlong_cache:
            total += np.asarray(grpo.overlong_penalty(lengths, self.max_new_tokens, s.overlong_cache))
        advantages = np.asarray(grpo.group_advantages(total, s.group_size, s.advantage, s.eps, s.ddof), np.float32)
        equal = np.asarray(grpo.all_equal_groups(total, s.group_size))
        row_mask = np.ones(len(total), np.float32)
        if s.dynamic_sampling:
            row_mask = np.repeat(~equal, s.group_size).astype(np.float32)
        out.update({
            "reward_mean": Mean(float(total.sum()), n),
            "reward_std": Mean(float(total.std()) * n, n),
            "all_equal_groups": Mean(float(equal.sum()), float(equal.size)),
        })
        rows = shd.batch_sharding(context.mesh, context.rules, 1)
        exp = self._jitted(policy_params, self.reference_params(context), batch,
                           jax.device_put(advantages, rows), jax.device_put(row_mask, rows))
        return exp, out


def make_algorithm(policy, reference_model, *, optimizer, source: GRPOSource, settings: GRPOSettings,
                   temperature: float, max_length: int, policy_init, reference_load=None) -> Algorithm:
    """GRPO as the loop runs it: one trainable `policy`, a frozen `reference` only with `reference_load` (when
    `kl_beta` > 0 and the reference is not a LoRA base), the iteration source and the minibatch loss."""
    return Algorithm(
        trainables={"policy": Trainable(policy, optimizer, policy_init)},
        loss=make_loss_fn(policy, settings, temperature, max_length),
        source=source,
        frozen={"reference": Frozen(reference_model, reference_load)} if reference_load is not None else {},
    )
