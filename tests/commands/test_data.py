import json

import pytest
import yaml

from jaxalign.cli import main


@pytest.fixture
def run_config(tmp_path):
    def write(data: dict):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return write


def test_inspect_renders_marked_spans_and_counts(run_config, capsys):
    config = run_config({
        "output_dir": "runs/x",
        "model": {"config": {"hidden_size": 64}},
        "data": {"train": "demo:instructions", "template": "alpaca", "tokenizer": "byte", "pack": True},
        "train": {"seq_len": 512, "batch_size": 4},
        "optimizer": {"lr": 1e-3},
    })
    assert main(["data", "inspect", config, "data.system_message=", "-n", "2", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "source demo:instructions: format alpaca, 480 records" in out
    assert out.count("--- ") == 2 and "### Response:\n[[" in out and "</s>]]" in out
    counts = dict(line.strip().split(": ") for line in out.split("counts (one epoch):\n")[1].splitlines())
    assert counts["examples"] == "480" and counts["dropped"] == "0" and counts["skipped records"] == "0"
    assert 0.5 < float(counts["packing_efficiency"]) <= 1.0
    assert int(counts["trained_tokens"]) < int(counts["tokens"])


def test_inspect_colours_on_request_and_reads_tokenizer_from_model_path(run_config, smollm2_dir, capsys):
    config = run_config({"model": {"path": str(smollm2_dir)},
                         "data": {"train": "demo:dialogues_messages", "template": "tokenizer"}})
    assert main(["data", "inspect", config, "-n", "1", "--color", "always", "--limit", "20"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[32m" in out and "[[" not in out
    assert "first 20 examples" in out and "examples: 20" in out


def test_inspect_reports_skipped_lines(run_config, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{oops\n")
    config = run_config({"data": {"train": str(data), "tokenizer": "byte", "on_error": "skip", "template": "plain"}})
    assert main(["data", "inspect", config]) == 0
    out = capsys.readouterr().out
    assert "skipped records: 1" in out and f"{data}:2: malformed JSON" in out


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"train": "demo:instructions", "tokenizer": "byte"}, ["data.mask=answers"], "config key 'data.mask'"),
        ({"train": "demo:instructions"}, [], "no tokenizer: set config key 'data.tokenizer'"),
        ({"train": "missing.jsonl", "tokenizer": "byte"}, [], "missing.jsonl: file does not exist"),
        ({"tokenizer": "byte"}, [], "config key 'data.train' is required"),
    ],
)
def test_inspect_errors_exit_2_without_traceback(run_config, capsys, data, overrides, message):
    assert main(["data", "inspect", run_config({"data": data}), *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
