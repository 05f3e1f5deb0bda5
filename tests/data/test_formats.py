import dataclasses
import json

import pytest

from jaxalign.data.formats import (
    BlankResponse,
    Conversation,
    Message,
    PreferencePair,
    Prompt,
    Text,
    UnpairedExample,
    detect_format,
    parse_record,
)
from jaxalign.data.sources import load_source
from jaxalign.data.config import SourceSpec
from jaxalign.data.templates import SpecialTokens, render, render_pair, render_text, render_unpaired
from jaxalign.errors import JaxalignError

ORIGIN = "data.jsonl:7"


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"instruction": "a", "context": "", "response": "b"}, "dolly"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "sharegpt"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "hh"),
        ({"prompt": "a"}, "prompt"),
        ({"text": "a"}, "text"),
        ({"prompt": "a", "completion": "b", "label": True}, "unpaired"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "label": False},
         "unpaired"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "label": "true"},
         "unpaired"),
        ({"prompt": "a", "label": True}, "prompt"),  # no completion: a prompt that carries a label field
        ({"prompt": "a", "completion": "b"}, "completion"),
        ({"prompt": "a", "chosen": "b", "rejected": "c", "label": True}, "preference"),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record, ORIGIN) == fmt


def test_alpaca_keeps_input_as_context():
    example = parse_record({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "alpaca", ORIGIN)
    assert example == Conversation((Message("user", "Add.", "2 and 3"), Message("assistant", "5")), ORIGIN)
    assert example.messages[0].text() == "Add.\n\n2 and 3"


def test_completion_is_prompt_then_completion():
    record = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "Sum?"}], "completion": "5",
              "score": 0.7}
    assert parse_record(record, "completion", ORIGIN) == Conversation(
        (Message("system", "s"), Message("user", "Sum?"), Message("assistant", "5")), ORIGIN)
    assert parse_record({"prompt": "Sum?", "completion": [{"role": "assistant", "content": "5"}]}, "completion",
                        ORIGIN).messages == (Message("user", "Sum?"), Message("assistant", "5"))
    with pytest.raises(BlankResponse, match="field 'completion'"):
        parse_record({"prompt": "Sum?", "completion": " "}, "completion", ORIGIN)
    with pytest.raises(JaxalignError, match="field 'prompt': turn 1 is 'assistant', expected 'user'"):
        parse_record({"prompt": [{"role": "assistant", "content": "hi"}], "completion": "5"}, "completion", ORIGIN)


def test_dolly_context():
    example = parse_record({"instruction": "Sum?", "context": "2, 3", "response": "5"}, "dolly", ORIGIN)
    assert example.messages[0].context == "2, 3" and example.messages[1].content == "5"


def test_sharegpt_roles_system_field_and_trailing_user_turn():
    record = {
        "system": "Be kind.",
        "conversations": [
            {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye?"}
        ],
    }
    example = parse_record(record, "sharegpt", ORIGIN)
    assert [(m.role, m.content) for m in example.messages] == [
        ("system", "Be kind."), ("user", "hi"), ("assistant", "hello")
    ]


def test_messages_with_system_message():
    record = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                           {"role": "assistant", "content": "a"}]}
    assert [m.role for m in parse_record(record, "messages", ORIGIN).messages] == ["system", "user", "assistant"]


def test_preference_with_message_lists_strength_and_safety():
    record = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": "bad",
        "strength": "slightly better",
        "safety": True,
    }
    pair = parse_record(record, "preference", ORIGIN)
    assert pair == PreferencePair((Message("user", "q"),), (Message("assistant", "good"),),
                                  (Message("assistant", "bad"),), 2, 1, ORIGIN)
    assert parse_record({**record, "strength": 0, "safety": False}, "preference", ORIGIN).strength == 0
    unlabelled = parse_record({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference", ORIGIN)
    assert (unlabelled.strength, unlabelled.safety) == (-1, -1)


def test_hh_full_text_pairs():
    record = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 4",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 5",
    }
    pair = parse_record(record, "hh", ORIGIN)
    assert [(m.role, m.content) for m in pair.prompt] == [("user", "Hi"), ("assistant", "Hello!"), ("user", "2+2?")]
    assert pair.chosen == (Message("assistant", "4"),) and pair.rejected == (Message("assistant", "5"),)


def test_prompt_with_reference_answer():
    prompt = parse_record({"prompt": "2+2?", "answer": "4"}, "prompt", ORIGIN)
    assert prompt == Prompt((Message("user", "2+2?"),), "4", ORIGIN)


def test_text():
    assert parse_record({"text": "abc"}, "text", ORIGIN) == Text("abc", ORIGIN)


def test_unpaired_trl_shape_with_strings_and_message_lists():
    example = parse_record({"prompt": "q", "completion": "a", "label": False}, "unpaired", ORIGIN)
    assert example == UnpairedExample((Message("user", "q"),), (Message("assistant", "a"),), False, ORIGIN)
    assert example.mismatched == ()
    record = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
              "completion": [{"role": "assistant", "content": "a"}], "label": True}
    example = parse_record(record, "unpaired", ORIGIN)
    assert example.prompt == (Message("system", "S"), Message("user", "q"))
    assert example.completion == (Message("assistant", "a"),) and example.desirable


