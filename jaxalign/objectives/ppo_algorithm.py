"""PPO-RLHF as the one loop runs it: a policy and a critic trained, a frozen reference, and a batch source that
runs one iteration of rollouts at a time (Ouyang et al. 2022; Touvron et al. 2023 §3.2.3).

Each iteration (`PPOSource`): `rollout_size` prompts from the prompt loader; responses sampled from the current
policy on the training mesh (`jaxalign.rollouts`); their sequence scores from the reward function (optionally with a
penalty for a response without an end token, clipped and whitened); then one jitted pass computes, at the sampling
temperature and without dropout, the old log-probs, the reference log-probs and the critic's values, the per-token
KL penalty, the token rewards with the score at the last response token, GAE and whitened advantages
(`jaxalign.objectives.ppo`). The iteration's samples are served as `epochs × rollout_size / train.batch_size`
shuffled minibatches, one optimiser step each; a checkpoint is consistent between iterations only. β (fixed or the
adaptive controller) moves after each iteration and is saved with the source's state, so a resumed run repeats
every draw and every β.

The loss per minibatch (`make_loss_fn`) is the mean over its valid tokens of `policy_loss + vf_coef · value_loss -
entropy_coef · entropy`; the policy and the critic have their own optimisers (`optimizer`, `value_optimizer`).
"""

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import sharding as shd
from jaxalign.objectives import ppo
from jaxalign.objectives.logprobs import model_token_log_probs, model_token_statistics
from jaxalign.rollouts import Sampler, decode_responses, gather, prompt_messages, prompt_metadata
from jaxalign.train.algorithm import Algorithm, Frozen, Mean, StepContext, Trainable


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """The iteration and loss settings (config section `ppo`).

    rollout_size: samples per iteration (LLaMA-2: 512); epochs: passes over them (LLaMA-2: 1; common: 4);
    gamma, lam: GAE's γ and λ; clip_low / clip_high: ε of the ratio clip (clip_high null = clip_low); dual_clip: c
    (null = off); value_clip: the critic's clip (null = off); vf_coef, entropy_coef: loss weights; kl_kind: the
    per-token KL penalty (k1 | k2 | k3); kl_beta: β (LLaMA-2: 0.01); kl_target / kl_horizon: the adaptive controller
    (null = fixed β); score_clip: clip the sequence scores to ±c (null = off); whiten_scores: whiten the scores over
    the iteration; missing_eos_penalty: added to the score of a response that did not end (null = off);
    whiten_advantages: over the iteration's valid tokens."""

    rollout_size: int = 64
    epochs: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    kl_kind: str = "k1"
    kl_beta: float = 0.01
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    score_clip: float | None = None
    whiten_scores: bool = False
    missing_eos_penalty: float | None = None
    whiten_advantages: bool = True

    def kl_controller(self):
        if self.kl_target is None:
            return ppo.FixedKLController(self.kl_beta)
        return ppo.AdaptiveKLController(self.kl_beta, self.kl_target, self.kl_horizon)


def experience(policy, value_model, reference, settings: PPOSettings, temperature: float) -> Callable:
    """`fn(policy_params, value_params, reference_params, batch, scores [R], beta) -> (experience, metrics)`: the
    rollout batch with `old_logp`, `ref_logp`, `old_values`, `advantages`, `returns` `[R, L-1]` added, and per-sample
    `kl` `[R]` (k1 summed over the response) and `explained_variance`. Pure, for `jax.jit` under the mesh."""

    def fn(policy_params, value_params, reference_params, batch, scores, beta):
        mask = batch["loss_mask"]
        old_logp = model_token_log_probs(policy, policy_params, batch, temperature=temperature, needed=mask)
        ref_logp = model_token_log_probs(reference, reference_params, batch, temperature=temperature, needed=mask)
        values = critic_values(value_model, value_params, batch)
        kl = ppo.kl_penalty(old_logp, ref_logp, settings.kl_kind)
        rewards = ppo.sequence_score_rewards(kl, scores, mask, beta)
        advantages, returns = ppo.gae(rewards, values, mask, settings.gamma, settings.lam)
        if settings.whiten_advantages:
            advantages = ppo.whiten(advantages, mask)
        valid = mask != 0
        out = {**batch, "old_logp": jnp.where(valid, old_logp, 0.0), "ref_logp": jnp.where(valid, ref_logp, 0.0),
               "old_values": jnp.where(valid, values, 0.0), "advantages": advantages, "returns": returns}
        k1 = jnp.sum(jnp.where(valid, old_logp - ref_logp, 0.0), axis=1)
        metrics = {"kl": k1, "explained_variance": ppo.explained_variance(values, returns, mask)}
        return out, metrics

    return fn


def critic_values(value_model, params, batch) -> jax.Array:
    """The critic's value of every input position `[R, L-1]` (the state before each target token)."""
    return value_model.apply({"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"])


