"""`jaxalign grpo CONFIG.yaml [key.sub=value ...]`: group-relative RL with verifiable rewards (GRPO, Dr. GRPO, RLOO,
DAPO) on the rollout machinery of `jaxalign ppo`, with no critic.

The policy starts from `model.path`; `grpo.group_size` samples per prompt come from one jitted generate call on the
training mesh; rewards are Python functions (`rewards: [{function: module:function, weight: 1.0}, ...]`, each
called as `fn(prompts, responses, metadata)`, metadata holding the prompt's `reference` answer), summed with their
weights. `grpo.advantage`: grpo | dr_grpo | rloo; `grpo.aggregation`: token_mean | sequence_mean | token_sum_norm;
`grpo.clip_low` / `grpo.clip_high`; `grpo.kl_beta` > 0 adds a k3 KL term to the starting policy (0: no reference
model is loaded); `grpo.dynamic_sampling` masks out groups with all-equal rewards; `grpo.overlong_cache` is DAPO's
soft overlong penalty. `train.batch_size` is the minibatch in samples, `train.steps` counts minibatch steps (a whole
number of iterations of `grpo.epochs × prompts_per_iteration × group_size / train.batch_size`), `train.seq_len`
is prompt + `generation.max_new_tokens`.

Metrics per iteration: `reward_mean`, `reward_std` (the weighted sum), `reward/<function>` and
`reward_std/<function>`, `accuracy` (the share of samples the first reward function scores above 0: the
correctness reward of a verifiable task), `all_equal_groups`, `response_length`, `eos_fraction`, `generation_s`,
`scoring_s`, `training_s`; per step `policy_loss`, `clipfrac`, `approx_kl`, `entropy` and `kl` when on. Every
`train.eval_every` steps: greedy answers to the eval prompts, `eval_accuracy` and `eval_reward/<function>`; with
`grpo.eval_samples` = k > 0 also k samples per eval prompt at the generation temperature and
`eval_sampled_accuracy`, their mean accuracy (pass@1 estimated from k samples, as DeepSeek-R1 reports it). The
policy is exported to `OUTPUT_DIR/hf/` (with `model.lora`: merged, and the PEFT adapter in `OUTPUT_DIR/adapter/`).
"""

import argparse
import dataclasses
from dataclasses import dataclass, field

from jaxalign.config import ModelSection, RunConfig
from jaxalign.data.config import DataConfig
from jaxalign.errors import JaxalignError
from jaxalign.objectives.grpo_algorithm import GRPOSettings
from jaxalign.rollouts import GenerationConfig
from jaxalign.train.command import (add_run_arguments, already_finished, export_adapter,
                                    export_model, lora_module, report_finished, run_tokenizer,
                                    run_training_command, with_lora)


@dataclass(frozen=True)
class RewardFunction:
    """One reward: `function` (`module:function`) and its `weight` in the sum."""

    function: str = "jaxalign.rewards:correct_answer"
    weight: float = 1.0