def test_unpaired_llamafactory_shape_splits_off_the_last_answer():
    record = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                           {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                           {"role": "assistant", "content": "a2"}], "label": True}
    example = parse_record(record, "unpaired", ORIGIN)
    assert [(m.role, m.content) for m in example.prompt] == [
        ("system", "S"), ("user", "u1"), ("assistant", "a1"), ("user", "u2")
    ]
    assert example.completion == (Message("assistant", "a2"),) and example.desirable
    sharegpt = {"system": "S", "conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}],
                "label": "0"}
    assert parse_record(sharegpt, "unpaired", ORIGIN) == UnpairedExample(
        (Message("system", "S"), Message("user", "u")), (Message("assistant", "a"),), False, ORIGIN
    )


@pytest.mark.parametrize("label, desirable", [(True, True), (False, False), ("true", True), (" False ", False),
                                              ("TRUE", True), ("1", True), ("0", False)])
def test_unpaired_label_as_bool_or_text(label, desirable):
    assert parse_record({"prompt": "q", "completion": "a", "label": label}, "unpaired", ORIGIN).desirable is desirable


def test_render_unpaired_continues_the_prompt_with_both_completions():
    example = parse_record({"messages": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                                         {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}],
                            "label": True}, "unpaired", ORIGIN)
    tokens = SpecialTokens("<s>", "</s>", "<|eot|>")
    with pytest.raises(JaxalignError, match=f"{ORIGIN}: the unpaired example has no mismatched completion"):
        render_unpaired(example, "gpt4all", tokens)
    with pytest.raises(JaxalignError, match="render_unpaired"):
        render(example, "gpt4all", tokens)
    example = dataclasses.replace(example, mismatched=(Message("assistant", "other"),))
    completion, kl = render_unpaired(example, "gpt4all", tokens)
    assert render_text(completion) == "<s>u1\na1</s>u2\na2</s>"
    assert render_text(kl) == "<s>u1\na1</s>u2\nother</s>"
    assert render_text([s for s in completion if s.response]) == "a2</s>"
    assert render_text([s for s in kl if s.response]) == "other</s>"
    pair = PreferencePair(example.prompt, example.completion, example.mismatched, -1, -1, ORIGIN)
    assert render_pair(pair, "gpt4all", tokens) == (completion, kl)


def test_unknown_fields_are_ignored():
    assert parse_record({"instruction": "a", "output": "b", "id": 3, "source": "x"}, "alpaca", ORIGIN)


# ---- bad input: each error names the origin (file:line) and the field ----

