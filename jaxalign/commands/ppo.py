"""`jaxalign ppo CONFIG.yaml [key.sub=value ...]`: PPO-RLHF with generation inside the one training loop.

Four models on one mesh: the policy (`model.path`, an SFT export), the frozen reference (the starting policy), the
critic (`value.path`, by default the reward model's weights; or the policy's trunk under a fresh value head) and the
reward: one reward model (`reward.model`), LLaMA-2's helpfulness and safety models (`reward.helpful` and
`reward.safety`, combined as in `jaxalign.rewards.Llama2Reward`) or a Python function (`reward.function`,
`module:function` taking `(prompts, responses, metadata)`). Prompts come from `data.train`: prompt records (e.g.
`demo:prompts`) or the prompts of preference pairs; `train.seq_len` is the whole sequence (prompt +
`generation.max_new_tokens`).

Each iteration samples `ppo.rollout_size` responses with the jitted KV-cache sampler on the current params, scores
them, and trains `ppo.epochs` passes of minibatches of `train.batch_size` (see
`jaxalign.objectives.ppo_algorithm`); `train.steps` counts minibatch steps and must be a whole number of
iterations. Metrics per iteration: `reward_mean`, `reward_std`, `kl`, `kl_beta`, `response_length`,
`eos_fraction`, `explained_variance`, `generation_s`, `scoring_s`, `training_s`; per step `policy_loss`,
`value_loss`, `entropy`, `clipfrac`, `approx_kl`. Every `train.eval_every` steps: greedy responses to the eval
prompts, their `eval_reward_mean` and `eval_kl`, and a few written to `OUTPUT_DIR/eval_samples.jsonl`. The policy
is exported to `OUTPUT_DIR/hf/`.
"""

import argparse
import json
from dataclasses import dataclass, field
from typing import Optional

from jaxalign import storage
from jaxalign.config import ModelSection, OptimizerConfig, RewardSection, RunConfig
from jaxalign.data.config import DataConfig
from jaxalign.errors import JaxalignError
from jaxalign.objectives.ppo_algorithm import PPOSettings
from jaxalign.rollouts import GenerationConfig
from jaxalign.train.command import (add_run_arguments, already_finished, export_adapter,
                                    export_model, lora_module, report_finished, run_tokenizer,
                                    run_training_command, with_lora)


@dataclass(frozen=True)
class ValueSection:
    """The critic: `path` (a score model or a causal LM whose trunk gets a fresh value head; default: the reward
    model of `reward.model` / `reward.helpful`, else the policy), in `dtype` / `param_dtype`."""

    path: Optional[str] = None
    dtype: str = "float32"
    param_dtype: str = "float32"