def make_loss_fn(policy, value_model, settings: PPOSettings, temperature: float) -> Callable:
    """`loss(params, frozen, batch, rng) -> (objective, metrics)` of one minibatch of experience: the mean over
    valid tokens of `policy_loss + vf_coef · value_loss - entropy_coef · entropy`; metrics `policy_loss`,
    `value_loss`, `entropy`, `clipfrac`, `approx_kl` (to the policy that sampled), per token."""

    def loss(params, frozen, batch, rng):
        mask = batch["loss_mask"]
        stats = model_token_statistics(policy, params["policy"], batch, temperature=temperature, entropy=True,
                                       needed=mask)
        logp = stats.log_probs
        policy_losses, clipped = ppo.policy_loss(logp, batch["old_logp"], batch["advantages"], mask,
                                                 settings.clip_low, settings.clip_high, settings.dual_clip)
        values = critic_values(value_model, params["value"], batch)
        value_losses = ppo.value_loss(values, batch["old_values"], batch["returns"], mask, settings.value_clip)
        entropy = stats.entropy
        per_token = policy_losses + settings.vf_coef * value_losses - settings.entropy_coef * entropy
        valid = mask != 0
        count = jnp.sum(valid, dtype=jnp.float32)
        objective = Mean(jnp.sum(jnp.where(valid, per_token, 0.0)), count)
        metrics = {
            "policy_loss": Mean.of(policy_losses, mask),
            "value_loss": Mean.of(value_losses, mask),
            "entropy": Mean.of(entropy, mask),
            "clipfrac": Mean.of(clipped, mask),
            "approx_kl": Mean.of(ppo.approx_kl(logp, batch["old_logp"]), mask),
        }
        return objective, metrics

    return loss


class RolloutSource:
    """The loop's batch source for on-policy RL: one iteration of rollouts, then its minibatches (see the module
    docstring). Subclasses turn the scored samples into experience (`make_experience`).

    loader: a prompt loader (`jaxalign.data`, kind "prompt"), one batch of prompts per iteration, each prompt
    sampled `repeat` times (consecutive rows); reward: `reward(context, prompts, responses, metadata)` (host);
    tokenizer: to decode responses; epochs: passes over the samples in minibatches of `minibatch` rows; lora: the
    policy trains LoRA adapters (its whole params are the frozen base merged with them, and the base is the
    reference)."""

    def __init__(self, loader, sampler: Sampler, reward: Callable, tokenizer, minibatch: int, epochs: int,
                 experience_fn: Callable, seed: int, lora: bool = False, repeat: int = 1):
        self.loader, self.sampler, self.reward, self.tokenizer = loader, sampler, reward, tokenizer
        self.minibatch, self.epochs, self.seed, self.lora, self.repeat = minibatch, epochs, seed, lora, repeat
        self.experience_fn = experience_fn
        self.iteration = 0
        self.buffer: list[dict] = []
        self._jitted = None
        self._take = None
        self._iteration_end = None

    def policy_params(self, context: StepContext):
        """The policy's whole parameter tree (with LoRA: the trained adapters merged with the frozen base)."""
        if self.lora:
            from jaxalign.train.adapters import whole_params

            return whole_params(context.state.params, context.frozen, "policy")
        return context.state.params["policy"]

    def reference_params(self, context: StepContext):
        """The reference's parameters: its frozen copy, or with LoRA the base under the adapters (None when the
        algorithm loads no reference)."""
        if self.lora:
            from jaxalign.train.adapters import BASE

            return context.frozen[BASE]
        return context.frozen.get("reference")

    def next_batch(self, context: StepContext) -> tuple[dict, dict]:
        host_metrics = {}
        if not self.buffer:
            host_metrics = self.start_iteration(context)
        return self.buffer.pop(0), host_metrics

    def can_checkpoint(self) -> bool:
        return not self.buffer

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.loader.load_state_dict(state["loader"])
        self.buffer = []

    def prompts(self, context: StepContext):
        """(the iteration's prompt examples, one per sample row, and the global prompt arrays)."""
        local = next(self.loader)
        arrays = {k: np.repeat(local[k], self.repeat, axis=0) for k in ("input_ids", "segment_ids", "positions")}
        index = np.repeat(gather(local["example_index"], context), self.repeat)
        return [self.loader.examples[i] for i in index], shd.global_batch(arrays, context.mesh, context.rules)

    def start_iteration(self, context: StepContext) -> dict:
        now = time.perf_counter()
        training_s = now - self._iteration_end if self._iteration_end is not None else None
        examples, prompts = self.prompts(context)
        rng = jax.random.fold_in(context.state.rng, 1_000_000 + context.step)
        policy_params = self.policy_params(context)
        start = time.perf_counter()
        batch, tokens, lengths = jax.block_until_ready(
            self.sampler(policy_params, prompts, rng, context.mesh, context.rules))
        generation_s = time.perf_counter() - start
        tokens, lengths = gather(tokens, context), gather(lengths, context)
        responses, ended = decode_responses(self.tokenizer, tokens, lengths, self.sampler.stop_token_ids)
        start = time.perf_counter()
        raw = self.reward(context, [prompt_messages(e) for e in examples], responses,
                          [prompt_metadata(e) for e in examples])
        scoring_s = time.perf_counter() - start
        if self._jitted is None:
            self._jitted = jax.jit(self.experience_fn)
        exp, out = self.make_experience(context, policy_params, batch, raw, lengths, ended)
        self.buffer = self.minibatches(exp, context)
        self.iteration += 1
        self._iteration_end = time.perf_counter()
        n = float(len(lengths))
        out.update({
            "response_length": Mean(float(lengths.sum()), n),
            "eos_fraction": Mean(float(ended.sum()), n),
            "generation_s": Mean(generation_s * n, n),
            "scoring_s": Mean(scoring_s * n, n),
        })
        if training_s is not None:
            out["training_s"] = Mean(training_s * n, n)
        return out

    def make_experience(self, context, policy_params, batch, raw, lengths, ended) -> tuple[dict, dict]:
        """(the experience rows to train on, the iteration's host metrics) from the sampled `batch` and the reward's
        output `raw`."""
        raise NotImplementedError

    def minibatches(self, exp: dict, context: StepContext) -> list[dict]:
        """`epochs` shuffled passes over the iteration's rows in minibatches (the order from the seed and the
        iteration, the same on every process)."""
        rows = exp["loss_mask"].shape[0]
        if self._take is None:
            self._take = jax.jit(lambda tree, index: jax.tree.map(lambda x: x[index], tree),
                                 out_shardings=shd.batch_sharding(context.mesh, context.rules, 2))
        out = []
        for epoch in range(self.epochs):
            order = np.random.default_rng([self.seed, self.iteration, epoch]).permutation(rows)
            for start in range(0, rows, self.minibatch):
                out.append(self._take(exp, jnp.asarray(order[start:start + self.minibatch])))
        return out