BAD = [
    ({"input": "x", "output": "y"}, "alpaca", "missing field 'instruction'"),
    ({"instruction": "x"}, "alpaca", "missing field 'output'"),
    ({"instruction": 3, "output": "y"}, "alpaca", "field 'instruction' must be a str, got int"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "alpaca", "field 'input' must be a str, got list"),
    ({"instruction": "x", "context": "c"}, "dolly", "missing field 'response'"),
    ({"conversations": "hello"}, "sharegpt", "field 'conversations' must be a list, got str"),
    ({"conversations": []}, "sharegpt", "field 'conversations' is an empty conversation"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt",
     r"field 'conversations\[0\].from': unknown role 'robot'"),
    ({"conversations": [{"from": "human"}]}, "sharegpt", r"field 'conversations\[0\]' has no 'value'"),
    ({"conversations": [{"from": "human", "value": 5}]}, "sharegpt",
     r"field 'conversations\[0\].value' must be a string"),
    ({"conversations": ["hi"]}, "sharegpt", r"field 'conversations\[0\]' must be an object"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}, "sharegpt",
     "turn 1 is 'assistant', expected 'user'"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt", "has no assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "messages", "turn 2 is 'user', expected 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "messages", "a system message is only allowed first"),
    ({"prompt": "q", "chosen": "a"}, "preference", "missing field 'rejected'"),
    ({"prompt": "q", "chosen": 1, "rejected": "b"}, "preference", "field 'chosen' must be a string or messages"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "strength": "much better"}, "preference", "field 'strength'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "safety": "yes"}, "preference", "field 'safety' must be true"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "strength": "4"}, "preference", "field 'strength': expected 0-3"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "preference",
     "field 'chosen' must end with an assistant message"),
    ({"chosen": "Human: a Assistant: b", "rejected": "x"}, "hh", r"field 'chosen' must start with '\\n\\nHuman:'"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"}, "hh",
     "must share the dialogue"),
    ({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a"}, "hh", "must end with an '\\\\n\\\\nAssistant:' turn"),
    ({"prompt": ""}, "prompt", "field 'prompt' is empty"),
    ({"prompt": "q", "answer": 4}, "prompt", "field 'answer' must be a string"),
    ({"text": None}, "text", "missing field 'text'"),
    ({"prompt": "q", "completion": "a"}, "unpaired", "missing field 'label'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "unpaired",
     "missing field 'label'"),
    ({"prompt": "q", "completion": "a", "label": None}, "unpaired", "missing field 'label'"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "unpaired", "field 'label' must be true or false"),
    ({"prompt": "q", "completion": "a", "label": 1}, "unpaired", "field 'label' must be true or false"),
    ({"prompt": "q", "completion": "a", "label": ""}, "unpaired", "field 'label' must be true or false"),
    ({"prompt": "q", "label": True}, "unpaired", "missing field 'completion'"),
    ({"prompt": "q", "completion": 3, "label": True}, "unpaired", "field 'completion' must be a string or messages"),
    ({"prompt": "q", "completion": [{"role": "user", "content": "a"}], "label": True}, "unpaired",
     "field 'completion' must end with an assistant message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "more?"}], "label": True}, "unpaired",
     "field 'messages' must end with an assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}], "label": True}, "unpaired", "has no assistant turn"),
    ({"conversations": [{"from": "gpt", "value": "a"}], "label": True}, "unpaired",
     "turn 1 is 'assistant', expected 'user'"),
    (["not", "a", "record"], "alpaca", "expected a JSON object"),
]


@pytest.mark.parametrize("record, fmt, message", BAD)
def test_bad_records_name_origin_and_field(record, fmt, message):
    with pytest.raises(JaxalignError, match=message) as info:
        parse_record(record, fmt, ORIGIN)
    assert str(info.value).startswith(f"{ORIGIN}: ")


# ---- blank responses: one rule for every format ----

BLANK = [
    ({"instruction": "x", "output": ""}, "alpaca", "output"),
    ({"instruction": "x", "input": "y", "output": "  \n"}, "alpaca", "output"),
    ({"instruction": "x", "response": "\t"}, "dolly", "response"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "   "}]}, "sharegpt",
     "conversations[1].value"),
    ({"system": "S", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""},
                                       {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]},
     "sharegpt", "conversations[1].value"),
    ({"messages": [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": ""}]},
     "messages", "messages[1].content"),
    ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                   {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                   {"role": "assistant", "content": " "}]}, "messages", "messages[4].content"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "preference", "chosen"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "preference", "rejected"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "\n"}], "rejected": "b"}, "preference",
     "chosen[0].content"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": ""}}, "preference", "rejected[0].value"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:  "}, "hh", "rejected"),
    ({"text": " \n "}, "text", "text"),
    ({"prompt": "q", "completion": " ", "label": True}, "unpaired", "completion"),
    ({"prompt": "q", "completion": [{"role": "assistant", "content": ""}], "label": False}, "unpaired",
     "completion[0].content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "r"}, {"role": "assistant", "content": "\n"}], "label": True},
     "unpaired", "messages[3].content"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}], "label": "1"}, "unpaired",
     "conversations[1].value"),
]


