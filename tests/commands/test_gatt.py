"""`jaxalign gatt` on a tiny random byte-level policy: the training set holds one example per answered later turn
with the instruction in the first user turn only, the fine-tuning trains on it, the evaluation writes instruction
following by turn before and after, and a rerun does nothing again; bad configs name their key."""

import json
from pathlib import Path

import pytest

from jaxalign import gatt
from jaxalign.commands import gatt as gatt_command
from jaxalign.commands.gatt import GAttConfig, train_gatt
from jaxalign.config import load_config
from jaxalign.errors import JaxalignError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "gatt.yaml"
TOY = ["model.path=null", "model.config={preset: tiny, max_position_embeddings: 192}", "data.tokenizer=byte",
       "data.template=plain", "data.eval_fraction=0.25", "generation.max_new_tokens=12", "gatt.prompts_per_batch=8",
       "gatt.require_following=false", "gatt.eval_turns=3", "train.steps=6", "train.batch_size=8",
       "train.seq_len=192", "train.log_every=3", "checkpoint.every=0"]


def dialogues_file(folder: Path) -> Path:
    path = folder / "dialogues.jsonl"
    lines = []
    for n in range(16):
        turns = 2 + n % 2
        messages = []
        for t in range(turns):
            messages += [{"role": "user", "content": f"Question {t + 1} of dialogue {n}?"},
                         {"role": "assistant", "content": f"Answer {t + 1}."}]
        lines.append(json.dumps({"messages": messages}) + "\n")
    path.write_text("".join(lines))
    return path


def config(out, *overrides):
    return load_config(GAttConfig, CONFIG, [f"output_dir={out}", *TOY, *overrides])


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_gatt_builds_the_set_finetunes_evaluates_and_skips_finished_work(tmp_path, monkeypatch):
    data = dialogues_file(tmp_path)
    assert train_gatt(config(tmp_path / "run", f"data.train={data}")) == 0
    out = tmp_path / "run"
    records = read_jsonl(out / "gatt_train.jsonl")
    assert records
    texts = {gatt.text_of(c) for c in _all_combinations()}
    for record in records:
        users = [m["content"] for m in record["messages"] if m["role"] == "user"]
        assert len(users) >= 2 and record["messages"][-1]["role"] == "assistant"
        instruction = next(t for t in texts if users[0].endswith(" " + t))
        assert not any(instruction in u for u in users[1:])
    evaluation = read_jsonl(out / "gatt_eval.jsonl")
    assert {(line["model"], line["turn"]) for line in evaluation} >= {("before", 1), ("before", 2), ("after", 2)}
    assert all(0 <= line["following"] <= 1 for line in evaluation)
    metrics = read_jsonl(out / "finetune" / "metrics.jsonl")
    assert metrics[-1]["step"] == 6
    assert (out / "hf" / "model.safetensors").is_file()

    def no_sampling(*args, **kwargs):
        raise AssertionError("a finished run samples nothing again")

    monkeypatch.setattr(gatt_command.Responder, "converse", no_sampling)
    assert train_gatt(config(out, f"data.train={data}")) == 0


def _all_combinations():
    return [(a,) for a in gatt.BUILTIN] + [(a, b) for a in gatt.BUILTIN for b in gatt.BUILTIN if a.kind != b.kind]


@pytest.mark.parametrize("override, message", [
    ("gatt.eval_turns=1", "gatt.eval_turns': later turns"),
    ("gatt.max_combined=0", "gatt.max_combined': expected >= 1"),
    ("train.seq_len=8", "train.seq_len': 8 leaves no room"),
])
def test_bad_configs_name_their_key(tmp_path, override, message):
    with pytest.raises(JaxalignError, match=message):
        config(tmp_path, override)


def test_single_turn_data_is_refused(tmp_path):
    path = tmp_path / "single.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(JaxalignError, match="no dialogue with two or more user turns"):
        train_gatt(config(tmp_path / "run", f"data.train={path}", "data.eval_fraction=0"))
