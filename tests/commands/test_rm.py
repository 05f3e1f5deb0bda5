"""`jaxalign rm` on the tiny config: trains, logs the reward metrics overall and per strength, exports a Hugging Face
sequence classifier that `jaxalign reward` scores; bad configs name their key."""

import json
from pathlib import Path

import pytest

from jaxalign.cli import main
from jaxalign.commands.rm import RMConfig, train_rm
from jaxalign.config import load_config
from jaxalign.errors import JaxalignError

from tests.params import init_params

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "rm.yaml"
DEMO = Path(__file__).resolve().parents[2] / "jaxalign" / "demo_data" / "preferences.jsonl"


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-rm")
    config = load_config(RMConfig, CONFIG, [f"output_dir={out}", "train.steps=3", "train.log_every=1",
                                            "train.eval_every=3", "train.eval_at_start=true",
                                            "checkpoint.every=0"])
    assert train_rm(config) == 0
    return out


def test_tiny_rm_logs_reward_metrics_overall_and_per_strength(tiny_rm):
    lines = [json.loads(line) for line in (tiny_rm / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "loss" in line]
    assert [line["step"] for line in train] == [1, 2, 3]
    assert {"accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm"} <= set(train[0])
    start, evaluation = [line for line in lines if "eval_loss" in line]
    assert (start["step"], evaluation["step"]) == (0, 3)  # train.eval_at_start: a baseline before the first step
    strengths = ("significantly_better", "better", "slightly_better", "negligibly_better")
    assert {f"eval_accuracy/{name}" for name in strengths} <= set(evaluation)
    assert 0.0 <= evaluation["eval_accuracy"] <= 1.0


def test_export_is_a_sequence_classifier_that_jaxalign_reward_scores(tiny_rm, tmp_path, capsys):
    hf = json.loads((tiny_rm / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForSequenceClassification"] and hf["num_labels"] == 1
    pairs = [line for line in DEMO.read_text().splitlines()[:8] if len(line) < 400][:4]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(pairs) + "\n" + json.dumps({"prompt": "What is 2+2?", "response": "4."}) + "\n")
    out, explicit = tmp_path / "scores.jsonl", tmp_path / "alpaca.jsonl"
    assert main(["reward", "--model", str(tiny_rm / "hf"), "--data", str(data), "--out", str(out)]) == 0
    assert main(["reward", "--model", str(tiny_rm / "hf"), "--data", str(data), "--template", "alpaca",
                 "--out", str(explicit)]) == 0
    assert out.read_text() == explicit.read_text()  # the export carries the template it was trained with
    scores = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scores) == len(pairs) + 1
    assert set(scores[0]) == {"reward_chosen", "reward_rejected", "margin"} and set(scores[-1]) == {"reward"}
    assert scores[0]["margin"] == pytest.approx(scores[0]["reward_chosen"] - scores[0]["reward_rejected"])
    assert f"{len(pairs)} pairs: accuracy" in capsys.readouterr().err


def test_a_reward_model_starts_from_a_language_model_whose_vocabulary_grows(tmp_path):
    """A causal-LM export as `model.path` with a token the data config adds: the LM head is dropped, a score head
    put on the trunk, the embeddings grown (mean row) — all inside the loop's mesh."""
    import jax

    import jaxalign
    from jaxalign.data.tokenizer import load_tokenizer
    from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM
    from jaxalign.models.loading import load_model

    tokenizer = load_tokenizer("byte")
    lm = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=len(tokenizer), max_position_embeddings=320))
    params = init_params(lm, jax.random.PRNGKey(0))
    jaxalign.save_pretrained(lm, params, tmp_path / "sft", tokenizer=tokenizer)
    config = load_config(RMConfig, CONFIG, [f"output_dir={tmp_path / 'rm'}", f"model.path={tmp_path / 'sft'}",
                                            "model.config={}", "data.tokenizer=null", "data.added_tokens=['<x>']",
                                            "train.steps=1", "train.eval_every=0", "checkpoint.every=0"])
    assert train_rm(config) == 0
    model, rm_params = load_model(tmp_path / "rm" / "hf")
    assert type(model).__name__ == "LlamaForScore" and model.config.vocab_size == len(tokenizer) + 1


