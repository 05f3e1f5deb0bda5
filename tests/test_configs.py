"""Every recipe in configs/ loads, matches its published hyperparameters, and runs 2 steps at tiny scale."""

import json
from pathlib import Path

import pytest

from jaxalign.commands.sft import SFTConfig, train_sft
from jaxalign.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO = Path(__file__).resolve().parent.parent / "jaxalign" / "demo_data"

# recipe -> (published lr, global batch, max length, demo data in the recipe's format)
RECIPES = {
    "alpaca": (2e-5, 128, 512, "demo:instructions"),
    "vicuna": (2e-5, 128, 2048, "demo:dialogues_sharegpt"),
    "koala": (2e-5, 64, 2048, "[{path: 'demo:dialogues_sharegpt', format: sharegpt}, "
                              "{path: 'demo:dialogues_messages', format: messages}, "
                              "{path: 'demo:instructions', format: alpaca}]"),
    "gpt4all": (5e-5, 128, 1024, "demo:instructions"),
    "false_promise": (2e-3, 32, 2048, "demo:dialogues_sharegpt"),
    "orca_stage1": (2e-5, 128, 2048, "demo:dialogues_messages"),
    "orca_stage2": (2e-5, 128, 2048, "demo:dialogues_messages"),
    "lima": (1e-5, 32, 2048, "demo:dialogues_messages"),
    "dolly": (1e-5, 64, 2048, None),
    "llama2_chat_sft": (2e-5, 64, 4096, "demo:dialogues_messages"),
}


def tiny_overrides(output_dir: Path, train_data: str) -> list[str]:
    """Same recipe, tiny scale: a random tiny model, the byte tokenizer, bundled demo data, 2 steps."""
    return [
        f"output_dir={output_dir}", "model.path=null", "model.config.preset=tiny",
        "model.config.max_position_embeddings=256", "data.tokenizer=byte",
        f"data.train={train_data}", "train.steps=2", "train.batch_size=8", "train.seq_len=256",
        "train.log_every=1", "train.eval_every=0", "checkpoint.every=0", "checkpoint.async_save=false",
    ]


def dolly_file(tmp_path: Path) -> str:
    """databricks-dolly-15k style records {instruction, context, response}, made from the demo instructions."""
    records = [json.loads(line) for line in (DEMO / "instructions.jsonl").read_text().splitlines()[:64]]
    path = tmp_path / "dolly.jsonl"
    path.write_text("".join(json.dumps({"instruction": r["instruction"], "context": r.get("input", ""),
                                        "response": r["output"]}) + "\n" for r in records))
    return str(path)


def test_every_recipe_config_is_listed():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_with_published_hyperparameters(name):
    config = load_config(SFTConfig, CONFIGS / f"{name}.yaml")
    lr, batch_size, seq_len, _ = RECIPES[name]
    assert config.optimizer.lr == lr
    assert config.train.batch_size == batch_size
    assert config.train.seq_len == seq_len
    assert config.model.path is not None and config.model.dtype == "bfloat16"


def test_recipe_specifics():
    alpaca = load_config(SFTConfig, CONFIGS / "alpaca.yaml")
    assert (alpaca.data.pad_token, alpaca.data.mask, alpaca.optimizer.warmup_ratio) == ("[PAD]", "prompt", 0.03)
    lima = load_config(SFTConfig, CONFIGS / "lima.yaml")
    assert lima.model.config["residual_dropout"] == [0.0, 0.3]
    assert (lima.data.template, lima.optimizer.schedule, lima.optimizer.min_lr_ratio) == ("lima", "linear", 0.1)
    assert (lima.optimizer.b2, lima.optimizer.weight_decay, lima.optimizer.warmup_steps) == (0.95, 0.1, 0)
    imitation = load_config(SFTConfig, CONFIGS / "false_promise.yaml").optimizer
    assert (imitation.name, imitation.factored, imitation.parameter_scale) == ("adafactor", False, True)
    assert (imitation.b1, imitation.decay, imitation.clip, imitation.warmup_steps) == (0.9, 0.95, 1.0, 1000)
    gpt4all = load_config(SFTConfig, CONFIGS / "gpt4all.yaml")
    assert gpt4all.data.truncation.max_prompt_fraction == 0.5 and gpt4all.optimizer.warmup_steps == 100
    stage1 = load_config(SFTConfig, CONFIGS / "orca_stage1.yaml")
    stage2 = load_config(SFTConfig, CONFIGS / "orca_stage2.yaml")
    assert stage2.model.path == f"{stage1.output_dir}/hf"


@pytest.mark.parametrize("name", sorted(set(RECIPES) - {"orca_stage1", "orca_stage2"}))
def test_recipe_runs_two_steps_at_tiny_scale(name, tmp_path):
    path = CONFIGS / f"{name}.yaml"
    train_data = RECIPES[name][3] or dolly_file(tmp_path)
    config = load_config(SFTConfig, path, tiny_overrides(tmp_path, train_data))
    assert train_sft(config) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_orca_stage2_starts_from_stage1_export(tmp_path):
    stage1_path, stage2_path = CONFIGS / "orca_stage1.yaml", CONFIGS / "orca_stage2.yaml"
    data = RECIPES["orca_stage1"][3]
    stage1 = load_config(SFTConfig, stage1_path,
                         tiny_overrides(tmp_path / "stage1", data))
    assert train_sft(stage1) == 0
    overrides = tiny_overrides(tmp_path / "stage2", data)
    overrides = [o for o in overrides if not o.startswith(("model.path=", "model.config."))]
    stage2 = load_config(SFTConfig, stage2_path, [*overrides, f"model.path={tmp_path / 'stage1' / 'hf'}"])
    assert train_sft(stage2) == 0
    first = [json.loads(line) for line in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines()]
    second = [json.loads(line) for line in (tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert second[0]["loss"] < first[0]["loss"]


def test_quickstart_config_trains_from_scratch(tmp_path, capsys):
    """configs/tiny/sft.yaml as the Quickstart runs it, shortened to 3 steps (shorter than its warmup: a warning)."""
    config = load_config(SFTConfig, CONFIGS / "tiny" / "sft.yaml",
                         [f"output_dir={tmp_path}", "train.steps=3", "train.log_every=1",
                          "train.eval_every=3", "checkpoint.every=0"])
    assert config.model.path is None and config.data.tokenizer == "byte"
    assert train_sft(config) == 0
    assert "'optimizer.warmup_steps': 12 warmup steps exceed train.steps=3" in capsys.readouterr().err
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 3]
    assert lines[-1]["eval_perplexity"] > 1
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
