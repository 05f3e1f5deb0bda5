"""`jaxalign dpo` on a tiny random policy: ln 2 at the start, TRL's metric names, an export; the precomputed
reference gives the live reference's losses without a frozen model in the loop and survives resume; KTO on unpaired
examples; reference-free losses load no reference; bad configs name their key."""

import json
import math
from pathlib import Path

import jax
import pytest

import jaxalign
from jaxalign.commands.dpo import DPOConfig, train_dpo
from jaxalign.config import load_config
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.errors import JaxalignError
from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM

from tests.params import init_params

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "dpo.yaml"
DEMO = Path(__file__).resolve().parents[2] / "jaxalign" / "demo_data" / "preferences.jsonl"
PAIR_METRICS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA with the byte tokenizer, exported as a Hugging Face folder (what an SFT run leaves)."""
    out = tmp_path_factory.mktemp("policy")
    tokenizer = load_tokenizer("byte")
    model = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=len(tokenizer), max_position_embeddings=320))
    params = init_params(model, jax.random.PRNGKey(0))
    jaxalign.save_pretrained(model, params, out, tokenizer=tokenizer)
    return out


def run(policy_dir, out, *overrides, allow_config_change=False):
    config = load_config(DPOConfig, CONFIG, [f"output_dir={out}", f"model.path={policy_dir}", "train.steps=3",
                                             "train.batch_size=8", "train.log_every=1", "train.eval_every=3",
                                             "train.eval_batches=2", "checkpoint.every=0", *overrides])
    assert train_dpo(config, allow_config_change=allow_config_change) == 0
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train_lines(lines):
    return [line for line in lines if "loss" in line]


@pytest.fixture(scope="module")
def live_run(policy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("live")
    return out, run(policy_dir, out)


def test_starts_at_ln2_logs_trls_metrics_and_exports(live_run):
    out, lines = live_run
    start = lines[0]
    assert start["step"] == 0 and start["eval_loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert start["eval_rewards/margins"] == 0.0
    assert PAIR_METRICS <= set(train_lines(lines)[0])
    assert {f"eval_{name}" for name in PAIR_METRICS} <= set(lines[-1])
    assert [line["step"] for line in train_lines(lines)] == [1, 2, 3]
    hf = json.loads((out / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"]


def test_precomputed_reference_gives_the_live_losses_without_a_frozen_model_and_is_reused_on_resume(
        policy_dir, live_run, tmp_path, monkeypatch):
    from jaxalign.objectives import dpo
    from jaxalign.train import loop

    frozen_models = []
    original = loop.train

    def recording_train(config, algorithm, **kwargs):
        frozen_models.append(dict(algorithm.frozen))
        return original(config, algorithm, **kwargs)

    monkeypatch.setattr(loop, "train", recording_train)
    lines = run(policy_dir, tmp_path, "reference.precompute=true", "train.steps=2")
    assert frozen_models == [{}]
    stored = (tmp_path / "reference_logps.npz").read_bytes()
    live = live_run[1]
    # The live run's 3 steps decay the learning rate over 3 steps, these over 2: the first update is the same, so
    # the start's eval and steps 1 and 2 compare.
    assert [line["step"] for line in lines] == [0, 1, 2]
    for ours, theirs in zip(lines, live[:3]):
        assert ours["step"] == theirs["step"]
        for key, value in theirs.items():
            if key.startswith(("eval_", "loss", "rewards/", "logps/")):
                assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key

    def refuse(*args, **kwargs):
        raise AssertionError("the reference log-probs were computed again")

    monkeypatch.setattr(dpo, "precompute_reference", refuse)
    lines = run(policy_dir, tmp_path, "reference.precompute=true")
    assert [line["step"] for line in train_lines(lines)] == [1, 2, 3]
    assert (tmp_path / "reference_logps.npz").read_bytes() == stored


def test_kto_trains_on_unpaired_examples(policy_dir, tmp_path):
    records = []
    for line in DEMO.read_text().splitlines()[:48]:
        pair = json.loads(line)
        records.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        records.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    data = tmp_path / "unpaired.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = run(policy_dir, tmp_path / "kto", "loss.type=kto", f"data.train={data}", "train.steps=2",
                "train.eval_every=2")
    assert lines[0]["eval_loss"] == pytest.approx(0.5, abs=1e-6)  # policy = reference, KL point 0: 1 - σ(0)
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(lines[1])


def test_reference_free_losses_load_no_reference(policy_dir, tmp_path, monkeypatch):
    from jaxalign.train import loop

    frozen_models = []
    original = loop.train
    monkeypatch.setattr(loop, "train", lambda config, algorithm, **kw: (frozen_models.append(dict(algorithm.frozen)),
                                                                        original(config, algorithm, **kw))[1])
    lines = run(policy_dir, tmp_path, "loss.type=simpo", "loss.beta=null", "train.steps=1", "train.eval_every=0",
                "train.eval_at_start=false")
    assert frozen_models == [{}] and "rewards/accuracies" in lines[0]


@pytest.mark.parametrize("overrides, message", [
    (["loss.type=kto"], "'kto' trains on unpaired examples"),
    (["loss.type=simpo", "reference.path=/somewhere"], "'reference.path': loss type 'simpo' uses no reference"),
    (["loss.type=hinge", "loss.label_smoothing=0.1"], "'loss.label_smoothing': only loss types"),
    (["loss.label_smoothing=0.5"], "expected 0 <= ε < 0.5"),
    (["loss.beta=0"], "'loss.beta': expected > 0"),
])
def test_bad_configs_name_their_key(policy_dir, tmp_path, overrides, message):
    with pytest.raises(JaxalignError, match=message):
        run(policy_dir, tmp_path, *overrides)


def test_bad_pairs_name_their_line_and_identical_pairs_are_skipped(policy_dir, tmp_path, capsys):
    good = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "Hi", "chosen": "Hello"}) + "\n")
    with pytest.raises(JaxalignError, match=r"pairs\.jsonl:2.*'rejected'"):
        run(policy_dir, tmp_path / "a", f"data.train={data}", "data.eval_fraction=0")
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": "  "}) + "\n")
    with pytest.raises(JaxalignError, match=r"pairs\.jsonl:2: field 'chosen' is a blank response"):
        run(policy_dir, tmp_path / "b", f"data.train={data}", "data.eval_fraction=0")
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": "4"}) + "\n")
    lines = run(policy_dir, tmp_path / "c", f"data.train={data}", "data.eval_fraction=0", "train.steps=1",
                "train.eval_every=0", "train.eval_at_start=false")
    assert "pairs.jsonl:2: chosen and rejected are identical" in capsys.readouterr().err
    assert lines[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)


@pytest.mark.slow
def test_lora_reference_is_the_base_and_equals_an_explicit_frozen_copy(policy_dir, tmp_path, monkeypatch):
    from jaxalign.train import loop

    frozen_models = []
    original = loop.train
    monkeypatch.setattr(loop, "train", lambda config, algorithm, **kw: (frozen_models.append(sorted(algorithm.frozen)),
                                                                        original(config, algorithm, **kw))[1])
    lora = "model.lora={rank: 4, alpha: 8, targets: [all-linear]}"
    shared = (lora, "optimizer.lr=1e-2", "train.eval_every=3")
    base_reference = run(policy_dir, tmp_path / "base", *shared)
    explicit_copy = run(policy_dir, tmp_path / "copy", *shared, f"reference.path={policy_dir}")
    assert frozen_models == [["base"], ["base", "reference"]]
    assert base_reference[0]["eval_loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert len(base_reference) == len(explicit_copy)
    for ours, theirs in zip(base_reference, explicit_copy):
        for key, value in theirs.items():
            if key.startswith(("eval_", "loss", "rewards/", "logps/")):
                assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert train_lines(base_reference)[-1]["rewards/margins"] != 0.0  # the adapters did move the policy
