"""PPO iteration: one iteration of `jaxalign ppo` against the sum of its parts run alone.

    python benchmarks/ppo_iteration.py                  # CPU: ~26M-parameter LLaMA (byte vocabulary), 32 rollouts
    python benchmarks/ppo_iteration.py --iterations 5 --json ppo.json

The iteration is the real one: `jaxalign.commands.ppo.train_ppo` on a config built here (random LLaMA policy, its
trunk under a fresh value head as the critic, the frozen reference, prompts of `demo:prompts` with the byte
tokenizer cut to `--prompt-len` tokens, a Python reward = response length in characters, so scoring costs nothing),
run for one untimed iteration (compilation) plus `--iterations` timed ones. An iteration is, as the training loop
runs it: generation with the jitted sampler on the training mesh, scoring, the jitted experience pass (old and
reference log-probs, values, KL penalty, GAE), then `epochs x rollout_size / batch_size` minibatch train steps.

Its wall time runs from one iteration boundary to the next: the metrics line closing each iteration (`train.log_every`
is one iteration, so that line waits for the iteration's last train step). Its parts: `generation_s` and
`scoring_s` from metrics.jsonl (the loop's own timers), the experience pass timed around the source's jitted
experience function (it already ends in a host sync, so timing it adds none), training from the end of the
rollout phase to the closing metrics line (the span of metrics.jsonl's `training_s`, which is logged with the next
iteration and so missing for the last), and `other` = the rest (loading prompts, detokenising responses, host
transfers, the loop's bookkeeping).

The lower bound is the sum of the same work run alone, on the same shapes, in the same process:
(a) `jaxalign.sampling.decode` jitted alone on the same policy module and params, the same prompts and PRNG key,
    the same `max_new_tokens`, sampling and stop tokens;
(b) the same number of `jaxalign.train.step.train_step` calls with the PPO loss
    (`jaxalign.objectives.ppo_algorithm.make_loss_fn`, i.e. the loop's loss) on one fixed minibatch of the
    iteration's experience, from the same params, compiled as the loop compiles its step (state donated);
(c) the experience pass (the source's `experience_fn`) jitted alone on the same rollout batch.
The inputs are taken from the first (untimed) iteration. One measurement of each runs between two timed iterations
(its time is kept out of both neighbours), so a change of load on a shared machine hits both sides alike; every
figure is the median over the timed iterations. Printed: each part in the loop and alone, the iteration, the lower
bound and their ratio; also each iteration against the standalone runs just before it.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from unittest import mock


@dataclasses.dataclass(frozen=True)
class Setup:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    rollout_size: int
    minibatch: int
    epochs: int
    prompt_len: int
    max_new_tokens: int
    temperature: float = 1.0
    dtype: str = "float32"
    vocab_size: int = 264  # the byte tokenizer's

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.max_new_tokens

    @property
    def steps_per_iteration(self) -> int:
        return self.epochs * self.rollout_size // self.minibatch

    def total_params(self) -> int:
        """Parameters of the policy (the critic has the same trunk with a one-output head)."""
        per_layer = 4 * self.hidden_size * self.hidden_size + 3 * self.hidden_size * self.intermediate_size
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.num_layers * per_layer + 2 * self.vocab_size * self.hidden_size + norms


# The LLaMA of the SFT / DPO benchmarks (hidden 512, 8 layers, 8 heads, intermediate 1408) over the byte vocabulary.
CPU = Setup(hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, rollout_size=32, minibatch=16,
            epochs=1, prompt_len=64, max_new_tokens=64)


def response_length(prompts, responses, metadata):
    """The reward: each response's length in characters (costs nothing next to the models)."""
    return [float(len(response)) for response in responses]