class PPOSource(RolloutSource):
    """PPO's iterations: scores shaped (`missing_eos_penalty`, `score_clip`, `whiten_scores`), the jitted
    experience pass with the critic and the reference, β updated after each iteration and saved with the state."""

    def __init__(self, loader, sampler: Sampler, reward: Callable, tokenizer, settings: PPOSettings, minibatch: int,
                 experience_fn: Callable, seed: int, lora: bool = False):
        if settings.rollout_size % minibatch:
            raise ValueError("rollout_size must be a multiple of the minibatch")
        super().__init__(loader, sampler, reward, tokenizer, minibatch, settings.epochs, experience_fn, seed, lora)
        self.settings = settings
        self.kl = settings.kl_controller()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kl": self.kl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kl.load_state_dict(state["kl"])

    def make_experience(self, context, policy_params, batch, raw, lengths, ended):
        raw = np.asarray(raw, np.float32)
        scores = self.shape_scores(raw, ended)
        global_scores = jax.device_put(scores, shd.batch_sharding(context.mesh, context.rules, 1))
        exp, metrics = self._jitted(policy_params, context.state.params["value"], self.reference_params(context),
                                    batch, global_scores, jnp.float32(self.kl.value))
        kl = gather(metrics["kl"], context)
        beta = self.kl.value
        self.kl.update(float(np.mean(kl)), len(kl))
        n = float(len(raw))
        return exp, {
            "reward_mean": Mean(float(raw.sum()), n),
            "reward_std": Mean(float(raw.std()) * n, n),
            "kl": Mean(float(kl.sum()), n),
            "kl_beta": Mean(beta * n, n),
            "explained_variance": Mean(float(metrics["explained_variance"]) * n, n),
        }

    def shape_scores(self, raw: np.ndarray, ended: np.ndarray) -> np.ndarray:
        s = self.settings
        scores = raw.astype(np.float32)
        if s.missing_eos_penalty is not None:
            scores = np.where(ended, scores, scores + s.missing_eos_penalty)
        if s.score_clip is not None:
            scores = np.clip(scores, -s.score_clip, s.score_clip)
        if s.whiten_scores:
            scores = np.asarray(ppo.whiten(scores))
        return scores.astype(np.float32)


def make_algorithm(policy, value_model, reference_model, *, optimizer, value_optimizer, source: PPOSource,
                   settings: PPOSettings, temperature: float, policy_init, value_init, reference_load=None,
                   frozen: dict | None = None, evaluate=None) -> Algorithm:
    """PPO as the loop runs it: trainables `policy` and `value` (their own optimisers; `value_optimizer` read from
    the config section `value_optimizer`), the frozen `reference` (none with `reference_load=None`: the LoRA base
    serves as the reference) and any other frozen models (e.g. reward models) in `frozen`, the iteration source and
    the minibatch loss."""
    reference = {"reference": Frozen(reference_model, reference_load)} if reference_load is not None else {}
    return Algorithm(
        trainables={"policy": Trainable(policy, optimizer, policy_init),
                    "value": Trainable(value_model, value_optimizer, value_init, optimizer_key="value_optimizer")},
        loss=make_loss_fn(policy, value_model, settings, temperature),
        source=source,
        frozen={**reference, **(frozen or {})},
        evaluate=evaluate,
    )
