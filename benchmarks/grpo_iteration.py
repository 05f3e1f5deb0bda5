"""GRPO iteration: `jaxalign grpo`'s real loop against TRL's GRPOTrainer on the same weights, prompts and settings.

    python benchmarks/grpo_iteration.py               # CPU: ~58M-parameter LLaMA, 4 prompts x 8 samples, 64 new tokens
    python benchmarks/grpo_iteration.py --iterations 5 --json grpo.json

One GRPO iteration on both sides: G samples for each of P prompts (one generate call of P x G rows, temperature
1.0, no top-k / top-p, exactly `--max-new-tokens` new tokens per sample), a Python reward per sample, group-relative
advantages ((r - mean) / (std + 1e-4), std with Bessel's correction), then one policy update over the whole batch
(1 epoch, 1 minibatch of P x G samples, no gradient accumulation): the clipped surrogate (epsilon 0.2 both ways),
each sequence's token mean then the mean over sequences (jaxalign `grpo.aggregation=sequence_mean`, TRL
`loss_type="grpo"`), no KL term and no reference model (beta 0), AdamW (lr 1e-6 constant, 0.9 / 0.999, eps 1e-8,
no weight decay) with global-norm clipping at 1.0, float32, no activation checkpointing.

- jaxalign: `jaxalign.commands.grpo.train_grpo` itself on a config built here (`train.log_every` = one iteration).
- TRL: `trl.GRPOTrainer.train()` itself (transformers `generate` with the KV cache, `use_vllm=False`), with
  `per_device_train_batch_size` = P x G, `num_generations` = G, `gradient_accumulation_steps` 1,
  `num_iterations` 1, `beta` 0.

Same model, same tokens: a random untied LLaMA is built with transformers and saved with a word-level tokenizer
(word `w{i}` is token i, a chat template that renders the prompt text alone); jaxalign loads that folder
(`model.path`), TRL trains the same in-memory model, so both start from identical weights. The prompts are P
strings of `--prompt-len` random words; the script checks that the prompt token ids both sides generate from are
equal. Equal lengths: both sides mask the end-of-sequence token out of every sampling step (TRL:
`generation_kwargs={"min_new_tokens": max_completion_length}`; jaxalign: its sampler's `decode` called with
`min_new_tokens=max_new_tokens`, the same masking), so every sample has exactly `--max-new-tokens` tokens. The
reward is the number of words of the decoded completion whose number is even (varies within a group, so the
advantages and the update are not zero).

Timing. The two runs go in one process, in two threads that take turns (one runs while the other waits), so a
change of load on a shared machine hits both alike: jaxalign iteration 0 (compilation), TRL step 0, jaxalign
iteration 1, TRL step 1, ... A TRL iteration is timed from the Trainer's `on_step_begin` to its `on_step_end`
callback (generation, scoring, advantages, forward + backward, clipping, optimizer step; the data loader's batch
of prompt rows is fetched before). A jaxalign iteration runs from the metrics line that closes the previous
iteration to the one that closes it (the line waits for the iteration's train step), i.e. the loop's wall time
between iteration boundaries. Parts, both sides: generation, scoring (the reward function), the rest of the
rollout phase (tokenising / detokenising, advantages; jaxalign also its experience pass = the old log-probs,
timed with a host sync on its output), and the update. Iteration 0 / step 0 of each side is left out;
iterations/s uses the median iteration.

Known differences of work, by design of each library: with `num_iterations=1` and no gradient accumulation TRL
skips the old log-prob forward pass (the ratio is 1 at the only update, so it uses the detached current log-probs),
while jaxalign always runs it (one forward pass of P x G rows); TRL's fused LM head projects only the completion
positions, jaxalign all positions.
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import statistics
import tempfile
import threading
import time

import numpy as np

PAD, BOS, EOS = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Setup:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    prompts: int  # P, prompts per iteration
    group_size: int  # G, samples per prompt
    prompt_len: int
    max_new_tokens: int
    temperature: float = 1.0
    lr: float = 1e-6
    clip: float = 0.2
    eps: float = 1e-4  # TRL's constant in (r - mean) / (std + eps)
    dtype: str = "float32"

    @property
    def samples(self) -> int:
        return self.prompts * self.group_size

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.max_new_tokens

    def total_params(self) -> int:
        per_layer = 4 * self.hidden_size * self.hidden_size + 3 * self.hidden_size * self.intermediate_size
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.num_layers * per_layer + 2 * self.vocab_size * self.hidden_size + norms


# The LLaMA of the SFT / DPO benchmarks (58.5M parameters): hidden 512, 8 layers, 8 heads, vocab 32,000, untied.
CPU = Setup(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, prompts=4,
            group_size=8, prompt_len=32, max_new_tokens=64)


def even_words(text: str) -> float:
    """The reward of one completion: how many of its words `w{i}` have an even i."""
    return float(sum(1 for word in text.split() if word[1:].isdigit() and int(word[1:]) % 2 == 0))


def jaxalign_reward(prompts, responses, metadata):
    """`even_words` as a jaxalign reward function."""
    return [even_words(response) for response in responses]


def trl_reward(prompts, completions, **kwargs):
    """`even_words` as a TRL reward function."""
    return [even_words(completion) for completion in completions]


def random_prompts(setup: Setup, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(3, setup.vocab_size, setup.prompt_len))
            for _ in range(setup.prompts)]


def write_model(setup: Setup, folder: str):
    """A random LLaMA (transformers, seed 0) and its word-level tokenizer saved to `folder`; returns both."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, setup.vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", unk_token="<pad>")
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=setup.vocab_size, hidden_size=setup.hidden_size, intermediate_size=setup.intermediate_size,
        num_hidden_layers=setup.num_layers, num_attention_heads=setup.num_heads,
        num_key_value_heads=setup.num_heads, max_position_embeddings=setup.seq_len, tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def jaxalign_config(setup: Setup, iterations: int, model_dir: str, prompts_file: str, output_dir: str):
    from jaxalign.commands.grpo import GRPOConfig
    from jaxalign.config import from_dict

    return from_dict(GRPOConfig, {
        "output_dir": output_dir,
        "seed": 0,
        "model": {"path": model_dir, "dtype": setup.dtype},
        "rewards": [{"function": f"{__name__}:jaxalign_reward", "weight": 1.0}],
        "data": {"train": prompts_file, "template": "tokenizer"},
        "generation": {"max_new_tokens": setup.max_new_tokens, "temperature": setup.temperature},
        "grpo": {"prompts_per_iteration": setup.prompts, "group_size": setup.group_size, "epochs": 1,
                 "advantage": "grpo", "eps": setup.eps, "ddof": 1, "aggregation": "sequence_mean",
                 "clip_low": setup.clip, "clip_high": setup.clip, "kl_beta": 0.0, "dynamic_sampling": False},
        "train": {"steps": iterations + 1, "batch_size": setup.samples, "seq_len": setup.seq_len, "log_every": 1,
                  "eval_every": 0, "eval_at_start": False},
        "optimizer": {"name": "adamw", "lr": setup.lr, "schedule": "constant", "warmup_steps": 0, "b1": 0.9,
                      "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "clip": 1.0},
        "checkpoint": {"every": 0, "keep": 1},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    })


def trl_trainer(setup: Setup, model, tokenizer, prompts: list[str], steps: int, folder: str):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=folder, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0,
        per_device_train_batch_size=setup.samples, gradient_accumulation_steps=1, num_generations=setup.group_size,
        num_iterations=1, max_steps=steps, max_completion_length=setup.max_new_tokens,
        temperature=setup.temperature, top_p=1.0, top_k=0, use_vllm=False,
        generation_kwargs={"min_new_tokens": setup.max_new_tokens},
        beta=0.0, epsilon=setup.clip, epsilon_high=setup.clip, loss_type="grpo", scale_rewards="group",
        mask_truncated_completions=False, learning_rate=setup.lr, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        logging_strategy="no", save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False,
        log_completions=False,
    )
    return GRPOTrainer(model=model, reward_funcs=trl_reward, args=args,
                       train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)


