import numpy as np
import pytest

from jaxalign.data.formats import Conversation, Message, PreferencePair, Prompt, Text
from jaxalign.data.masking import tokenize_segments
from jaxalign.data.templates import SpecialTokens, render, render_pair, render_text
from jaxalign.data.tokenizer import SegmentEncoder
from jaxalign.errors import JaxalignError

TOKENS = SpecialTokens(bos="<s>", eos="</s>", eot="<|eot|>")
TWO_TURNS = Conversation(
    (
        Message("user", "What is 2 + 3?"),
        Message("assistant", "2 + 3 = 5."),
        Message("user", "And times 4?"),
        Message("assistant", "5 * 4 = 20."),
    ),
    "test:1",
)
WITH_SYSTEM = Conversation((Message("system", "Be brief."),) + TWO_TURNS.messages[:2], "test:2")
WITH_INPUT = Conversation((Message("user", "Add the numbers.", "2 and 3"), Message("assistant", "5")), "test:3")

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# (template, conversation, exact rendered text, the response spans in order)
PINNED = [
    (
        "alpaca",
        WITH_INPUT,
        f"<s>{ALPACA_INPUT}\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5</s>",
        ["5", "</s>"],
    ),
    (
        "alpaca",
        TWO_TURNS,
        f"<s>{ALPACA_NO_INPUT}\n\n### Instruction:\nWhat is 2 + 3?\n\n### Response:\n2 + 3 = 5.</s>"
        "\n\n### Instruction:\nAnd times 4?\n\n### Response:\n5 * 4 = 20.</s>",
        ["2 + 3 = 5.", "</s>", "5 * 4 = 20.", "</s>"],
    ),
    (
        "dolly",
        WITH_INPUT,
        f"<s>{ALPACA_NO_INPUT}\n### Instruction:\nAdd the numbers.\n2 and 3\n### Response:\n5</s>",
        ["5", "</s>"],
    ),
    (
        "vicuna_v1.1",
        TWO_TURNS,
        f"<s>{VICUNA} USER: What is 2 + 3? ASSISTANT: 2 + 3 = 5.</s>USER: And times 4? ASSISTANT: 5 * 4 = 20.</s>",
        [" 2 + 3 = 5.", "</s>", " 5 * 4 = 20.", "</s>"],
    ),
    (
        "vicuna_v1.1",
        WITH_SYSTEM,
        "<s>Be brief. USER: What is 2 + 3? ASSISTANT: 2 + 3 = 5.</s>",
        [" 2 + 3 = 5.", "</s>"],
    ),
    (
        "koala",
        TWO_TURNS,
        "<s>BEGINNING OF CONVERSATION: USER: What is 2 + 3? GPT:2 + 3 = 5.</s>USER: And times 4? GPT:5 * 4 = 20.</s>",
        ["2 + 3 = 5.", "</s>", "5 * 4 = 20.", "</s>"],
    ),
    (
        "llama2_chat",
        TWO_TURNS,
        "<s>[INST] What is 2 + 3? [/INST] 2 + 3 = 5. </s><s>[INST] And times 4? [/INST] 5 * 4 = 20. </s>",
        [" 2 + 3 = 5. ", "</s>", " 5 * 4 = 20. ", "</s>"],
    ),
    (
        "llama2_chat",
        WITH_SYSTEM,
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 + 3? [/INST] 2 + 3 = 5. </s>",
        [" 2 + 3 = 5. ", "</s>"],
    ),
    (
        "chatml",
        WITH_SYSTEM,
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n",
        ["2 + 3 = 5.<|im_end|>"],
    ),
    (
        "orca",
        TWO_TURNS,
        "<s>### System:\nYou are an AI assistant that follows instruction extremely well. Help as much as you can."
        "\n\n### User:\nWhat is 2 + 3?\n\n### Response:\n2 + 3 = 5.</s>\n\n### User:\nAnd times 4?\n\n### Response:\n"
        "5 * 4 = 20.</s>",
        ["2 + 3 = 5.", "</s>", "5 * 4 = 20.", "</s>"],
    ),
    (
        "orca",
        WITH_SYSTEM,
        "<s>### System:\nBe brief.\n\n### User:\nWhat is 2 + 3?\n\n### Response:\n2 + 3 = 5.</s>",
        ["2 + 3 = 5.", "</s>"],
    ),
    (
        "lima",
        TWO_TURNS,
        "<s>What is 2 + 3?<|eot|>2 + 3 = 5.<|eot|>And times 4?<|eot|>5 * 4 = 20.<|eot|>",
        ["2 + 3 = 5.", "<|eot|>", "5 * 4 = 20.", "<|eot|>"],
    ),
    (
        "lima",
        WITH_SYSTEM,
        "<s>Be brief.<|eot|>What is 2 + 3?<|eot|>2 + 3 = 5.<|eot|>",
        ["2 + 3 = 5.", "<|eot|>"],
    ),
    (
        "gpt4all",
        TWO_TURNS,
        "<s>What is 2 + 3?\n2 + 3 = 5.</s>And times 4?\n5 * 4 = 20.</s>",
        ["2 + 3 = 5.", "</s>", "5 * 4 = 20.", "</s>"],
    ),
    (
        "plain",
        WITH_SYSTEM,
        "<s>Be brief.\n\nWhat is 2 + 3?\n\n2 + 3 = 5.</s>",
        ["2 + 3 = 5.", "</s>"],
    ),
]