def ppo_config(setup: Setup, iterations: int, output_dir: str):
    from jaxalign.commands.ppo import PPOConfig
    from jaxalign.config import from_dict

    optimizer = {"name": "adamw", "lr": 1e-5, "schedule": "constant", "warmup_steps": 0, "b1": 0.9, "b2": 0.95,
                 "weight_decay": 0.0, "clip": 1.0}
    per_iteration = setup.steps_per_iteration
    return from_dict(PPOConfig, {
        "output_dir": output_dir,
        "seed": 0,
        "model": {"path": None, "dtype": setup.dtype, "config": {
            "hidden_size": setup.hidden_size, "intermediate_size": setup.intermediate_size,
            "num_layers": setup.num_layers, "num_heads": setup.num_heads, "num_kv_heads": setup.num_heads,
            "max_position_embeddings": setup.seq_len, "tie_word_embeddings": False}},
        "reward": {"function": f"{__name__}:response_length"},
        "data": {"train": "demo:prompts", "tokenizer": "byte"},
        "generation": {"max_new_tokens": setup.max_new_tokens, "temperature": setup.temperature},
        "ppo": {"rollout_size": setup.rollout_size, "epochs": setup.epochs, "kl_beta": 0.05},
        "train": {"steps": per_iteration * (iterations + 1), "batch_size": setup.minibatch,
                  "seq_len": setup.seq_len, "log_every": per_iteration, "eval_every": 0, "eval_at_start": False},
        "optimizer": optimizer,
        "value_optimizer": optimizer,
        "checkpoint": {"every": 0, "keep": 1},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    })


def _copy(tree):
    import jax
    import jax.numpy as jnp

    return jax.block_until_ready(jax.tree.map(jnp.copy, tree))


class _Recording:
    """A sampler that keeps the prompts and PRNG key of its call in `inputs`."""

    def __init__(self, sampler, inputs: dict):
        self._sampler, self._inputs = sampler, inputs

    def __getattr__(self, name):
        return getattr(self._sampler, name)

    def __call__(self, params, prompts, rng, *args, **kwargs):
        self._inputs["prompts"], self._inputs["rng"] = prompts, rng
        return self._sampler(params, prompts, rng, *args, **kwargs)


