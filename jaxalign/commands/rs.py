"""`jaxalign rs CONFIG.yaml [key.sub=value ...]`: rounds of rejection-sampling fine-tuning (LLaMA-2-Chat,
Touvron et al. 2023, §3.2.3).

Each round:
1. samples `rs.samples_per_prompt` (K) responses to every training prompt (`data.train`: prompt records or the
   prompts of preference pairs) from the newest policy at `generation.temperature` (LLaMA-2: 1.2-1.3 for K of
   10-100), all K of a prompt in one batch of the jitted sampler on the mesh, `rs.prompts_per_batch` prompts at a
   time;
2. scores them with `reward` (a reward model, LLaMA-2's helpfulness + safety pair ranked by the chosen model's raw
   score `logit(R_c)`, not whitened, so scores of different rounds compare; or a function) and keeps the best
   non-blank response per prompt;
3. pools it with the best of all earlier rounds (per prompt the best ever seen; `jaxalign.rejection_sampling`) and
   writes the pool to `OUTPUT_DIR/round_<r>/pool.jsonl` (`{prompt, completion, score, round}` lines; every sample
   with its score in `samples.jsonl`);
4. fine-tunes the newest policy on the pool with the SFT loss through the one training loop (`train.*`,
   `optimizer.*` and `model.lora` apply to every round; `train.steps` counts the steps of one round), in
   `OUTPUT_DIR/round_<r>/` (its `metrics.jsonl`, `checkpoints/`, and `hf/`: the next round's policy).

With eval prompts (`data.eval` or `data.eval_fraction`) the starting policy and each round's policy answer them
greedily and `eval_reward_mean` is their mean score by the same reward. `OUTPUT_DIR/rounds.jsonl` holds one line per
round: `sample_score_mean`, `sample_score_max`, `best_score_mean`, `best_minus_median` (what choosing the best of K
gains), `pool_size`, `pool_score_mean`, `new_in_pool` (prompts whose pool entry this round replaced or added),
`eval_reward_mean`; round 0 is the starting policy. The last round's policy is copied to `OUTPUT_DIR/hf/`.

A run stopped anywhere resumes when run again: finished rounds are skipped, a round whose pool is written goes on
with its (resumable) fine-tuning, and a round stopped while sampling samples again from the same seed.
"""

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from jaxalign import storage
from jaxalign.config import ModelSection, RewardSection, RunConfig
from jaxalign.data.config import DataConfig
from jaxalign.errors import JaxalignError
from jaxalign.models.loading import PRETRAINED_OVERRIDES
from jaxalign.rollouts import GenerationConfig
from jaxalign.train.command import (add_run_arguments, export_model, on_primary, run_tokenizer,
                                    run_training_command, say, write_jsonl)


@dataclass(frozen=True)
class RSSettings:
    """`rounds` of sampling and fine-tuning; `samples_per_prompt` (K) responses per prompt and round;
    `prompts_per_batch` prompts sampled together (K x this rows per generate call)."""

    rounds: int = 4
    samples_per_prompt: int = 8
    prompts_per_batch: int = 8


@dataclass(frozen=True)
class RSConfig(RunConfig):
    """The loop's sections (the fine-tuning of each round) plus `model` (the starting policy), `reward`, `data`
    (prompts, and the template the policy was trained with), `generation` and `rs`."""

    model: ModelSection = field(default_factory=ModelSection)
    reward: RewardSection = field(default_factory=RewardSection)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rs: RSSettings = field(default_factory=RSSettings)

    def __post_init__(self):
        self.reward.check()
        for key in ("rounds", "prompts_per_batch"):
            if getattr(self.rs, key) < 1:
                raise JaxalignError(f"config key 'rs.{key}': expected >= 1, got {getattr(self.rs, key)}")
        if self.rs.samples_per_prompt < 2:
            raise JaxalignError(f"config key 'rs.samples_per_prompt': choosing the best needs at least 2 samples per "
                                f"prompt, got {self.rs.samples_per_prompt}")
        self.generation.check_room(self.train.seq_len)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "configs/tiny/rs.yaml")


def run(args: argparse.Namespace) -> int:
    return run_training_command(args, RSConfig, train_rs)