class Baton:
    """Two threads taking turns: `wait(name)` blocks until `give(name)`; an error on either side ends both."""

    def __init__(self, first: str):
        self.turn, self.error = first, None
        self.condition = threading.Condition()

    def give(self, name: str) -> None:
        with self.condition:
            self.turn = name
            self.condition.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.condition:
            self.error = error
            self.condition.notify_all()

    def wait(self, name: str) -> None:
        with self.condition:
            while self.turn != name and self.error is None:
                self.condition.wait(timeout=1.0)
            if self.error is not None:
                raise RuntimeError("the other side failed") from self.error


class _Timed:
    """Calls `fn` and appends its seconds to `into`."""

    def __init__(self, fn, into: list, sync=None):
        self.fn, self.into, self.sync = fn, into, sync

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if self.sync is not None:
            out = self.sync(out)
        self.into.append(time.perf_counter() - start)
        return out


class JaxalignProbe:
    """Hooks into `train_grpo`: iteration boundaries, the rollout phase, the experience pass, the prompt ids; hands
    the baton to TRL after each metrics line and waits for it back before going on."""

    def __init__(self, setup: Setup, baton: Baton):
        self.setup, self.baton = setup, baton
        self.resumed, self.rollout_begin, self.rollout_end, self.line_written = [], [], [], []
        self.experience_s = []
        self.prompt_ids = None

    @contextlib.contextmanager
    def installed(self):
        import jax

        from jaxalign import rollouts, sampling
        from jaxalign.objectives.grpo_algorithm import GRPOSource
        from jaxalign.train import loop

        probe = self
        original_start, original_write, original_decode = GRPOSource.start_iteration, loop._MetricsLogger.write, \
            rollouts.decode

        def start_iteration(source, context):
            if source._jitted is None:
                source._jitted = _Timed(jax.jit(source.experience_fn), probe.experience_s, jax.block_until_ready)
            if not probe.rollout_begin:
                probe.record_prompts(source)
            probe.rollout_begin.append(time.perf_counter())
            metrics = original_start(source, context)
            probe.rollout_end.append(time.perf_counter())
            return metrics

        def write(logger, line):
            original_write(logger, line)
            probe.line_written.append(time.perf_counter())
            probe.baton.give("trl")
            probe.baton.wait("jaxalign")
            probe.resumed.append(time.perf_counter())

        GRPOSource.start_iteration, loop._MetricsLogger.write = start_iteration, write
        # the end-of-sequence token masked out of every sampling step, as transformers' min_new_tokens does
        rollouts.decode = functools.partial(sampling.decode, min_new_tokens=self.setup.max_new_tokens)
        try:
            yield self
        finally:
            GRPOSource.start_iteration, loop._MetricsLogger.write, rollouts.decode = original_start, \
                original_write, original_decode

    def record_prompts(self, source):
        """Keeps the prompt ids of the first iteration (`source.prompts` is looked up on the instance)."""
        prompts_fn = source.prompts

        def prompts(context):
            examples, arrays = prompts_fn(context)
            if self.prompt_ids is None:
                self.prompt_ids = sorted(tuple(row) for row in np.asarray(arrays["input_ids"]).tolist())
            return examples, arrays

        source.prompts = prompts


