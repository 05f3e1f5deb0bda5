"""`jaxalign rs` on a tiny random byte-level policy with a Python reward: each round's pool holds per prompt the best
response ever seen (the previous pool against every sample of the round), a run that crashed in a round continues it
without sampling finished work again and ends with the uninterrupted run's weights; bad configs name their key.
(That the rounds raise the reward of a trained policy is measured on configs/tiny/rs.yaml, see README.)"""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxalign.commands import rs as rs_command
from jaxalign.commands.rs import RSConfig, train_rs
from jaxalign.config import load_config
from jaxalign.errors import JaxalignError
from jaxalign.rejection_sampling import prompt_key, read_pool

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "rs.yaml"
LETTERS = "tests.commands.ppo_rewards:ascii_letters"
TOY = ["model.path=null", "model.config={preset: tiny, max_position_embeddings: 96}", "data.tokenizer=byte",
       "reward.model=null", f"reward.function={LETTERS}", "data.template=plain", "data.eval_fraction=0.25",
       "generation.max_new_tokens=16", "generation.temperature=1.2", "rs.rounds=2", "rs.samples_per_prompt=4",
       "rs.prompts_per_batch=4", "train.steps=24", "train.batch_size=8", "train.seq_len=96", "train.log_every=8",
       "optimizer.lr=3e-3", "optimizer.schedule=constant", "optimizer.warmup_steps=0", "checkpoint.every=0"]


def prompts_file(folder: Path) -> Path:
    path = folder / "prompts.jsonl"
    questions = [f"Name {n} things you like about {topic}." for n in (2, 3, 4)
                 for topic in ("the sea", "music", "trees", "rain")]
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    return path


def config(out, data, *overrides):
    return load_config(RSConfig, CONFIG, [f"output_dir={out}", f"data.train={data}", *TOY, *overrides])


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rs")
    data = prompts_file(out)
    assert train_rs(config(out / "run", data)) == 0
    return out / "run", data


def test_each_pool_keeps_the_best_response_ever_seen_per_prompt(finished_run):
    out, _ = finished_run
    pool_1, pool_2 = read_pool(out / "round_1" / "pool.jsonl"), read_pool(out / "round_2" / "pool.jsonl")
    assert len(pool_1) == len(pool_2) == 9  # 12 prompts, 3 held out for eval
    samples = read_jsonl(out / "round_2" / "samples.jsonl")
    assert len(samples) == 9 * 4
    for key, entry in pool_2.items():
        candidates = [s for s in samples if prompt_key(s["prompt"]) == key and s["completion"].strip()]
        best_new = max(candidates, key=lambda s: s["score"], default=None)
        if best_new is not None and best_new["score"] > pool_1[key].score:
            assert (entry.completion, entry.score, entry.round) == (best_new["completion"], best_new["score"], 2)
        else:
            assert entry == pool_1[key]
    rounds = read_jsonl(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["new_in_pool"] == sum(e.round == 2 for e in pool_2.values())
    assert rounds[2]["pool_score_mean"] == pytest.approx(np.mean([e.score for e in pool_2.values()]))
    assert rounds[1]["best_minus_median"] > 0
    assert all("eval_reward_mean" in r for r in rounds)
    final = (out / "hf" / "model.safetensors").read_bytes()
    assert final == (out / "round_2" / "hf" / "model.safetensors").read_bytes()


def test_a_crashed_run_continues_its_round_and_matches_the_uninterrupted_run(finished_run, tmp_path, monkeypatch):
    reference, data = finished_run
    sampled = []
    original_sample, original_finetune = rs_command.Rounds.sample, rs_command.Rounds.finetune

    def sample(self, section, number, previous):
        sampled.append(number)
        return original_sample(self, section, number, previous)

    def crash_in_round_2(self, section, number, folder):
        if number == 2:
            raise RuntimeError("crash")
        return original_finetune(self, section, number, folder)

    monkeypatch.setattr(rs_command.Rounds, "sample", sample)
    monkeypatch.setattr(rs_command.Rounds, "finetune", crash_in_round_2)
    with pytest.raises(RuntimeError, match="crash"):
        train_rs(config(tmp_path, data))
    monkeypatch.setattr(rs_command.Rounds, "finetune", original_finetune)
    assert train_rs(config(tmp_path, data)) == 0
    assert sampled == [1, 2]  # the rerun neither samples round 1 nor round 2 again
    for name in ("rounds.jsonl", "round_2/pool.jsonl", "hf/model.safetensors"):
        assert (tmp_path / name).read_bytes() == (reference / name).read_bytes(), name
    assert train_rs(config(tmp_path, data)) == 0  # finished: nothing to do
    assert sampled == [1, 2]


def test_a_causal_lm_as_reward_model_is_refused(finished_run, tmp_path):
    policy = finished_run[0] / "hf"
    with pytest.raises(JaxalignError, match=f"config key 'reward.model': {policy} is not a reward model"):
        train_rs(config(tmp_path, finished_run[1], "reward.function=null", f"reward.model={policy}"))


@pytest.mark.parametrize("override, message", [
    ("rs.samples_per_prompt=1", "rs.samples_per_prompt': choosing the best needs at least 2"),
    ("rs.rounds=0", "rs.rounds': expected >= 1"),
    ("reward.model=runs/rm", "set exactly one of reward.model"),
    ("train.seq_len=16", "train.seq_len': 16 leaves no room"),
])
def test_bad_configs_name_their_key(tmp_path, override, message):
    with pytest.raises(JaxalignError, match=message):
        config(tmp_path, "demo:prompts", override)
