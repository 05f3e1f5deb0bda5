"""`jaxalign ppo` on a tiny random byte-level policy with a Python reward: the reward rises while KL stays bounded,
nothing recompiles after the first iteration, a resumed run repeats the uninterrupted one bit for bit, the
metrics users know are logged; bad configs name their key."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxalign.commands.ppo import PPOConfig, train_ppo
from jaxalign.config import load_config
from jaxalign.errors import JaxalignError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "ppo.yaml"
TOY = ["model.path=null", "model.config={preset: tiny, max_position_embeddings: 144}", "data.tokenizer=byte",
       "reward.model=null", "reward.function=tests.commands.ppo_rewards:ascii_letters", "generation.max_new_tokens=16",
       "train.seq_len=144", "train.eval_at_start=false", "train.eval_every=0", "optimizer.lr=3e-3",
       "value_optimizer.lr=1e-3", "checkpoint.every=4"]
ITERATION = 4  # minibatch steps per iteration: 2 epochs x 32 samples / 16
TIMING = ("generation_s", "scoring_s", "training_s", "tokens_per_s")


def run(out, *overrides, allow_config_change=False):
    config = load_config(PPOConfig, CONFIG, [f"output_dir={out}", *TOY, *overrides])
    assert train_ppo(config, allow_config_change=allow_config_change) == 0
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def iterations(lines):
    return [line for line in lines if "reward_mean" in line]


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    return out, run(out, f"train.steps={16 * ITERATION}")


@pytest.mark.slow
def test_reward_rises_while_kl_stays_bounded(learning_run):
    lines = iterations(learning_run[1])
    assert len(lines) == 16
    first, last = lines[0]["reward_mean"], sum(line["reward_mean"] for line in lines[-4:]) / 4
    print(f"reward_mean: first iteration {first:.3f}, mean of the last four {last:.3f}; "
          f"largest kl {max(line['kl'] for line in lines):.2f}")
    assert last > first + 0.08  # measured: 0.17 -> 0.33
    assert all(line["kl"] < 5.0 for line in lines)


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory):
    """A run of five iterations (periodic checkpoints off: orbax traces its own copies at every save): its output
    folder and, per iteration, its metrics line and how many programs had been traced when it was written."""
    from jaxalign.train import loop

    traces, logged = [], []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(event)

    write = loop._MetricsLogger.write

    def counting_write(self, line):
        logged.append((line, len(traces)))
        write(self, line)

    out = tmp_path_factory.mktemp("ppo-traced")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop._MetricsLogger, "write", counting_write)
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            run(out, f"train.steps={5 * ITERATION}", "checkpoint.every=0")
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
    return out, [(line, count) for line, count in logged if "reward_mean" in line]


def test_logs_the_iteration_and_step_metrics(traced_run):
    out, logged = traced_run
    lines = [line for line, _ in logged]
    assert {"reward_mean", "reward_std", "kl", "kl_beta", "response_length", "eos_fraction", "explained_variance",
            "generation_s", "scoring_s", "training_s", "policy_loss", "value_loss", "entropy", "clipfrac",
            "approx_kl", "grad_norm/policy", "grad_norm/value", "lr/policy", "lr/value"} <= set(lines[1])
    assert 0 < lines[1]["response_length"] <= 16 and 0.0 <= lines[1]["eos_fraction"] <= 1.0
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # policy = reference at first
    assert (out / "hf" / "model.safetensors").is_file()


def test_nothing_recompiles_after_the_first_iteration(traced_run):
    traced = [count for _, count in traced_run[1]]
    assert len(traced) == 5 and traced[0] > 0
    assert traced[1:] == [traced[1]] * 4


@pytest.mark.parametrize("overrides, message", [
    (["ppo.rollout_size=24"], "'ppo.rollout_size': 24 samples do not split into minibatches"),
    (["train.steps=6"], "'train.steps': 6 is not a whole number of iterations of 4"),
    (["reward.function=null"], "config section 'reward': set exactly one"),
    (["reward.helpful=a"], "set exactly one"),
    (["ppo.kl_kind=k4"], "'ppo.kl_kind'"),
    (["train.seq_len=16"], "'train.seq_len': 16 leaves no room"),
    (["data.train=demo:instructions"], "PPO samples responses to prompts, but the data holds lm examples"),
])
def test_bad_configs_name_their_key(tmp_path, overrides, message):
    with pytest.raises(JaxalignError, match=message):
        run(tmp_path, "train.steps=4", *overrides)


def test_lora_policy_uses_the_base_as_reference_and_exports_its_adapter(tmp_path, monkeypatch):
    from jaxalign.train import loop

    frozen_models = []
    original = loop.train
    monkeypatch.setattr(loop, "train", lambda config, algorithm, **kw: (frozen_models.append(sorted(algorithm.frozen)),
                                                                        original(config, algorithm, **kw))[1])
    lines = iterations(run(tmp_path, f"train.steps={2 * ITERATION}", "checkpoint.every=0",
                           "model.lora={rank: 4, alpha: 8, targets: [q_proj, v_proj]}"))
    assert frozen_models == [["base"]]  # no second copy of the policy: the reference is the base
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-4) and lines[1]["kl"] != 0.0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_the_prompts_of_a_preference_file_serve_as_prompts(tmp_path):
    lines = iterations(run(tmp_path, f"train.steps={ITERATION}", "checkpoint.every=0", "data.train=demo:preferences",
                           "train.eval_every=4", "train.eval_batches=1"))
    assert len(lines) == 1 and lines[0]["response_length"] > 0
    samples = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert samples and samples[0]["prompt"][-1]["role"] == "user"


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_repeats_the_uninterrupted_run(learning_run, tmp_path):
    """A run killed (SIGKILL, no chance to save) after its second iteration's checkpoint, then run again: every
    iteration's metrics equal the uninterrupted run's bit for bit."""
    import signal
    import time

    argv = [f"output_dir={tmp_path}", *TOY, f"train.steps={4 * ITERATION}", f"checkpoint.every={ITERATION}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "jaxalign.cli", "ppo", str(CONFIG), *argv], env=env,
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "checkpoints" / str(2 * ITERATION) / "commit_success.txt"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run(tmp_path, *argv[1:])
    uninterrupted = [line for line in learning_run[1] if line["step"] <= 4 * ITERATION]
    assert [line["step"] for line in resumed] == [line["step"] for line in uninterrupted]
    for ours, theirs in zip(resumed, uninterrupted):
        assert {k: v for k, v in ours.items() if k not in TIMING} == {k: v for k, v in theirs.items()
                                                                       if k not in TIMING}