@dataclass(frozen=True)
class PPOConfig(RunConfig):
    """The loop's sections plus `model` (the policy), `value`, `reward`, `data` (prompts), `generation`, `ppo` and
    `value_optimizer` (the critic's optimiser)."""

    model: ModelSection = field(default_factory=ModelSection)
    value: ValueSection = field(default_factory=ValueSection)
    reward: RewardSection = field(default_factory=RewardSection)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ppo: PPOSettings = field(default_factory=PPOSettings)
    value_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self):
        self.reward.check()
        p = self.ppo
        if p.rollout_size % self.train.batch_size:
            raise JaxalignError(f"config key 'ppo.rollout_size': {p.rollout_size} samples do not split into "
                                f"minibatches of train.batch_size={self.train.batch_size}")
        per_iteration = p.epochs * p.rollout_size // self.train.batch_size
        if self.train.steps % per_iteration:
            raise JaxalignError(
                f"config key 'train.steps': {self.train.steps} is not a whole number of iterations of "
                f"{per_iteration} minibatch steps (ppo.epochs x ppo.rollout_size / train.batch_size); e.g. "
                f"train.steps={per_iteration * max(1, self.train.steps // per_iteration)}")
        self.generation.check_room(self.train.seq_len)
        if p.kl_kind not in ("k1", "k2", "k3"):
            raise JaxalignError(f"config key 'ppo.kl_kind': expected one of k1, k2, k3, got {p.kl_kind!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "configs/tiny/ppo.yaml")


def run(args: argparse.Namespace) -> int:
    return run_training_command(args, PPOConfig, train_ppo)


def train_ppo(config: PPOConfig, allow_config_change: bool = False) -> int:
    """Trains and exports the policy; 0 when OUTPUT_DIR holds the finished run with its export."""
    if already_finished(config, "ppo", allow_config_change):
        return 0
    from jaxalign.data.templates import chat_format
    from jaxalign.hf import save_pretrained
    from jaxalign.models.loading import model_source, seeded
    from jaxalign.objectives.ppo_algorithm import PPOSource, experience, make_algorithm
    from jaxalign.rollouts import Sampler, prompt_loaders, stop_token_ids
    from jaxalign.train.loop import train

    tokenizer, added = run_tokenizer(config)
    policy_source = seeded(model_source(config.model, tokenizer, mesh=config.mesh, new_tokens=added), config.seed)
    policy = policy_source.module()
    value_source = seeded(critic_source(config, tokenizer, added), config.seed + 1)
    value_model = value_source.module()
    if value_model.config.vocab_size != policy.config.vocab_size:
        raise JaxalignError(f"config key 'value.path': the critic has a vocabulary of {value_model.config.vocab_size} "
                            f"tokens, the policy {policy.config.vocab_size}; it must read the policy's tokens")
    train_loader, eval_data = prompt_loaders(config, tokenizer, config.ppo.rollout_size, "PPO")
    stop_ids = stop_token_ids(config, tokenizer)
    adapted = lora_module(config, policy)
    lora = config.model.lora is not None
    sampler = Sampler(adapted, config.generation, stop_ids, tokenizer.pad_token_id)
    from jaxalign.rewards import build_reward

    reward, reward_frozen = build_reward(config.reward, config.data, config.mesh, config.value.dtype,
                                         config.value.param_dtype)
    source = PPOSource(train_loader, sampler, reward, tokenizer, config.ppo, config.train.batch_size,
                       experience(adapted, value_model, policy, config.ppo, config.generation.temperature),
                       config.seed, lora=lora)
    evaluate = None
    if eval_data is not None:
        evaluate = evaluator(config, source, eval_data, tokenizer)
    algorithm = make_algorithm(adapted, value_model, policy, optimizer=config.optimizer,
                               value_optimizer=config.value_optimizer, source=source, settings=config.ppo,
                               temperature=config.generation.temperature, policy_init=policy_source.load,
                               value_init=value_source.load, reference_load=None if lora else policy_source.load,
                               frozen=reward_frozen, evaluate=evaluate)
    algorithm, export_params = with_lora(config, algorithm, policy_source, name="policy")
    state = train(config, algorithm, allow_config_change=allow_config_change)
    hf_dir = export_model(config, lambda folder: save_pretrained(
        policy, export_params(state.params), folder, tokenizer=tokenizer,
        chat_format=chat_format(config.data, tokenizer)))
    export_adapter(config, policy, state.params, tokenizer, name="policy")
    report_finished("ppo", config, int(state.step), f"the policy with its tokenizer ({hf_dir})")
    return 0


def critic_source(config: PPOConfig, tokenizer, added):
    """The critic's `ModelSource` (head "score"): `value.path`, else the reward model, else the policy's trunk."""
    from jaxalign.models.loading import model_source

    path = config.value.path or config.reward.model or config.reward.helpful or config.model.path
    section = ModelSection(path=path, config={} if path else dict(config.model.config), dtype=config.value.dtype,
                           param_dtype=config.value.param_dtype)
    return model_source(section, tokenizer, head="score", mesh=config.mesh, seed=config.seed, new_tokens=added)


def evaluator(config: PPOConfig, source, eval_data, tokenizer):
    """`evaluate(context)`: greedy responses to the eval prompts (`train.eval_batches` batches, all when 0), their
    mean reward (LLaMA-2's pair: the chosen model's raw score, not whitened over the batch) and KL to the
    reference; the first batch's samples appended to OUTPUT_DIR/eval_samples.jsonl."""
    import itertools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxalign import sharding as shd
    from jaxalign.rollouts import gather, prompt_messages, prompt_metadata, respond

    out = storage.location(config.output_dir) / "eval_samples.jsonl"

    def evaluate(context):
        rewards, kls, samples = [], [], []
        loader = eval_data()
        for local in itertools.islice(loader, config.train.eval_batches or None):
            policy_params = source.policy_params(context)
            answers = respond(source.sampler, policy_params, tokenizer, loader, local, context,
                              jax.random.PRNGKey(0), greedy=True)
            scores = np.asarray(source.reward(context, [prompt_messages(e) for e in answers.examples], answers.texts,
                                              [prompt_metadata(e) for e in answers.examples], whitened=False),
                                np.float32)
            zeros = jax.device_put(np.zeros(len(answers.real), np.float32),
                                   shd.batch_sharding(context.mesh, context.rules, 1))
            if source._jitted is None:
                source._jitted = jax.jit(source.experience_fn)
            _, metrics = source._jitted(policy_params, context.state.params["value"],
                                        source.reference_params(context), answers.batch, zeros, jnp.float32(0.0))
            rewards.append(scores)
            kls.append(gather(metrics["kl"], context)[answers.real])
            if not samples:
                samples = [{"step": context.step, "prompt": prompt_messages(e), "response": t, "reward": float(s),
                            "ended": bool(d)}
                           for e, t, s, d in list(zip(answers.examples, answers.texts, scores, answers.ended))[:4]]
        if jax.process_index() == 0 and samples:
            storage.append_lines(out, [json.dumps(sample) for sample in samples])
        return {"reward_mean": float(np.mean(np.concatenate(rewards))), "kl": float(np.mean(np.concatenate(kls)))}

    return evaluate