def test_dropped_pairs_are_logged_as_a_share(tiny_rm):
    lines = [json.loads(line) for line in (tiny_rm / "metrics.jsonl").read_text().splitlines()]
    dropped = [line["data/dropped"] for line in lines if "data/dropped" in line]
    assert dropped and all(0.0 <= share < 1.0 for share in dropped)


def test_reward_refuses_a_language_model(tmp_path, capsys):
    import jax

    import jaxalign
    from jaxalign.data.tokenizer import load_tokenizer
    from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.tiny())
    params = init_params(model, jax.random.PRNGKey(0))
    jaxalign.save_pretrained(model, params, tmp_path / "lm", tokenizer=load_tokenizer("byte"))
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
    assert main(["reward", "--model", str(tmp_path / "lm"), "--data", str(data)]) == 2
    assert "a language model, not a reward model" in capsys.readouterr().err


def test_a_pad_token_that_ends_the_answers_is_refused(tmp_path):
    config = load_config(RMConfig, CONFIG, [f"output_dir={tmp_path}", "data.pad_token=</s>"])
    with pytest.raises(JaxalignError, match="'data.pad_token': the pad token '</s>' also ends the answers"):
        train_rm(config)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("overrides, message", [
    (["data.margin=small"], "'data.margin': set the reward model's margin with loss.margin"),
    (["data.truncation.overlong=truncate"], "'data.truncation.overlong': 'truncate' would score"),
    (["loss.center_coefficient=-1"], "'loss.center_coefficient': expected >= 0"),
    (["loss.margin=huge"], "'loss.margin': expected one of 'none', 'small', 'large'"),
])
def test_bad_rm_config_names_the_key(overrides, message):
    with pytest.raises(JaxalignError, match=message):
        load_config(RMConfig, CONFIG, overrides)


def test_rm_refuses_data_without_preference_pairs(tmp_path):
    config = load_config(RMConfig, CONFIG, [f"output_dir={tmp_path}", "data.train=demo:instructions"])
    with pytest.raises(JaxalignError, match="'data.train': a reward model trains on preference pairs"):
        train_rm(config)


def test_a_lora_reward_model_trains_its_adapters_and_its_whole_score_head(tmp_path):
    """model.lora on a causal-LM export: the trunk stays frozen under adapters, the fresh score head trains fully,
    and the export folds the adapters into a plain sequence classifier."""
    import jax
    import numpy as np

    import jaxalign
    from jaxalign.data.tokenizer import load_tokenizer
    from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM
    from jaxalign.models.loading import load_model

    tokenizer = load_tokenizer("byte")
    lm = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=len(tokenizer), max_position_embeddings=320))
    params = init_params(lm, jax.random.PRNGKey(0))
    jaxalign.save_pretrained(lm, params, tmp_path / "sft", tokenizer=tokenizer)
    config = load_config(RMConfig, CONFIG, [f"output_dir={tmp_path / 'rm'}", f"model.path={tmp_path / 'sft'}",
                                            "model.config={}", "data.tokenizer=null", "train.steps=2",
                                            "train.eval_every=0", "checkpoint.every=0",
                                            "model.lora={rank: 4, alpha: 8, targets: [q_proj, v_proj]}"])
    assert train_rm(config) == 0
    model, exported = load_model(tmp_path / "rm" / "hf")
    assert type(model).__name__ == "LlamaForScore" and model.config.lora_rank == 0
    trunk, start = exported["model"]["layers"], params["model"]["layers"]
    np.testing.assert_array_equal(trunk["mlp"]["up_proj"]["kernel"], start["mlp"]["up_proj"]["kernel"])
    assert not np.array_equal(trunk["self_attn"]["q_proj"]["kernel"], start["self_attn"]["q_proj"]["kernel"])