class TRLProbe:
    """Callbacks and method wrappers on the GRPOTrainer: step boundaries, generation, scoring, the rollout phase,
    the prompt ids; waits for the baton before each step and hands it back after."""

    def __init__(self, baton: Baton):
        self.baton = baton
        self.step_s, self.rollout_s, self.generation_s, self.scoring_s = [], [], [], []
        self.prompt_ids = None
        self.completion_lengths, self.reward_mean = [], []

    def install(self, trainer):
        import transformers

        probe = self
        generate = trainer._generate_single_turn

        def generate_single_turn(prompt_ids, *args, **kwargs):
            if probe.prompt_ids is None:
                probe.prompt_ids = sorted(tuple(ids) for ids in prompt_ids)
            start = time.perf_counter()
            completion_ids, logprobs = generate(prompt_ids, *args, **kwargs)
            probe.generation_s.append(time.perf_counter() - start)
            probe.completion_lengths.extend(len(ids) for ids in completion_ids)
            return completion_ids, logprobs

        trainer._generate_single_turn = generate_single_turn
        calculate_rewards = trainer._calculate_rewards

        def scored(*args, **kwargs):
            start = time.perf_counter()
            rewards = calculate_rewards(*args, **kwargs)
            probe.scoring_s.append(time.perf_counter() - start)
            probe.reward_mean.append(float(rewards.nanmean()))
            return rewards

        trainer._calculate_rewards = scored
        trainer._generate_and_score_completions = _Timed(trainer._generate_and_score_completions, self.rollout_s)

        class Turns(transformers.TrainerCallback):
            def __init__(self):
                self.start = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                probe.baton.wait("trl")
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                probe.step_s.append(time.perf_counter() - self.start)
                probe.baton.give("jaxalign")

        trainer.add_callback(Turns())


