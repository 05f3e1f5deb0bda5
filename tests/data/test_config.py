import json

import pytest

from jaxalign.config import apply_overrides, from_dict
from jaxalign.data import DataConfig, DataLoader, SourceSpec, byte_tokenizer, prepare_tokenizer, tokens_to_add
from jaxalign.errors import JaxalignError


def test_train_as_path_spec_or_list():
    assert from_dict(DataConfig, {"train": "a.jsonl"}).sources("train") == (SourceSpec("a.jsonl"),)
    spec = from_dict(DataConfig, {"train": {"path": "a.jsonl", "weight": 0.5}}).sources("train")
    assert spec == (SourceSpec("a.jsonl", weight=0.5),)
    mixed = from_dict(DataConfig, {"train": ["a.jsonl", {"path": "b.jsonl", "weight": 2, "format": "sharegpt"}]})
    assert mixed.sources("train") == (SourceSpec("a.jsonl"), SourceSpec("b.jsonl", weight=2.0, format="sharegpt"))


def test_eval_defaults_to_train_sources_with_fraction():
    config = from_dict(DataConfig, {"train": "a.jsonl", "eval_fraction": 0.1})
    assert config.sources("eval") == (SourceSpec("a.jsonl"),)
    assert from_dict(DataConfig, {"train": "a", "eval": "b"}).sources("eval") == (SourceSpec("b"),)


def test_command_line_override_of_train():
    data = apply_overrides({"data": {"train": "a.jsonl", "pack": False}}, ["data.train=b/*.jsonl", "data.pack=true"])
    config = from_dict(DataConfig, data["data"], prefix="data")
    assert config.sources("train") == (SourceSpec("b/*.jsonl"),) and config.pack


def test_truncation_section():
    config = from_dict(DataConfig, {"train": "a", "truncation": {"max_prompt_fraction": 0.5, "overlong": "drop"}})
    assert config.truncation.max_prompt_fraction == 0.5 and config.truncation.overlong == "drop"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"template": "zephyr"}, "config key 'data.template': expected one of 'tokenizer'"),
        ({"mask": "answers"}, "config key 'data.mask': expected one of 'prompt'"),
        ({"format": "csv"}, "config key 'data.format'"),
        ({"pack": "yes"}, "config key 'data.pack': expected bool"),
        ({"shuffel": True}, "unknown config key 'data.shuffel'"),
        ({"train": 3}, "config key 'data.train'"),
        ({"eval_fraction": 1.5}, "'data.eval_fraction': expected 0 <= x < 1"),
        ({"train": "a", "eval": "b", "eval_fraction": 0.1}, "'data.eval' and 'data.eval_fraction' are exclusive"),
        ({"truncation": {"max_prompt_fraction": 2.0}}, "'data.truncation.max_prompt_fraction'"),
        ({"train": {"path": "a", "weight": -1}}, "config key 'data.train'.*'weight': -1"),
        ({"train": {"weight": 1}}, "config key 'data.train'"),
        ({"blank_responses": "drop"}, "config key 'data.blank_responses': expected one of 'error', 'skip'"),
    ],
)
def test_bad_config_values_name_the_key(data, message):
    with pytest.raises(JaxalignError, match=message):
        from_dict(DataConfig, data, prefix="data")


def test_missing_train_source_names_the_key():
    with pytest.raises(JaxalignError, match="config key 'data.train' is required"):
        DataConfig().sources("train")
    with pytest.raises(JaxalignError, match="list of sources is empty"):
        DataConfig(train=[]).sources("train")


def test_tokens_to_add_and_prepare_tokenizer(sp_tok):
    tok = sp_tok.__class__.from_pretrained(sp_tok.name_or_path)
    config = from_dict(DataConfig, {"template": "lima", "pad_token": "[PAD]", "eot_token": "<EOT>",
                                    "added_tokens": ["<tool>", "</s>"]})
    assert tokens_to_add(config, tok) == ["<tool>", "[PAD]", "<EOT>"]
    before = len(tok)
    assert prepare_tokenizer(config, tok) == ["<tool>", "[PAD]", "<EOT>"]
    assert len(tok) == before + 3 and tok.pad_token == "[PAD]" and tok.pad_token_id == before + 1
    assert tokens_to_add(config, tok) == []
    assert tok.convert_ids_to_tokens(tok.encode("a<EOT>b", add_special_tokens=False))[1] == "<EOT>"


def test_byte_tokenizer_already_has_the_default_special_tokens():
    tok = byte_tokenizer()
    assert tokens_to_add(from_dict(DataConfig, {"template": "lima", "pad_token": "[PAD]"}), tok) == []


def test_source_spec_validation():
    with pytest.raises(JaxalignError, match="weight must be >= 0"):
        SourceSpec("a", weight=-1)
    with pytest.raises(JaxalignError, match="'path' is required"):
        SourceSpec(weight=1)
    with pytest.raises(JaxalignError, match="limit must be positive"):
        SourceSpec("a", limit=0)


def test_blank_responses_error_by_default_or_skipped_and_reported_once(tmp_path, byte_tok, capsys):
    joke = {"messages": [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": ""}]}
    good = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]}
    blank_turn = {"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "   "}]}
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (good, joke, good, good)))
    hey = {"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hey."}]}
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (blank_turn, hey, hey)))
    train = [str(tmp_path / "m.jsonl"), str(tmp_path / "s.jsonl")]
    with pytest.raises(JaxalignError, match=r"m.jsonl:2: field 'messages\[1\].content' is a blank response"):
        DataLoader(from_dict(DataConfig, {"train": train, "template": "chatml"}), byte_tok, batch_size=2, seq_len=64)

    config = from_dict(DataConfig, {"train": train, "template": "chatml", "blank_responses": "skip",
                                    "eval_fraction": 0.25}, prefix="data")
    capsys.readouterr()
    loader = DataLoader(config, byte_tok, batch_size=2, seq_len=64)
    eval_loader = DataLoader(config, byte_tok, batch_size=2, seq_len=64, split="eval")
    assert len(loader.examples) + len(eval_loader.examples) == 5
    assert (loader.blank_skipped, len(loader.skipped), eval_loader.skipped) == (2, 2, [])
    assert capsys.readouterr().err == (
        f"jaxalign: data.train: skipped 2 records: 2 with a blank response (data.blank_responses=skip); first: "
        f"{tmp_path / 'm.jsonl'}:2: field 'messages[1].content' is a blank response\n"
    )
    batch = next(loader)
    assert batch["loss_mask"].sum(axis=1).min() > 2
