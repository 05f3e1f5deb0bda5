"""`jaxalign grpo` on a tiny random byte-level policy with a Python reward: the reward rises, all-equal groups are
counted and masked, nothing recompiles after the first iteration, a resumed run repeats the uninterrupted one bit
for bit, a k3 KL term loads the reference; bad configs name their key."""

import json
from pathlib import Path

import jax
import pytest

from jaxalign.commands.grpo import GRPOConfig, train_grpo
from jaxalign.config import load_config
from jaxalign.errors import JaxalignError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "grpo.yaml"
LETTERS = "tests.commands.ppo_rewards:ascii_letters"
TOY = ["model.path=null", "model.config={preset: tiny, max_position_embeddings: 144}", "data.tokenizer=byte",
       f"rewards=[{{function: {LETTERS}, weight: 1.0}}]", "generation.max_new_tokens=16", "train.seq_len=144",
       "train.eval_at_start=false", "train.eval_every=0", "optimizer.lr=3e-3", "checkpoint.every=0",
       "grpo.prompts_per_iteration=8", "grpo.group_size=4", "grpo.dynamic_sampling=false", "train.batch_size=16",
       "train.log_every=2", "grpo.epochs=1", "grpo.kl_beta=0", "grpo.advantage=grpo", "grpo.aggregation=sequence_mean",
       "grpo.clip_low=0.2", "grpo.clip_high=0.28", "grpo.overlong_cache=null", "generation.temperature=1.0",
       "optimizer.schedule=constant", "optimizer.warmup_steps=0", "data.template=alpaca", "data.eval_fraction=0.1"]
ITERATION = 2  # minibatch steps per iteration: 8 prompts x 4 samples / 16
TIMING = ("generation_s", "scoring_s", "training_s", "tokens_per_s")


def run(out, *overrides):
    config = load_config(GRPOConfig, CONFIG, [f"output_dir={out}", *TOY, *overrides])
    assert train_grpo(config) == 0
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def iterations(lines):
    return [line for line in lines if "reward_mean" in line]


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo")
    return out, run(out, f"train.steps={20 * ITERATION}", "train.eval_every=40", "grpo.eval_samples=2")


@pytest.mark.slow
def test_reward_rises_and_the_metrics_are_logged(learning_run):
    lines = iterations(learning_run[1])
    assert len(lines) == 20
    first = sum(line["reward_mean"] for line in lines[:3]) / 3
    last = sum(line["reward_mean"] for line in lines[-3:]) / 3
    print(f"reward_mean: first three iterations {first:.3f}, last three {last:.3f}")
    assert last > first + 0.08
    assert {"reward_mean", "reward_std", f"reward/{LETTERS}", f"reward_std/{LETTERS}", "accuracy",
            "all_equal_groups", "response_length", "eos_fraction", "generation_s", "policy_loss", "clipfrac",
            "approx_kl", "entropy"} <= set(lines[1])
    assert "kl" not in lines[1]  # kl_beta 0: no KL term, no reference model
    evals = [line for line in learning_run[1] if "eval_accuracy" in line]
    assert [line["step"] for line in evals] == [40]
    assert all(0 <= line["eval_sampled_accuracy"] <= 1 and 0 <= line["eval_accuracy"] <= 1 for line in evals)
    assert (learning_run[0] / "hf" / "model.safetensors").is_file()


def test_a_resumed_run_repeats_the_uninterrupted_one_bit_for_bit(tmp_path):
    uninterrupted = run(tmp_path / "whole", f"train.steps={4 * ITERATION}")
    run(tmp_path / "resumed", f"train.steps={2 * ITERATION}")
    resumed = run(tmp_path / "resumed", f"train.steps={4 * ITERATION}")
    assert {"reward_mean", "reward_std", f"reward/{LETTERS}", "accuracy", "all_equal_groups", "response_length",
            "eos_fraction", "generation_s", "policy_loss", "clipfrac", "approx_kl", "entropy"} <= set(
        iterations(uninterrupted)[1])
    assert len(resumed) == len(uninterrupted)
    for ours, theirs in zip(resumed, uninterrupted):
        assert {k: v for k, v in ours.items() if k not in TIMING} == {k: v for k, v in theirs.items()
                                                                       if k not in TIMING}


def test_nothing_recompiles_after_the_first_iteration(tmp_path):
    traces = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        run(tmp_path / "two", f"train.steps={2 * ITERATION}")
        two = len(traces)
        traces.clear()
        run(tmp_path / "five", f"train.steps={5 * ITERATION}")
        five = len(traces)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert five == two


def test_all_equal_groups_are_masked_and_a_kl_term_loads_the_reference(tmp_path, monkeypatch):
    from jaxalign.train import loop

    frozen_models = []
    original = loop.train
    monkeypatch.setattr(loop, "train", lambda config, algorithm, **kw: (frozen_models.append(sorted(algorithm.frozen)),
                                                                        original(config, algorithm, **kw))[1])
    # a reward that is the same for every sample: every group is all-equal, masked out, nothing to learn
    lines = iterations(run(tmp_path, f"train.steps={ITERATION}", "grpo.dynamic_sampling=true", "grpo.kl_beta=0.05",
                           "rewards=[{function: jaxalign.rewards:contains_reference, weight: 1.0}]",
                           "data.train=[{path: 'demo:prompts', limit: 8}]", "data.eval_fraction=0"))
    assert frozen_models == [["reference"]]
    assert lines[0]["all_equal_groups"] == 1.0
    assert "policy_loss" not in lines[0]  # no valid token left in any minibatch


def test_lora_policy_takes_its_kl_to_the_base_and_exports_its_adapter(tmp_path, monkeypatch):
    from jaxalign.train import loop

    frozen_models = []
    original = loop.train
    monkeypatch.setattr(loop, "train", lambda config, algorithm, **kw: (frozen_models.append(sorted(algorithm.frozen)),
                                                                        original(config, algorithm, **kw))[1])
    lines = run(tmp_path, f"train.steps={2 * ITERATION}", "train.log_every=1", "grpo.kl_beta=0.05",
                "checkpoint.every=0", "model.lora={rank: 4, alpha: 8, targets: [q_proj, v_proj]}")
    steps = [line for line in lines if "kl" in line]
    assert frozen_models == [["base"]]  # the reference is the base under the adapters, no second copy
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps[-1]["kl"] > 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("overrides, message", [
    (["grpo.group_size=1"], "'grpo.group_size': advantages relative to a group need at least 2"),
    (["grpo.advantage=ppo"], "'grpo.advantage': expected one of grpo, dr_grpo, rloo"),
    (["grpo.aggregation=mean"], "'grpo.aggregation'"),
    (["train.batch_size=12"], "'train.batch_size': 32 samples per iteration"),
    (["train.steps=3"], "'train.steps': 3 is not a whole number of iterations of 2"),
    (["rewards=[]"], "'rewards': at least one"),
    (["grpo.overlong_cache=40"], "'grpo.overlong_cache'"),
    (["grpo.eval_samples=-1"], "'grpo.eval_samples': expected >= 0"),
])
def test_bad_configs_name_their_key(tmp_path, overrides, message):
    with pytest.raises(JaxalignError, match=message):
        run(tmp_path, "train.steps=2", *overrides)