@pytest.mark.parametrize("record, fmt, field", BLANK)
def test_a_blank_response_is_the_same_error_in_every_format(record, fmt, field):
    with pytest.raises(BlankResponse) as info:
        parse_record(record, fmt, ORIGIN)
    assert str(info.value) == (
        f"{ORIGIN}: field '{field}' is a blank response (empty or whitespace only); fix the record, or set "
        "data.blank_responses=skip to skip such records"
    )
    assert info.value.brief() == f"{ORIGIN}: field '{field}' is a blank response"
    assert isinstance(info.value, JaxalignError)


def test_a_malformed_conversation_is_reported_as_malformed_not_as_blank():
    record = {"messages": [{"role": "assistant", "content": ""}, {"role": "user", "content": "a"}]}
    with pytest.raises(JaxalignError, match="turn 1 is 'assistant', expected 'user'") as info:
        parse_record(record, "messages", ORIGIN)
    assert not isinstance(info.value, BlankResponse)


def test_blank_user_turns_and_empty_optional_fields_are_not_blank_responses():
    sharegpt = {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "Hello."}]}
    assert parse_record(sharegpt, "sharegpt", ORIGIN).messages[1].content == "Hello."
    assert parse_record({"instruction": "x", "input": "", "output": "y"}, "alpaca", ORIGIN).messages[0].context == ""


def test_strength_and_safety_written_as_text_as_csv_cells_are():
    record = {"prompt": "q", "chosen": "a", "rejected": "b"}
    pair = parse_record({**record, "strength": "2", "safety": "True"}, "preference", ORIGIN)
    assert (pair.strength, pair.safety) == (2, 1)
    pair = parse_record({**record, "strength": "", "safety": ""}, "preference", ORIGIN)
    assert (pair.strength, pair.safety) == (-1, -1)
    assert parse_record({**record, "safety": "false"}, "preference", ORIGIN).safety == 0


def test_undetectable_format():
    with pytest.raises(JaxalignError, match=r"data.jsonl:7: cannot detect the record format from its fields \['foo'\]"):
        detect_format({"foo": 1}, ORIGIN)


def test_unknown_format():
    with pytest.raises(JaxalignError, match="unknown format 'csv'"):
        parse_record({"a": 1}, "csv", ORIGIN)


# ---- real files: LLaMA-Factory's demo data ----


def test_llamafactory_alpaca_demo_loads_and_renders(llamafactory_data):
    data = load_source(SourceSpec(str(llamafactory_data / "alpaca_en_demo.json")))
    assert data.format == "alpaca" and len(data.examples) == len(json.loads(
        (llamafactory_data / "alpaca_en_demo.json").read_text()))
    tokens = SpecialTokens("<s>", "</s>", "<|eot|>")
    with_input = next(e for e in data.examples if e.messages[0].context)
    text = render_text(render(with_input, "alpaca", tokens))
    assert "### Input:\n" + with_input.messages[0].context + "\n\n### Response:\n" in text
    assert text.endswith(with_input.messages[1].content + "</s>")


def test_llamafactory_dpo_demo_loads_and_renders(llamafactory_data):
    data = load_source(SourceSpec(str(llamafactory_data / "dpo_en_demo.json")))
    assert data.format == "preference" and len(data.examples) == 300
    tokens = SpecialTokens("<s>", "</s>", "<|eot|>")
    multi_turn = [e for e in data.examples if len(e.prompt) > 1]
    for pair in data.examples[:5] + multi_turn[:5]:
        chosen, rejected = render_pair(pair, "chatml", tokens)
        assert "".join(s.text for s in chosen if s.response) == pair.chosen[-1].content + "<|im_end|>"
        assert "".join(s.text for s in rejected if s.response) == pair.rejected[-1].content + "<|im_end|>"
        prompt_text = "".join(s.text for s in chosen if not s.response).rstrip("\n")
        assert pair.prompt[-1].content in prompt_text


def test_llamafactory_kto_demo_loads_as_unpaired_examples(llamafactory_data):
    records = json.loads((llamafactory_data / "kto_en_demo.json").read_text())
    data = load_source(SourceSpec(str(llamafactory_data / "kto_en_demo.json")))
    assert data.format == "unpaired" and len(data.examples) == 300 and not data.skipped
    assert sum(e.desirable for e in data.examples) == 150
    for record, example in zip(records, data.examples):
        assert example.desirable is record["label"]
        assert example.completion == (Message("assistant", record["messages"][-1]["content"]),)
        assert [m.content for m in example.prompt] == [m["content"] for m in record["messages"][:-1]]
    assert any(len(e.prompt) > 1 for e in data.examples)