@dataclass(frozen=True)
class GRPOConfig(RunConfig):
    """The loop's sections plus `model` (the policy), `rewards`, `data` (prompts), `generation` and `grpo`."""

    model: ModelSection = field(default_factory=ModelSection)
    rewards: tuple[RewardFunction, ...] = (RewardFunction(),)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)

    def __post_init__(self):
        from jaxalign.objectives.grpo import ADVANTAGE_KINDS, AGGREGATIONS

        g = self.grpo
        if g.group_size < 2:
            raise JaxalignError(f"config key 'grpo.group_size': advantages relative to a group need at least 2 "
                                f"samples per prompt, got {g.group_size}")
        if g.advantage not in ADVANTAGE_KINDS:
            raise JaxalignError(f"config key 'grpo.advantage': expected one of {', '.join(ADVANTAGE_KINDS)}, got "
                                f"{g.advantage!r}")
        if g.aggregation not in AGGREGATIONS:
            raise JaxalignError(f"config key 'grpo.aggregation': expected one of {', '.join(AGGREGATIONS)}, got "
                                f"{g.aggregation!r}")
        if not self.rewards:
            raise JaxalignError("config key 'rewards': at least one reward function")
        if g.rollout_size % self.train.batch_size:
            raise JaxalignError(f"config key 'train.batch_size': {g.rollout_size} samples per iteration "
                                f"(grpo.prompts_per_iteration x grpo.group_size) do not split into minibatches of "
                                f"{self.train.batch_size}")
        per_iteration = g.epochs * g.rollout_size // self.train.batch_size
        if self.train.steps % per_iteration:
            whole = per_iteration * max(1, self.train.steps // per_iteration)
            raise JaxalignError(f"config key 'train.steps': {self.train.steps} is not a whole number of iterations of "
                                f"{per_iteration} minibatch steps; e.g. train.steps={whole}")
        self.generation.check_room(self.train.seq_len)
        if g.eval_samples < 0:
            raise JaxalignError(f"config key 'grpo.eval_samples': expected >= 0, got {g.eval_samples}")
        if g.overlong_cache is not None and not 0 < g.overlong_cache <= self.generation.max_new_tokens:
            raise JaxalignError(f"config key 'grpo.overlong_cache': expected 1..generation.max_new_tokens, got "
                                f"{g.overlong_cache}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "configs/tiny/grpo.yaml")


def run(args: argparse.Namespace) -> int:
    return run_training_command(args, GRPOConfig, train_grpo)


def reward_functions(config: GRPOConfig):
    """(`reward(context, prompts, responses, metadata) -> {name: scores}`, {name: weight}); a name is the function's
    `module:function` spec."""
    from jaxalign.rewards import function_reward

    functions = {r.function: function_reward(r.function) for r in config.rewards}
    if len(functions) != len(config.rewards):
        raise JaxalignError("config key 'rewards': a function is listed twice")
    weights = {r.function: r.weight for r in config.rewards}
    return (lambda context, prompts, responses, metadata: {
        name: fn(prompts, responses, metadata) for name, fn in functions.items()}), weights


def train_grpo(config: GRPOConfig, allow_config_change: bool = False) -> int:
    """Trains and exports the policy; 0 when OUTPUT_DIR holds the finished run with its export."""
    if already_finished(config, "grpo", allow_config_change):
        return 0
    from jaxalign.data.templates import chat_format
    from jaxalign.hf import save_pretrained
    from jaxalign.models.loading import model_source, seeded
    from jaxalign.objectives.grpo_algorithm import GRPOSource, experience, make_algorithm
    from jaxalign.rollouts import Sampler, prompt_loaders, stop_token_ids
    from jaxalign.train.loop import train

    tokenizer, added = run_tokenizer(config)
    source = seeded(model_source(config.model, tokenizer, mesh=config.mesh, new_tokens=added), config.seed)
    policy = source.module()
    adapted = lora_module(config, policy)
    lora = config.model.lora is not None
    train_loader, eval_data = prompt_loaders(config, tokenizer, config.grpo.prompts_per_iteration, "GRPO")
    sampler = Sampler(adapted, config.generation, stop_token_ids(config, tokenizer), tokenizer.pad_token_id)
    reward, weights = reward_functions(config)
    with_reference = config.grpo.kl_beta > 0
    rollouts = GRPOSource(train_loader, sampler, reward, weights, tokenizer, config.grpo, config.train.batch_size,
                          experience(adapted, policy, config.generation.temperature, with_reference), config.seed,
                          config.generation.max_new_tokens, lora=lora, correctness=config.rewards[0].function)
    algorithm = make_algorithm(adapted, policy, optimizer=config.optimizer, source=rollouts, settings=config.grpo,
                               temperature=config.generation.temperature,
                               max_length=config.generation.max_new_tokens, policy_init=source.load,
                               reference_load=source.load if with_reference and not lora else None)
    if eval_data is not None:
        algorithm = dataclasses.replace(algorithm, evaluate=evaluator(config, rollouts, eval_data))
    algorithm, export_params = with_lora(config, algorithm, source, name="policy")
    state = train(config, algorithm, allow_config_change=allow_config_change)
    hf_dir = export_model(config, lambda folder: save_pretrained(
        policy, export_params(state.params), folder, tokenizer=tokenizer,
        chat_format=chat_format(config.data, tokenizer)))
    export_adapter(config, policy, state.params, tokenizer, name="policy")
    report_finished("grpo", config, int(state.step), f"the policy with its tokenizer ({hf_dir})")
    return 0


def evaluator(config: GRPOConfig, rollouts, eval_data):
    """`evaluate(context)`: greedy answers to the eval prompts (`train.eval_batches` batches, all when 0):
    `accuracy` (share scored above 0 by the first reward function) and `reward/<function>`; with
    `grpo.eval_samples` = k > 0 also `sampled_accuracy`, the share of k samples per prompt at the generation
    temperature scored above 0 (the same seed at every evaluation)."""
    import itertools

    import jax
    import numpy as np

    from jaxalign.rollouts import prompt_messages, prompt_metadata, respond

    correctness = config.rewards[0].function

    def scored(context, answers) -> dict[str, np.ndarray]:
        return {name: np.asarray(values, np.float32) for name, values in rollouts.reward(
            context, [prompt_messages(e) for e in answers.examples], answers.texts,
            [prompt_metadata(e) for e in answers.examples]).items()}

    def evaluate(context):
        scores: dict[str, list] = {}
        sampled = []
        loader = eval_data()
        params = rollouts.policy_params(context)
        for number, local in enumerate(itertools.islice(loader, config.train.eval_batches or None)):
            answers = respond(rollouts.sampler, params, rollouts.tokenizer, loader, local, context,
                              jax.random.PRNGKey(0), greedy=True)
            for name, values in scored(context, answers).items():
                scores.setdefault(name, []).append(values)
            if config.grpo.eval_samples:
                samples = respond(rollouts.sampler, params, rollouts.tokenizer, loader, local, context,
                                  jax.random.fold_in(jax.random.PRNGKey(1), number), repeat=config.grpo.eval_samples)
                sampled.append(scored(context, samples)[correctness])
        out = {f"reward/{name}": float(np.mean(np.concatenate(v))) for name, v in scores.items()}
        out["accuracy"] = float(np.mean(np.concatenate(scores[correctness]) > 0))
        if sampled:
            out["sampled_accuracy"] = float(np.mean(np.concatenate(sampled) > 0))
        return out

    return evaluate