def run(setup: Setup, iterations: int) -> dict:
    import torch
    import transformers
    import trl

    from jaxalign.commands.grpo import train_grpo

    prompts = random_prompts(setup)
    baton = Baton("jaxalign")
    jx, th = JaxalignProbe(setup, baton), TRLProbe(baton)
    with tempfile.TemporaryDirectory() as folder:
        model_dir, prompts_file, out = (os.path.join(folder, name) for name in ("model", "prompts.jsonl", "run"))
        model, tokenizer = write_model(setup, model_dir)
        with open(prompts_file, "w") as handle:
            for prompt in prompts:
                handle.write(json.dumps({"prompt": prompt}) + "\n")
        trainer = trl_trainer(setup, model, tokenizer, prompts, iterations + 1, os.path.join(folder, "trl"))
        th.install(trainer)

        def train_trl():
            try:
                trainer.train()
            except BaseException as error:  # noqa: BLE001 - ends the other side too
                baton.fail(error)
                raise

        thread = threading.Thread(target=train_trl, name="trl", daemon=True)
        thread.start()
        started = time.perf_counter()
        try:
            with jx.installed():
                train_grpo(jaxalign_config(setup, iterations, model_dir, prompts_file, out))
        except BaseException as error:
            baton.fail(error)
            raise
        thread.join()
        run_s = time.perf_counter() - started
        lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    lines = [line for line in lines if "generation_s" in line]
    if len(lines) != iterations + 1 or len(th.step_s) != iterations + 1:
        raise RuntimeError(f"expected {iterations + 1} iterations per side, got {len(lines)} / {len(th.step_s)}")
    if jx.prompt_ids != th.prompt_ids:
        raise RuntimeError("the two sides generate from different prompt token ids")

    jax_rows, trl_rows = [], []
    for k in range(iterations + 1):
        begin = jx.resumed[k - 1] if k else jx.rollout_begin[0]
        rollout = jx.rollout_end[k] - jx.rollout_begin[k]
        row = {"iteration_s": jx.line_written[k] - begin, "generation_s": lines[k]["generation_s"],
               "scoring_s": lines[k]["scoring_s"], "experience_s": jx.experience_s[k],
               "update_s": jx.line_written[k] - jx.rollout_end[k],
               "response_length": lines[k]["response_length"], "reward_mean": lines[k]["reward_mean"],
               "loss": lines[k].get("loss")}
        row["rollout_other_s"] = rollout - row["generation_s"] - row["scoring_s"] - row["experience_s"]
        row["other_s"] = row["iteration_s"] - rollout - row["update_s"]
        jax_rows.append(row)
        row = {"iteration_s": th.step_s[k], "generation_s": th.generation_s[k], "scoring_s": th.scoring_s[k],
               "update_s": th.step_s[k] - th.rollout_s[k]}
        row["rollout_other_s"] = th.rollout_s[k] - row["generation_s"] - row["scoring_s"]
        trl_rows.append(row)
    return {
        "jaxalign": jax_rows, "trl": trl_rows, "run_s": run_s,
        "trl_completion_lengths": sorted(set(th.completion_lengths)),
        "trl_reward_mean": [round(v, 3) for v in th.reward_mean],
        "prompt_ids_equal": True,
        "threads": torch.get_num_threads(), "optimizer": str(trainer.args.optim),
        "versions": f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}",
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per library (after one untimed)")
    parser.add_argument("--prompts", type=int, default=None, help="P, prompts per iteration")
    parser.add_argument("--group-size", type=int, default=None, help="G, samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    changes = {k: v for k, v in (("prompts", args.prompts), ("group_size", args.group_size),
                                 ("prompt_len", args.prompt_len), ("max_new_tokens", args.max_new_tokens))
               if v is not None}
    setup = dataclasses.replace(CPU, **changes)

    import jax

    results = {
        "setup": dataclasses.asdict(setup),
        "parameters": setup.total_params(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"jax devices: {jax.devices()[0].device_kind} x {jax.device_count()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before": os.getloadavg(),
    }
    print(f"model: {setup.total_params() / 1e6:.1f}M-parameter LLaMA (hidden {setup.hidden_size}, {setup.num_layers} "
          f"layers, vocab {setup.vocab_size}, untied), {setup.dtype}; {setup.prompts} prompts x {setup.group_size} "
          f"samples of {setup.prompt_len} prompt + {setup.max_new_tokens} new tokens; {results['machine']}",
          flush=True)
    print(f"{results['date']}; load average at start: {results['load_average_before']}", flush=True)
    measured = run(setup, args.iterations)
    results.update(measured)
    results["load_average_after"] = os.getloadavg()

    keys = ("iteration_s", "generation_s", "scoring_s", "rollout_other_s", "update_s")
    for name in ("jaxalign", "trl"):
        rows = measured[name][1:]
        side = results[f"{name}_summary"] = {k: statistics.median(row[k] for row in rows) for k in keys}
        side["first_iteration_s"] = measured[name][0]["iteration_s"]
        side["iterations_per_s"] = 1.0 / side["iteration_s"]
        side["samples_per_s"] = setup.samples / side["iteration_s"]
    jx, th = results["jaxalign_summary"], results["trl_summary"]
    jx["experience_s"] = statistics.median(row["experience_s"] for row in measured["jaxalign"][1:])
    results["speedup_vs_trl"] = jx["iterations_per_s"] / th["iterations_per_s"]
    results["speedup_fastest"] = min(r["iteration_s"] for r in measured["trl"][1:]) / \
        min(r["iteration_s"] for r in measured["jaxalign"][1:])

    labels = {"jaxalign": "jaxalign", "trl": "TRL"}
    for name in ("jaxalign", "trl"):
        side = results[f"{name}_summary"]
        print(f"{labels[name]:<9} {side['iterations_per_s']:.3f} iterations/s, {side['samples_per_s']:.2f} samples/s "
              f"(median {side['iteration_s']:.2f} s/iteration of "
              f"{[round(r['iteration_s'], 2) for r in measured[name][1:]]}, first {side['first_iteration_s']:.1f} s); "
              f"median parts: generation {side['generation_s']:.2f} s, scoring {side['scoring_s']:.3f} s, "
              + (f"experience pass (old log-probs) {side['experience_s']:.2f} s, " if "experience_s" in side else "")
              + f"rest of rollout {side['rollout_other_s']:.2f} s, update {side['update_s']:.2f} s")
    print(f"jaxalign experience passes: {[round(r['experience_s'], 2) for r in measured['jaxalign'][1:]]} s; "
          f"response lengths "
          f"{[r['response_length'] for r in measured['jaxalign']]} (TRL: {measured['trl_completion_lengths']}); "
          f"reward means jaxalign {[round(r['reward_mean'], 3) for r in measured['jaxalign']]}, "
          f"TRL {measured['trl_reward_mean']}; prompt ids equal: {measured['prompt_ids_equal']}")
    print(f"TRL: {measured['threads']} threads, {measured['optimizer']}; {measured['versions']}")
    print(f"jaxalign / TRL: {results['speedup_vs_trl']:.2f}x (median iterations); fastest iteration of each: "
          f"{results['speedup_fastest']:.2f}x; whole run {measured['run_s']:.0f} s")
    print(f"load average at start / end: {results['load_average_before']} / {results['load_average_after']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
