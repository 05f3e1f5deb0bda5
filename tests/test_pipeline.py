"""`jaxalign pipeline`: stage configs built from a base file and overrides with `${stage}` references to earlier
exports, errors that name the file and stage, a pipeline killed in a stage continuing from that stage on a rerun,
and the report with a figure per stage."""

import json
from pathlib import Path

import pytest
import yaml

from jaxalign import pipeline as pl
from jaxalign.errors import JaxalignError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SFT = {"model": {"config": {"preset": "tiny", "max_position_embeddings": 320}},
       "data": {"train": "demo:instructions", "eval_fraction": 0.05, "template": "alpaca", "tokenizer": "byte",
                "pack": True},
       "train": {"steps": 4, "batch_size": 8, "seq_len": 320, "log_every": 2, "eval_every": 4},
       "checkpoint": {"every": 0}}
RM = {"model": {"path": "${sft}", "config": {}},
      "data": {"train": "demo:preferences", "eval_fraction": 0.1, "template": "alpaca", "tokenizer": None,
               "truncation": {"overlong": "drop"}},
      "train": {"steps": 4, "batch_size": 8, "seq_len": 320, "log_every": 2, "eval_every": 4},
      "checkpoint": {"every": 0}}


def write(folder: Path, stages: dict, output_dir: Path) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(output_dir), "stages": stages}, sort_keys=False))
    return path


def test_the_tiny_pipelines_resolve_every_stage():
    for name in ("llama2_chat_tiny", "llama2_chat_7b"):
        loaded = pl.load_pipeline(CONFIGS / "pipelines" / f"{name}.yaml")
        assert [s.command for s in loaded.stages] == ["sft", "rm", "rm", "rs", "ppo", "gatt"]
        out = loaded.output_dir
        ppo = loaded.stages[4].config
        assert ppo.model.path == str(out / "rs" / "hf") and ppo.reward.safety == str(out / "rm_safety" / "hf")
        assert all(s.config.output_dir == str(out / s.name) for s in loaded.stages)
    tiny = pl.load_pipeline(CONFIGS / "pipelines" / "llama2_chat_tiny.yaml")
    assert tiny.stages[1].config.model.config == {}  # `config: {}` clears the base's scratch model settings
    assert tiny.stages[0].config.train.batch_size == 16  # kept from the base where not overridden


@pytest.mark.parametrize("stages, message", [
    ({"a": {"command": "train", "config": {}}}, "stage 'a': 'command' must be one of sft, rm"),
    ({"a": {"command": "sft", "config": {"model": {"path": "${b}"}}}}, r"stage 'a': \$\{b\} is not an earlier stage"),
    ({"a": {"command": "sft", "config": {"train": {"stepz": 3}}}}, "stage 'a': unknown config key 'train.stepz'"),
    ({"a": {"command": "sft", "base": "missing.yaml"}}, "missing.yaml does not exist"),
])
def test_bad_pipelines_name_the_stage(tmp_path, stages, message):
    with pytest.raises(JaxalignError, match=message):
        pl.load_pipeline(write(tmp_path, stages, tmp_path / "out"))


def test_a_killed_pipeline_continues_from_its_unfinished_stage_and_reports(tmp_path, monkeypatch):
    import jaxalign.commands.rm as rm_command
    import jaxalign.commands.sft as sft_command

    path = write(tmp_path, {"sft": {"command": "sft", "config": SFT}, "rm": {"command": "rm", "config": RM}},
                 tmp_path / "out")
    runs = []
    train_sft, train_rm = sft_command.train_sft, rm_command.train_rm

    def counted_sft(config, allow_config_change=False):
        runs.append("sft")
        return train_sft(config, allow_config_change)

    def killed_rm(config, allow_config_change=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft_command, "train_sft", counted_sft)
    monkeypatch.setattr(rm_command, "train_rm", killed_rm)
    with pytest.raises(KeyboardInterrupt):
        pl.run_pipeline(pl.load_pipeline(path))
    monkeypatch.setattr(rm_command, "train_rm", train_rm)
    assert pl.run_pipeline(pl.load_pipeline(path)) == 0
    assert runs == ["sft"]  # the rerun skipped the finished stage
    out = tmp_path / "out"
    assert [json.loads(line)["stage"] for line in (out / "stages.jsonl").read_text().splitlines()] == ["sft", "rm"]
    report = (out / "report.md").read_text()
    for stage in ("sft", "rm"):
        assert f"![{stage}](report/{stage}.png)" in report
        assert (out / "report" / f"{stage}.png").read_bytes().startswith(b"\x89PNG")
    assert "SFT loss" in report and "by strength: better" in report