@pytest.mark.parametrize("template, conversation, expected, responses", PINNED)
def test_builtin_templates_render_the_recipe_strings(template, conversation, expected, responses):
    segments = render(conversation, template, TOKENS)
    assert render_text(segments) == expected
    assert [s.text for s in segments if s.response] == responses


def test_response_turn_indices_count_assistant_turns():
    segments = render(TWO_TURNS, "vicuna_v1.1", TOKENS)
    assert [(s.text, s.turn) for s in segments if s.response] == [
        (" 2 + 3 = 5.", 0), ("</s>", 0), (" 5 * 4 = 20.", 1), ("</s>", 1)
    ]


def test_system_message_config_overrides_default_and_empty_removes_it():
    single = Conversation(TWO_TURNS.messages[:2], "t")
    assert render_text(render(single, "vicuna_v1.1", TOKENS, system_message="Hi.")).startswith("<s>Hi. USER:")
    assert render_text(render(single, "vicuna_v1.1", TOKENS, system_message="")).startswith("<s>USER:")
    assert render_text(render(single, "alpaca", TOKENS, system_message="")).startswith("<s>### Instruction:")


def test_no_bos_when_tokenizer_has_none():
    tokens = SpecialTokens(bos=None, eos="</s>", eot="<|eot|>")
    assert render_text(render(TWO_TURNS, "gpt4all", tokens)).startswith("What is 2 + 3?\n")


def test_prompt_renders_up_to_the_assistant_header():
    prompt = Prompt((Message("user", "What is 2 + 3?"),), None, "t")
    assert render_text(render(prompt, "vicuna_v1.1", TOKENS)) == f"<s>{VICUNA} USER: What is 2 + 3? ASSISTANT:"
    assert render_text(render(prompt, "llama2_chat", TOKENS)) == "<s>[INST] What is 2 + 3? [/INST]"
    assert not any(s.response for s in render(prompt, "chatml", TOKENS))


def test_text_is_trained_whole():
    segments = render(Text("hello world", "t"), "alpaca", TOKENS)
    assert render_text(segments) == "<s>hello world</s>"
    assert [s.response for s in segments] == [False, True, True]


def test_pair_trains_only_the_continuation():
    pair = PreferencePair(
        TWO_TURNS.messages[:3], (Message("assistant", "20."),), (Message("assistant", "21."),), 1, 0, "t"
    )
    chosen, rejected = render_pair(pair, "vicuna_v1.1", TOKENS)
    assert [s.text for s in chosen if s.response] == [" 20.", "</s>"]
    assert [s.text for s in rejected if s.response] == [" 21.", "</s>"]
    assert render_text(chosen).endswith("ASSISTANT: 2 + 3 = 5.</s>USER: And times 4? ASSISTANT: 20.</s>")


def test_unknown_template_is_an_error():
    with pytest.raises(JaxalignError, match="unknown template 'zephyr'"):
        render(TWO_TURNS, "zephyr", TOKENS)


def _tokens_for(tok):
    return SpecialTokens(bos=tok.bos_token, eos=tok.eos_token, eot="<|eot|>")