def train_rs(config: RSConfig, allow_config_change: bool = False) -> int:
    """Runs the rounds not yet finished in OUTPUT_DIR and exports the last round's policy to OUTPUT_DIR/hf; 0 when
    done. Raises `JaxalignError` for bad input and `TrainingStopped` after a stop signal."""
    from jaxalign.rejection_sampling import read_pool, write_pool
    from jaxalign.rewards import build_reward
    from jaxalign.rollouts import one_pass, prompt_loaders
    from jaxalign.train import run_dir

    run_dir.check_config(config, allow_config_change)
    run_dir.save_config(config)
    out = storage.location(config.output_dir)
    log = RoundLog(out / "rounds.jsonl")
    if (out / "hf").is_dir() and config.rs.rounds in log.rounds:
        say("rs", f"{out} already finished its {config.rs.rounds} rounds; the policy is in {out / 'hf'}")
        return 0
    tokenizer, added = run_tokenizer(config)
    reward, reward_models = build_reward(config.reward, config.data, config.mesh, config.model.dtype,
                                         config.model.param_dtype, whitened=False)
    train_loader, eval_data = prompt_loaders(config, tokenizer, config.rs.prompts_per_batch, "rejection sampling")
    rows = config.rs.prompts_per_batch * config.rs.samples_per_prompt
    rounds = Rounds(config, tokenizer, added, reward, reward_models, one_pass(train_loader),
                    one_pass(eval_data(), rows) if eval_data is not None else None)
    policy = config.model
    if 0 not in log.rounds:
        log.write({"round": 0, **rounds.evaluate(policy)})
    for number in range(1, config.rs.rounds + 1):
        folder = out / f"round_{number}"
        if not (folder / "pool.jsonl").is_file():
            previous = read_pool(out / f"round_{number - 1}" / "pool.jsonl") if number > 1 else {}
            statistics, samples, pool = rounds.sample(policy, number, previous)
            on_primary(lambda: (_write_json(folder / "sampling.json", statistics),
                                 write_jsonl(folder / "samples.jsonl", samples),
                                 write_pool(folder / "pool.jsonl", pool)), f"rs_round_{number}_pool")
        rounds.finetune(policy, number, folder)
        policy = dataclasses.replace(config.model, path=str(folder / "hf"), config={
            key: value for key, value in config.model.config.items() if key in PRETRAINED_OVERRIDES})
        if number not in log.rounds:
            statistics = json.loads((folder / "sampling.json").read_text())
            log.write({"round": number, **statistics, **rounds.evaluate(policy)})
    last = out / f"round_{config.rs.rounds}" / "hf"
    final = export_model(config, lambda folder: on_primary(lambda: storage.copy_folder(last, folder), "rs_export"))
    say("rs", f"finished {config.rs.rounds} rounds. Outputs in {out}/:\n"
              f"  rounds.jsonl                  sampling scores, pool and eval reward per round\n"
              f"  round_<r>/                    each round's samples, pool and fine-tuning (metrics, checkpoints, hf)\n"
              f"  hf/                           the last round's policy with its tokenizer ({final})")
    return 0


