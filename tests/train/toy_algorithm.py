"""A test-only algorithm that uses everything the loop's contract offers, shaped like on-policy RL.

- two trainables with their own optimisers: a `policy` LM and a `value` model (score head), the value's lr half the
  policy's;
- a frozen `reference` LM (random weights from a fixed seed, reloaded on every start);
- a batch source that, at the start of each iteration, samples responses to random prompts from the *current*
  policy with the device-level decode on the training mesh, then serves them as `MINIBATCHES` minibatches; a
  checkpoint is only consistent between iterations;
- a loss with a per-token metric (`policy_nll`, `kl`) and a per-sequence one (`value_mse`), and a host metric
  (`response_length`, per sequence).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxalign import sharding as shd
from jaxalign.data.packing import prompt_batch
from jaxalign.models.heads import LlamaForScore, last_token_scores
from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM
from jaxalign.objectives.logprobs import model_token_log_probs
from jaxalign.sampling import SamplingParams, decode
from jaxalign.train import state as st
from jaxalign.train.algorithm import Algorithm, Frozen, Mean, StepContext, Trainable
from jaxalign.train.loop import model_init_fn

MINIBATCHES = 3
PROMPT_LEN = 6
NEW_TOKENS = 6
STOP_TOKENS = tuple(range(3, 67))  # a quarter of the tiny vocabulary: responses end after ~4 tokens, unevenly
REFERENCE_SEED = 123


def toy_config() -> LlamaConfig:
    return LlamaConfig.tiny(scan_layers=True)


class RolloutSource:
    """Each iteration: `MINIBATCHES * batch_size` random prompts (from the iteration number), completed by the
    current policy at temperature 1 (rng from the state and the step), served minibatch by minibatch."""

    def __init__(self, policy, batch_size: int, process_index: int = 0, process_count: int = 1):
        self.policy = policy
        self.batch_size = batch_size
        self.process_index, self.process_count = process_index, process_count
        self.iteration = 0
        self.buffer: list[dict] = []
        self._rollout = None

    def next_batch(self, context: StepContext) -> tuple[dict, dict]:
        host_metrics = {}
        if not self.buffer:
            self.buffer, lengths = self.rollout(context)
            self.iteration += 1
            host_metrics["response_length"] = Mean(float(np.sum(lengths)), float(lengths.size))
        return self.buffer.pop(0), host_metrics

    def can_checkpoint(self) -> bool:
        return not self.buffer

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.buffer = []

    def prompts(self) -> dict:
        rows = MINIBATCHES * self.batch_size
        rng = np.random.default_rng([7, self.iteration])
        lengths = rng.integers(2, PROMPT_LEN + 1, rows)
        prompts = [rng.integers(3, toy_config().vocab_size, n) for n in lengths]
        local = slice(self.process_index * rows // self.process_count, (self.process_index + 1) * rows // self.process_count)
        batch = prompt_batch(prompts[local], PROMPT_LEN, pad_id=0)
        return {k: batch[k] for k in ("input_ids", "segment_ids", "positions")}

    def rollout(self, context: StepContext) -> tuple[list[dict], np.ndarray]:
        prompts = shd.global_batch(self.prompts(), context.mesh, context.rules)
        if self._rollout is None:
            self._rollout = jax.jit(self.sample_and_build,
                                    out_shardings=(shd.batch_sharding(context.mesh, context.rules, 3),
                                                   NamedSharding(context.mesh, PartitionSpec())))
        rng = jax.random.fold_in(context.state.rng, 1_000_000 + context.step)
        stacked, lengths = self._rollout(context.state.params["policy"], prompts, rng)
        minibatches = [jax.tree.map(lambda x: x[:, i], stacked) for i in range(MINIBATCHES)]
        return minibatches, np.asarray(jax.device_get(lengths))

    def sample_and_build(self, params, prompts: dict, rng):
        tokens, _, lengths = decode(
            self.policy, params, prompts["input_ids"], prompts["segment_ids"], prompts["positions"], rng,
            max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=1.0),
            stop_token_ids=jnp.asarray(STOP_TOKENS, jnp.int32), pad_id=0,
        )
        rows = prompts["input_ids"].shape[0]
        response = jnp.arange(NEW_TOKENS)[None, :] < lengths[:, None]
        ids = jnp.concatenate([prompts["input_ids"], tokens], axis=1)
        segments = jnp.concatenate([prompts["segment_ids"], response.astype(jnp.int32)], axis=1)
        prompt_lengths = jnp.sum(prompts["segment_ids"], axis=1)
        positions = jnp.concatenate([prompts["positions"], prompt_lengths[:, None] + jnp.arange(NEW_TOKENS)[None]],
                                    axis=1)
        loss_mask = jnp.concatenate([jnp.zeros_like(prompts["input_ids"]), response.astype(jnp.int32)], axis=1)
        batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": segments[:, :-1],
                 "positions": positions[:, :-1], "loss_mask": loss_mask[:, 1:]}
        # Minibatch i takes rows i, i + M, ... so each keeps the rows spread over every device.
        stacked = jax.tree.map(lambda x: x.reshape(rows // MINIBATCHES, MINIBATCHES, *x.shape[1:]), batch)
        return stacked, lengths


def make_toy_algorithm(optimizer, batch_size: int, process_index: int = 0, process_count: int = 1) -> Algorithm:
    policy = LlamaForCausalLM(toy_config())
    value = LlamaForScore(toy_config())
    reference = LlamaForCausalLM(toy_config())

    def load_reference(shardings):
        return st.init_params(model_init_fn(reference), jax.random.PRNGKey(REFERENCE_SEED), shardings)

    def loss(params, frozen, batch, rng):
        mask = batch["loss_mask"]
        logp = model_token_log_probs(policy, params["policy"], batch)
        ref = model_token_log_probs(reference, frozen["reference"], batch)
        kl = 0.5 * (logp - ref) ** 2
        scores = value.apply({"params": params["value"]}, batch["input_ids"], batch["positions"],
                             batch["segment_ids"])
        tokens_per_row = jnp.maximum(jnp.sum(mask, axis=1), 1)
        value_target = jnp.sum(jnp.where(mask != 0, ref, 0.0), axis=1) / tokens_per_row
        value_error = (last_token_scores(scores, batch["segment_ids"]) - value_target) ** 2
        per_token = jnp.where(mask != 0, -logp + kl, 0.0)
        objective = Mean(jnp.sum(per_token) + jnp.sum(value_error), jnp.sum(mask).astype(jnp.float32))
        metrics = {"policy_nll": Mean.of(-logp, mask), "kl": Mean.of(kl, mask), "value_mse": Mean.of(value_error)}
        return objective, metrics

    return Algorithm(
        trainables={
            "policy": Trainable(policy, optimizer),
            "value": Trainable(value, dataclasses.replace(optimizer, lr=optimizer.lr / 2), optimizer_key="value"),
        },
        frozen={"reference": Frozen(reference, load_reference)},
        loss=loss,
        source=RolloutSource(policy, batch_size, process_index, process_count),
    )