@pytest.fixture(scope="module")
def sp_with_eot(sp_tok):
    tok = sp_tok.__class__.from_pretrained(sp_tok.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    return tok


@pytest.fixture(scope="module")
def sp_encoder(sp_with_eot):
    return SegmentEncoder(sp_with_eot)


@pytest.fixture(scope="module")
def smol_encoder(smol_tok):
    return SegmentEncoder(smol_tok)


@pytest.mark.parametrize("template", [t for t, *_ in PINNED])
def test_sentencepiece_segment_tokens_equal_whole_string_tokens(sp_with_eot, sp_encoder, template):
    """Whole string = what `tokenizer(text)` gives for each bos-led piece (LLaMA-2-chat encodes turn by turn)."""
    conversation = next(c for t, c, *_ in PINNED if t == template)
    segments = render(conversation, template, _tokens_for(sp_with_eot))
    ids = tokenize_segments([segments], sp_encoder)[0].ids.tolist()
    whole = []
    for turn in render_text(segments).split("<s>")[1:]:
        whole += [sp_with_eot.bos_token_id] + sp_with_eot.encode(turn, add_special_tokens=False)
    assert ids == whole


@pytest.mark.parametrize("template", [t for t, *_ in PINNED if t != "plain"])
def test_byte_level_bpe_segment_tokens_equal_whole_string_tokens(smol_tok, smol_encoder, template):
    conversation = next(c for t, c, *_ in PINNED if t == template)
    segments = render(conversation, template, SpecialTokens(bos=None, eos=smol_tok.eos_token, eot="<|eot|>"))
    if template == "lima":
        segments = [s for s in segments if not s.special]
    ids = tokenize_segments([segments], smol_encoder)[0].ids.tolist()
    assert ids == smol_tok.backend_tokenizer.encode(render_text(segments), add_special_tokens=False).ids


def test_byte_level_bpe_plain_template_boundary_after_blank_line(smol_tok):
    """The documented exception: the prompt's trailing "\\n\\n" is one token on its own; the text is the same."""
    segments = render(WITH_SYSTEM, "plain", SpecialTokens(bos=None, eos=smol_tok.eos_token, eot="<|eot|>"))
    tokens = tokenize_segments([segments], SegmentEncoder(smol_tok))[0]
    assert smol_tok.decode(tokens.ids.tolist()) == render_text(segments)
    response = tokens.ids[tokens.response].tolist()
    assert response == smol_tok.encode("2 + 3 = 5.", add_special_tokens=False) + [smol_tok.eos_token_id]


def test_sentencepiece_trained_tokens_are_the_answer_tokens(sp_with_eot, sp_encoder):
    segments = render(TWO_TURNS, "vicuna_v1.1", _tokens_for(sp_with_eot))
    tokens = tokenize_segments([segments], sp_encoder)[0]
    pieces = sp_with_eot.convert_ids_to_tokens(tokens.ids[tokens.response].tolist())
    assert pieces == ["▁", "2", "▁+", "▁", "3", "▁=", "▁", "5", ".", "</s>", "▁", "5", "▁*", "▁", "4", "▁=", "▁", "2",
                      "0", ".", "</s>"]


def test_tokenizer_chat_template_segments(smol_tok):
    segments = render(WITH_SYSTEM, "tokenizer", _tokens_for(smol_tok), tokenizer=smol_tok)
    assert render_text(segments) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n"
    )
    assert [s.text for s in segments if s.response] == ["2 + 3 = 5.<|im_end|>\n"]
    ids = tokenize_segments([segments], SegmentEncoder(smol_tok))[0].ids.tolist()
    assert ids == smol_tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in WITH_SYSTEM.messages], tokenize=True, return_dict=False
    )


def test_tokenizer_chat_template_default_system_is_prompt(smol_tok):
    segments = render(TWO_TURNS, "tokenizer", _tokens_for(smol_tok), tokenizer=smol_tok)
    assert "You are a helpful AI assistant named SmolLM" in segments[0].text and not segments[0].response
    assert [s.text for s in segments if s.response] == ["2 + 3 = 5.<|im_end|>\n", "5 * 4 = 20.<|im_end|>\n"]
    assert [s.turn for s in segments if s.response] == [0, 1]


def test_byte_tokenizer_chat_template(byte_tok):
    segments = render(WITH_SYSTEM, "tokenizer", _tokens_for(byte_tok), tokenizer=byte_tok)
    assert render_text(segments) == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n"
    )


def test_tokenizer_template_without_chat_template_is_an_error(sp_tok):
    with pytest.raises(JaxalignError, match="no chat_template"):
        render(TWO_TURNS, "tokenizer", _tokens_for(sp_tok), tokenizer=sp_tok)


@pytest.fixture(scope="module")
def smol_with_eot(smol_tok):
    from jaxalign.data import load_tokenizer

    tok = load_tokenizer(smol_tok.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    return tok, SegmentEncoder(tok)


def _spans(segments) -> list[str]:
    """Texts of the maximal runs of consecutive response segments."""
    spans, current = [], ""
    for segment in segments:
        if segment.response:
            current += segment.text
        elif current:
            spans.append(current)
            current = ""
    return spans + ([current] if current else [])


@pytest.mark.parametrize("template, conversation, expected, responses", PINNED)
def test_trained_token_runs_decode_to_exactly_the_response_spans(smol_with_eot, template, conversation, expected,
                                                                 responses):
    tok, encoder = smol_with_eot
    segments = render(conversation, template, SpecialTokens(bos="<|im_start|>", eos="<|im_end|>", eot="<|eot|>"))
    tokens = tokenize_segments([segments], encoder)[0]
    runs, start = [], None
    for j, flag in enumerate(list(tokens.response) + [False]):
        if flag and start is None:
            start = j
        elif not flag and start is not None:
            runs.append(tok.decode(tokens.ids[start:j].tolist()))
            start = None
    assert runs == _spans(segments)
    first = int(np.argmax(tokens.response))
    assert tok.decode(tokens.ids[:first].tolist()) == "".join(
        s.text for s in segments[: next(i for i, s in enumerate(segments) if s.response)]
    )