class Rounds:
    """What each round does with the run's tokenizer, reward and prompts: `sample`, `finetune`, `evaluate`."""

    def __init__(self, config: RSConfig, tokenizer, added, reward, reward_models, prompts, eval_prompts):
        self.config, self.tokenizer, self.added = config, tokenizer, added
        self.reward, self.reward_models = reward, reward_models
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self._samplers = {}

    def _policy(self, section: ModelSection):
        """(the policy's `Frozen` model, its sampler; one sampler, and so one compile, per model shape)."""
        from jaxalign.models.loading import model_source, seeded
        from jaxalign.rollouts import Sampler, stop_token_ids
        from jaxalign.train.algorithm import Frozen

        source = seeded(model_source(section, self.tokenizer, mesh=self.config.mesh, new_tokens=self.added),
                        self.config.seed)
        module = source.module()
        key = repr(module.config)
        if key not in self._samplers:
            self._samplers[key] = Sampler(module, self.config.generation, stop_token_ids(self.config, self.tokenizer),
                                          self.tokenizer.pad_token_id)
        return Frozen(module, source.load), self._samplers[key]

    def sample(self, section: ModelSection, number: int, previous: dict):
        """(the round's sampling statistics, every sample `{prompt, completion, score, round, sample}`, the pool
        `previous` merged with its best samples) for round `number` from the policy `section`."""
        import jax
        import numpy as np

        from jaxalign import rejection_sampling as rs
        from jaxalign.rollouts import check_rows, prompt_messages, prompt_metadata, respond
        from jaxalign.train.loop import inference

        k = self.config.rs.samples_per_prompt
        policy, sampler = self._policy(section)
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), number)
        all_scores, best, samples = [], [], []
        with inference(self.config, {"policy": policy, **self.reward_models}) as context:
            check_rows(context, k * self.config.rs.prompts_per_batch, "rs.prompts_per_batch")
            for index, local in enumerate(self.prompts):
                answers = respond(sampler, context.frozen["policy"], self.tokenizer, self.prompts, local, context,
                                  jax.random.fold_in(key, index), repeat=k)
                prompts = [prompt_messages(e) for e in answers.examples]
                scores = np.asarray(self.reward(context, prompts, answers.texts,
                                                [prompt_metadata(e) for e in answers.examples]), np.float64)
                scores, texts = scores.reshape(-1, k), np.asarray(answers.texts, object).reshape(-1, k)
                all_scores.append(scores)
                samples.extend({"prompt": prompts[row * k], "completion": texts[row, j], "score": float(scores[row, j]),
                                "round": number, "sample": j} for row in range(len(scores)) for j in range(k))
                blank = np.vectorize(lambda text: not text.strip(), otypes=[bool])(texts)
                chosen = rs.best_samples(np.where(blank, -np.inf, scores))
                for row, column in enumerate(chosen):
                    if not blank[row, column]:
                        best.append(rs.PoolEntry(prompts[row * k], texts[row, column], float(scores[row, column]),
                                                 number))
        pool = rs.merge(previous, best)
        statistics = rs.round_statistics(np.concatenate(all_scores))
        statistics.update(
            prompts=sum(len(s) for s in all_scores),
            blank_best=sum(len(s) for s in all_scores) - len(best),
            pool_size=len(pool),
            pool_score_mean=float(np.mean([e.score for e in pool.values()])) if pool else float("nan"),
            new_in_pool=sum(1 for e in pool.values() if e.round == number),
        )
        say("rs", f"round {number}: {statistics['prompts']} prompts x {k} samples, mean score "
                  f"{statistics['sample_score_mean']:.4f}, best {statistics['best_score_mean']:.4f} (best - median "
                  f"{statistics['best_minus_median']:.4f}); pool of {len(pool)}, {statistics['new_in_pool']} new")
        return statistics, samples, pool

    def finetune(self, section: ModelSection, number: int, folder: Path) -> None:
        """Round `number`'s fine-tuning of the policy `section` on the pool in `folder` (resumed when stopped,
        skipped when finished)."""
        from jaxalign.commands.sft import SFTConfig, train_sft

        c = self.config
        data = dataclasses.replace(c.data, train=str(folder / "pool.jsonl"), eval=None, eval_fraction=0.0,
                                   format="completion")
        train_sft(SFTConfig(output_dir=str(folder), seed=c.seed + number, train=c.train, optimizer=c.optimizer,
                            checkpoint=c.checkpoint, mesh=c.mesh, model=section, data=data))

    def evaluate(self, section: ModelSection) -> dict:
        """`{eval_reward_mean}` of the policy's greedy answers to the eval prompts ({} without eval prompts)."""
        import jax
        import numpy as np

        from jaxalign.rollouts import check_rows, prompt_messages, prompt_metadata, respond
        from jaxalign.train.loop import inference

        if self.eval_prompts is None:
            return {}
        policy, sampler = self._policy(section)
        scores = []
        with inference(self.config, {"policy": policy, **self.reward_models}) as context:
            check_rows(context, self.eval_prompts.batch_size, "rs.prompts_per_batch")
            for local in self.eval_prompts:
                answers = respond(sampler, context.frozen["policy"], self.tokenizer, self.eval_prompts, local,
                                  context, jax.random.PRNGKey(0), greedy=True)
                scores.append(np.asarray(self.reward(context, [prompt_messages(e) for e in answers.examples],
                                                     answers.texts, [prompt_metadata(e) for e in answers.examples]),
                                         np.float64))
        return {"eval_reward_mean": float(np.mean(np.concatenate(scores)))}


class RoundLog:
    """OUTPUT_DIR/rounds.jsonl: one JSON line per finished round (`round` 0: the starting policy)."""

    def __init__(self, path: os.PathLike):
        self.path = path
        self.rounds = set()
        if path.is_file():
            self.rounds = {json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()}

    def write(self, line: dict) -> None:
        import jax

        if jax.process_index() == 0:
            storage.append_lines(self.path, [json.dumps(line)])
        self.rounds.add(line["round"])


def _write_json(path: os.PathLike, value: dict) -> None:
    storage.write_text(path, json.dumps(value))
