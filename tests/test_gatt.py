"""Ghost Attention's transform on a 3-turn dialogue, token by token through the data pipeline (where the instruction
is, which tokens train), the instruction checks, the combinations and the instruction-list file."""

import json
import random

import numpy as np
import pytest

from jaxalign import gatt
from jaxalign.data import DataConfig, load_tokenizer
from jaxalign.data.formats import parse_record
from jaxalign.data.loader import Preprocessor
from jaxalign.errors import JaxalignError

DIALOGUE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi."},
    {"role": "assistant", "content": "dataset answer 1"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "dataset answer 2"},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "dataset answer 3"},
]
PIRATE = 'Act as a pirate: begin every answer with "Ahoy!"'
REPLIES = ["Ahoy! Hello.", "Ahoy! Paris.", "Ahoy! Madrid."]


def test_sampling_prompts_put_the_instruction_in_every_user_turn_or_the_first():
    assert gatt.sampling_prompt(DIALOGUE, [], PIRATE, every_turn=True) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi. {PIRATE}"}]
    assert gatt.sampling_prompt(DIALOGUE, REPLIES[:2], PIRATE, every_turn=True) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"Hi. {PIRATE}"}, {"role": "assistant", "content": "Ahoy! Hello."},
        {"role": "user", "content": f"Capital of France? {PIRATE}"}, {"role": "assistant", "content": "Ahoy! Paris."},
        {"role": "user", "content": f"And of Spain? {PIRATE}"}]
    first_only = gatt.sampling_prompt(DIALOGUE, REPLIES[:1], PIRATE, every_turn=False)
    assert [m["content"] for m in first_only] == ["Be brief.", f"Hi. {PIRATE}", "Ahoy! Hello.", "Capital of France?"]
    with pytest.raises(ValueError, match="no turn 4"):
        gatt.sampling_prompt(DIALOGUE, REPLIES, PIRATE, every_turn=True)


def test_the_training_example_token_by_token():
    record = gatt.training_example(DIALOGUE, REPLIES, PIRATE)
    assert [m["content"] for m in record["messages"]] == [
        "Be brief.", f"Hi. {PIRATE}", "Ahoy! Hello.", "Capital of France?", "Ahoy! Paris.", "And of Spain?",
        "Ahoy! Madrid."]
    tokenizer = load_tokenizer("byte")
    config = DataConfig(template="llama2_chat", mask="last_turn")
    [[item]] = Preprocessor(config, tokenizer, 1024).process([parse_record(record, "messages", "gatt:1")])
    ids, trained = item.parts[0].ids, item.parts[0].trained
    text = tokenizer.decode(ids)
    assert text.count(PIRATE) == 1 and text.index(PIRATE) < text.index("Ahoy! Hello.")  # first user turn only
    trained_ids = ids[trained.astype(bool)]
    # exactly the last reply and the end token after it: nothing of the earlier turns, replies included
    assert tokenizer.decode(trained_ids[:-1]).strip() == "Ahoy! Madrid."
    assert trained_ids[-1] == tokenizer.eos_token_id
    first_trained = int(np.flatnonzero(trained)[0])
    assert tokenizer.decode(ids[:first_trained]).endswith("And of Spain? [/INST]")
    np.testing.assert_array_equal(np.flatnonzero(trained), first_trained + np.arange(len(trained_ids)))  # one block


@pytest.mark.parametrize("reply, check, expected", [
    ("Ahoy! Paris.", {"starts_with": "Ahoy!"}, True),
    ("  ahoy! paris", {"starts_with": "Ahoy!"}, True),
    ("Paris. Ahoy!", {"starts_with": "Ahoy!"}, False),
    ("Paris. Cheers!", {"ends_with": "Cheers!"}, True),
    ("I play CHESS.", {"contains": "chess"}, True),
    ("PARIS, 42!", {"uppercase": True}, True),
    ("Paris", {"uppercase": True}, False),
    ("42", {"uppercase": True}, False),
    ("paris.", {"lowercase": True}, True),
])
def test_checks(reply, check, expected):
    assert gatt.follows(reply, [gatt.Instruction("k", "text", check)]) is expected


def test_a_combination_follows_only_when_every_check_passes():
    pirate, caps, french = gatt.BUILTIN[0], gatt.BUILTIN[6], gatt.BUILTIN[9]
    assert gatt.follows("AHOY! PARIS.", [pirate, caps, french])  # French has no check: it passes
    assert not gatt.follows("Ahoy! Paris.", [pirate, caps])
    assert gatt.text_of([pirate, caps]) == f"{pirate.text} {caps.text}"
    assert gatt.checkable([pirate]) and not gatt.checkable([french])


def test_combinations_draw_distinct_kinds():
    rng = random.Random(0)
    drawn = [gatt.combine(rng, gatt.BUILTIN, 2) for _ in range(200)]
    assert all(1 <= len(c) <= 2 and len({i.kind for i in c}) == len(c) for c in drawn)
    assert {len(c) for c in drawn} == {1, 2}
    assert {i.kind for c in drawn for i in c} == {"persona", "hobby", "style", "language"}


def test_instruction_files(tmp_path):
    path = tmp_path / "instructions.jsonl"
    path.write_text(json.dumps({"kind": "style", "instruction": "Shout.", "check": {"uppercase": True}}) + "\n\n"
                    + json.dumps({"kind": "language", "instruction": "In Dutch."}) + "\n")
    assert gatt.load_instructions(str(path)) == (gatt.Instruction("style", "Shout.", {"uppercase": True}),
                                                 gatt.Instruction("language", "In Dutch."))
    assert gatt.load_instructions("builtin") == gatt.BUILTIN
    path.write_text(json.dumps({"kind": "style", "instruction": "Shout.", "check": {"loud": True}}) + "\n")
    with pytest.raises(JaxalignError, match=r"instructions.jsonl:1: 'check' must be null or an object"):
        gatt.load_instructions(str(path))
    with pytest.raises(JaxalignError, match="gatt.instructions': .* is not a file"):
        gatt.load_instructions(str(tmp_path / "missing.jsonl"))