class Probe:
    """Hooks into one `train_ppo` run: boundary times of every iteration, the in-loop experience pass, the inputs
    of the first iteration, and between timed iterations one measurement of each standalone part."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.begin, self.rollout_end, self.line_written = [], [], []  # per iteration, perf_counter seconds
        self.standalone_s = []  # time spent in the standalone runs before each iteration
        self.experience_s = []
        self.alone = {"generation_s": [], "experience_s": [], "training_s": []}
        self.algorithm = self.layout = None
        self.inputs = {}
        self._programs = None

    @contextlib.contextmanager
    def installed(self):
        from jaxalign.objectives.ppo_algorithm import PPOSource
        from jaxalign.train import loop

        original_start, original_train, original_write = PPOSource.start_iteration, loop.train, \
            loop._MetricsLogger.write
        probe = self

        def train(config, algorithm, **kwargs):
            # the standalone train step's layout, planned as the loop plans its own (before it enters its mesh)
            probe.algorithm, probe.layout = algorithm, loop.plan(config, algorithm.trainables, algorithm.frozen)
            return original_train(config, algorithm, **kwargs)

        def start_iteration(source, context):
            return probe.start_iteration(original_start, source, context)

        def write(logger, line):
            probe.line_written.append(time.perf_counter())
            return original_write(logger, line)

        with mock.patch.object(PPOSource, "start_iteration", start_iteration), \
                mock.patch.object(loop, "train", train), mock.patch.object(loop._MetricsLogger, "write", write):
            yield self

    def start_iteration(self, original, source, context):
        import jax

        first = source.iteration == 0
        if source._jitted is None:
            jitted = jax.jit(source.experience_fn)

            def timed(*args):
                if first and "experience_args" not in self.inputs:
                    self.inputs["experience_args"] = args[3:]  # batch, scores, beta (the params are donated later)
                start = time.perf_counter()
                out = jax.block_until_ready(jitted(*args))
                self.experience_s.append(time.perf_counter() - start)
                return out

            source._jitted = timed
        if first:
            self.inputs["policy"] = _copy(context.state.params["policy"])
            self.inputs["value"] = _copy(context.state.params["value"])
            self.inputs["reference"] = source.reference_params(context)
            sampler = source.sampler
            source.sampler = _Recording(sampler, self.inputs)
            spent = 0.0
        else:
            start = time.perf_counter()
            self.measure_alone(source, context)
            spent = time.perf_counter() - start
            if source._iteration_end is not None:
                source._iteration_end += spent  # so the loop's training_s still counts training only
        self.standalone_s.append(spent)
        self.begin.append(time.perf_counter())
        try:
            metrics = original(source, context)
        finally:
            if first:
                source.sampler = sampler
        self.rollout_end.append(time.perf_counter())
        if first:
            self.inputs["minibatch"] = source.buffer[0]
        return metrics

    def compile_alone(self, source, context):
        """The three standalone programs, each run once (compilation)."""
        import jax
        import jax.numpy as jnp

        from jaxalign import sharding as shd
        from jaxalign.sampling import decode
        from jaxalign.train import state as st
        from jaxalign.train.step import train_step

        sampler, inputs = source.sampler, self.inputs
        generation = sampler.generation

        def generate(params, prompts, rng, stop_ids):
            return decode(sampler.policy, params, prompts["input_ids"], prompts["segment_ids"], prompts["positions"],
                          rng, max_new_tokens=generation.max_new_tokens, sampling=generation.sampling(),
                          stop_token_ids=stop_ids, pad_id=sampler.pad_id)

        layout = self.layout  # runs under the loop's mesh and rules (called from inside the loop)
        rng = jax.device_put(jax.random.PRNGKey(0), layout.shardings.rng)
        state = st.state_from_params({"policy": _copy(inputs["policy"]), "value": _copy(inputs["value"])},
                                     layout.txs, rng, layout.shardings)
        batch_spec = shd.spec_for(("batch",), layout.rules)
        step = jax.jit(
            lambda s, f, b: train_step(s, f, b, loss=self.algorithm.loss, txs=layout.txs,
                                       schedules=layout.schedules, grad_accum=1, batch_spec=batch_spec),
            in_shardings=(layout.shardings, layout.frozen_shardings,
                          jax.tree.map(lambda x: x.sharding, inputs["minibatch"])),
            donate_argnums=0,
        )
        frozen = {name: context.frozen[name] for name in layout.frozen_shardings}
        self._programs = {
            "generate": jax.jit(generate), "experience": jax.jit(source.experience_fn), "step": step,
            "state": state, "frozen": frozen, "stop_ids": jnp.asarray(sampler.stop_token_ids),
        }
        self.run_alone(record=False)

    def measure_alone(self, source, context):
        if self._programs is None:
            self.compile_alone(source, context)
        self.run_alone(record=True)

    def run_alone(self, record: bool):
        import jax

        p, inputs = self._programs, self.inputs
        start = time.perf_counter()
        jax.block_until_ready(p["generate"](inputs["policy"], inputs["prompts"], inputs["rng"], p["stop_ids"]))
        generation_s = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(p["experience"](inputs["policy"], inputs["value"], inputs["reference"],
                                              *inputs["experience_args"]))
        experience_s = time.perf_counter() - start
        start = time.perf_counter()
        state, metrics = p["state"], []
        for _ in range(self.setup.steps_per_iteration):
            state, step_metrics = p["step"](state, p["frozen"], inputs["minibatch"])
            metrics.append(step_metrics)
        jax.device_get(metrics)  # the loop waits for its steps the same way (its metrics line)
        jax.block_until_ready(state)
        training_s = time.perf_counter() - start
        p["state"] = state
        if record:
            for key, value in (("generation_s", generation_s), ("experience_s", experience_s),
                               ("training_s", training_s)):
                self.alone[key].append(value)


def run(setup: Setup, iterations: int) -> dict:
    """Runs `train_ppo` for 1 + `iterations` iterations with the probe; per timed iteration its parts and the
    standalone parts measured before it."""
    from jaxalign.commands.ppo import train_ppo

    probe = Probe(setup)
    with tempfile.TemporaryDirectory() as folder, probe.installed():
        config = ppo_config(setup, iterations, folder)
        started = time.perf_counter()
        train_ppo(config)
        total_s = time.perf_counter() - started
        lines = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    lines = [line for line in lines if "generation_s" in line]
    if len(lines) != iterations + 1 or len(probe.line_written) != iterations + 1:
        raise RuntimeError(f"expected {iterations + 1} iteration lines, got {len(lines)}")
    rows = []
    for k in range(1, iterations + 1):
        # iteration k: from the line closing iteration k - 1 to the line closing iteration k, less the standalone
        # runs between them
        wall = probe.line_written[k] - probe.line_written[k - 1] - probe.standalone_s[k]
        parts = {"generation_s": lines[k]["generation_s"], "scoring_s": lines[k]["scoring_s"],
                 "experience_s": probe.experience_s[k],
                 "training_s": probe.line_written[k] - probe.rollout_end[k]}
        parts["other_s"] = wall - sum(parts.values())
        row = {"iteration_s": wall, **parts, "response_length": lines[k]["response_length"],
               "reward_mean": lines[k]["reward_mean"], "kl": lines[k]["kl"]}
        if k + 1 < len(lines):  # the loop's own clock for the same span (logged with the next iteration)
            row["training_s_logged"] = lines[k + 1]["training_s"]
        rows.append(row)
    return {"rows": rows, "alone": probe.alone, "first_iteration_s": probe.line_written[0] - probe.begin[0],
            "run_s": total_s}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations (after one untimed)")
    parser.add_argument("--rollout-size", type=int, default=None)
    parser.add_argument("--minibatch", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    changes = {k: v for k, v in (("rollout_size", args.rollout_size), ("minibatch", args.minibatch),
                                 ("epochs", args.epochs), ("prompt_len", args.prompt_len),
                                 ("max_new_tokens", args.max_new_tokens)) if v is not None}
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
    print(f"model: {setup.total_params() / 1e6:.1f}M-parameter LLaMA policy (hidden {setup.hidden_size}, "
          f"{setup.num_layers} layers, vocab {setup.vocab_size}) + critic + reference, {setup.dtype}; "
          f"{setup.rollout_size} rollouts of {setup.prompt_len} prompt + {setup.max_new_tokens} new tokens, "
          f"{setup.epochs} epoch(s) of minibatches of {setup.minibatch} ({setup.steps_per_iteration} steps); "
          f"{results['machine']}", flush=True)
    print(f"{results['date']}; load average at start: {results['load_average_before']}", flush=True)
    measured = run(setup, args.iterations)
    rows, alone = measured["rows"], measured["alone"]
    keys = ("generation_s", "scoring_s", "experience_s", "training_s", "other_s")
    loop = {key: statistics.median(row[key] for row in rows) for key in ("iteration_s",) + keys}
    alone_median = {key: statistics.median(values) for key, values in alone.items()}
    lower_bound = sum(alone_median.values())
    # each iteration against the standalone runs just before it
    paired = [row["iteration_s"] / sum(alone[key][i] for key in alone) for i, row in enumerate(rows)]
    results.update({
        "iterations": [{k: round(v, 4) for k, v in row.items()} for row in rows],
        "alone_s_all": {k: [round(v, 4) for v in values] for k, values in alone.items()},
        "loop_median_s": loop,
        "alone_median_s": alone_median,
        "lower_bound_s": lower_bound,
        "ratio": loop["iteration_s"] / lower_bound,
        "ratio_paired_all": [round(r, 3) for r in paired],
        "ratio_paired_median": statistics.median(paired),
        "first_iteration_s": measured["first_iteration_s"],
        "run_s": measured["run_s"],
        "load_average_after": os.getloadavg(),
    })

    print(f"first iteration (compilation included): {measured['first_iteration_s']:.1f} s; whole run "
          f"{measured['run_s']:.0f} s")
    print("per timed iteration (s): " + "; ".join(
        ", ".join(f"{k.removesuffix('_s')} {row[k]:.2f}" for k in ("iteration_s",) + keys) for row in rows))
    print("standalone runs (s): " + "; ".join(f"{k.removesuffix('_s')} {[round(v, 2) for v in values]}"
                                              for k, values in alone.items()))
    print(f"{'part':<12} {'in the loop':>12} {'alone':>8}")
    for key in keys:
        alone_value = f"{alone_median[key]:8.2f}" if key in alone_median else f"{'-':>8}"
        print(f"{key.removesuffix('_s'):<12} {loop[key]:12.2f} {alone_value}")
    print(f"{'iteration':<12} {loop['iteration_s']:12.2f} {lower_bound:8.2f}  (lower bound = generation + "
          f"experience + training alone)")
    print(f"iteration / lower bound: {results['ratio']:.2f}x (medians over {len(rows)} iterations); each iteration "
          f"/ the standalone runs before it: {[round(r, 2) for r in paired]}, median "
          f"{results['ratio_paired_median']:.2f}x")
    print(f"load average at start / end: {results['load_average_before']} / {results['load_average_after']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
