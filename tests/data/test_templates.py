import copy

import pytest

from jaxalign.data.formats import Conversation, Message, PreferencePair, Prompt, Text
from jaxalign.data.masking import tokenize_segments
from jaxalign.data.templates import (
    TEMPLATES,
    SpecialTokens,
    chat_template,
    end_of_turn,
    render,
    render_pair,
    render_text,
    special_tokens,
)
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
        ["2 + 3 = 5.", "<|im_end|>"],
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


def test_tokenizer_chat_template_segments(smol_tok):
    segments = render(WITH_SYSTEM, "tokenizer", _tokens_for(smol_tok), tokenizer=smol_tok)
    assert render_text(segments) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n"
    )
    assert [s.text for s in segments if s.response] == ["2 + 3 = 5.<|im_end|>"]
    ids = tokenize_segments([segments], SegmentEncoder(smol_tok))[0].ids.tolist()
    assert ids == smol_tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in WITH_SYSTEM.messages], tokenize=True, return_dict=False
    )


def test_tokenizer_chat_template_default_system_is_prompt(smol_tok):
    segments = render(TWO_TURNS, "tokenizer", _tokens_for(smol_tok), tokenizer=smol_tok)
    assert "You are a helpful AI assistant named SmolLM" in segments[0].text and not segments[0].response
    assert [s.text for s in segments if s.response] == ["2 + 3 = 5.<|im_end|>", "5 * 4 = 20.<|im_end|>"]
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


MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
MULTI_TURN = Conversation(
    (
        Message("system", "You answer in  two spaces.\n"),
        Message("user", "Héllo 🙂, what's 12*12?\nThink."),
        Message("assistant", " 144, I think.\n\nDone!"),
        Message("user", "Now: list [a, b]", "context line"),
        Message("assistant", "- a\n- b"),
        Message("user", "Bye"),
        Message("assistant", "Bye."),
    ),
    "test:4",
)
CONVERSATIONS = [TWO_TURNS, WITH_SYSTEM, WITH_INPUT, MULTI_TURN]


@pytest.fixture(scope="module", params=["byte", "smollm2", "sentencepiece"])
def any_tok(request):
    """Each tokenizer the tests have, loaded as `data.tokenizer` loads it, with the tokens the templates need
    added (as `data.added_tokens` does) and a chat template for `data.template: tokenizer`."""
    from jaxalign.data import load_tokenizer

    if request.param == "byte":
        return load_tokenizer("byte")
    if request.param == "smollm2":
        tok = load_tokenizer(str(request.getfixturevalue("smollm2_dir")))
    else:
        tok = load_tokenizer(str(request.getfixturevalue("sp_tokenizer_dir")))
        tok.chat_template = MISTRAL_TEMPLATE
    tok.add_special_tokens({"additional_special_tokens": ["<|eot|>", "<|im_start|>", "<|im_end|>"]},
                           replace_extra_special_tokens=False)
    return tok


@pytest.fixture(scope="module")
def any_encoder(any_tok):
    """A `SegmentEncoder` of `any_tok` (building one copies the tokenizer's backend)."""
    return SegmentEncoder(any_tok)


def _response_spans(segments) -> list[tuple[int, int]]:
    """`[start, end)` character spans of the maximal runs of response segments in the rendered text."""
    spans, position = [], 0
    for segment in segments:
        end = position + len(segment.text)
        if segment.response and spans and spans[-1][1] == position:
            spans[-1] = (spans[-1][0], end)
        elif segment.response:
            spans.append((position, end))
        position = end
    return spans


def _token_spans(tokens, offsets) -> list[tuple[int, int]]:
    """`[start, end)` character spans covered by the maximal runs of response tokens."""
    spans, previous = [], False
    for flag, (start, end) in zip(tokens.response.tolist(), offsets.tolist()):
        if flag and previous:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        elif flag:
            spans.append((start, end))
        previous = flag
    return spans


def _one_token_crosses(offsets, first: int, boundary: int) -> bool:
    """Whether one token covers characters `first..boundary` (a prompt end merged with the answer's start)."""
    return any(start <= first and boundary < end for start, end in offsets.tolist())


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=lambda c: c.origin)
def test_ids_are_the_whole_string_ids_and_trained_spans_are_exactly_the_answers(any_tok, any_encoder, template,
                                                                              conversation, request):
    """For every template and tokenizer: segment-wise ids = the tokenizer's ids of the rendered string; each run
    of trained tokens covers exactly one answer (its text and its end-of-turn token, nothing of the prompt); the
    exported chat template gives the same ids through transformers for the dialogue and for its prompt; the
    prompt's ids start the dialogue's, except where byte-level BPE merges the `plain` prompt's final blank line
    ("\n\n" one token at the end of a prompt, two before the answer)."""
    tokens = special_tokens(any_tok, True, "<|eot|>")
    encoder = any_encoder
    segments = render(conversation, template, tokens, tokenizer=any_tok)
    text = render_text(segments)
    result = tokenize_segments([segments], encoder)[0]
    assert result.ids.tolist() == any_tok(text, add_special_tokens=False)["input_ids"]

    spans = _response_spans(segments)
    offsets = encoder.encode([text])[0][1]
    trained = _token_spans(result, offsets)
    assert [end for _, end in trained] == [end for _, end in spans]
    for (trained_start, _), (start, _) in zip(trained, spans):
        assert trained_start == start or _one_token_crosses(offsets, trained_start, start), text[trained_start:start]
    answers = [m.content for m in conversation.messages if m.role == "assistant"]
    assert len(spans) == len(answers)
    for (start, end), answer in zip(spans, answers):
        assert text[start:end].endswith(end_of_turn(template, tokens, any_tok))
        assert answer.strip() in text[start:end]

    prompt = Prompt(conversation.messages[:-1], None, "t")
    prompt_ids = tokenize_segments([render(prompt, template, tokens, tokenizer=any_tok)], encoder)[0].ids.tolist()
    blank_line_merged = template == "plain" and request.node.callspec.params["any_tok"] == "smollm2"
    assert (result.ids.tolist()[: len(prompt_ids)] == prompt_ids) != blank_line_merged
    if template == "tokenizer":
        return
    exported = chat_template(template, tokens)
    messages = [{"role": m.role, "content": m.content, **({"context": m.context} if m.context else {})}
                for m in conversation.messages]
    assert any_tok.apply_chat_template(messages, chat_template=exported, tokenize=True,
                                       return_dict=False) == result.ids.tolist()
    assert any_tok.apply_chat_template(messages[:-1], chat_template=exported, tokenize=True,
                                       add_generation_prompt=True, return_dict=False) == prompt_ids


def test_a_token_across_the_prompt_and_the_answer_is_trained(smol_tok):
    """Koala glues the answer to "GPT:"; byte-level BPE merges ":-" for an answer starting with "-". The token is
    trained (no character of the answer goes untrained) and the ids stay those of the whole string."""
    conversation = Conversation((Message("user", "List"), Message("assistant", "- a")), "t")
    segments = render(conversation, "koala", special_tokens(smol_tok, False, "<|eot|>"))
    result = tokenize_segments([segments], SegmentEncoder(smol_tok))[0]
    trained = smol_tok.convert_ids_to_tokens(result.ids[result.response].tolist())
    assert trained == [":-", "Ġa", "<|im_end|>"]


def test_a_bos_that_the_template_opens_with_is_not_doubled(smol_tok):
    assert smol_tok.bos_token == "<|im_start|>"
    segments = render(TWO_TURNS, "chatml", special_tokens(smol_tok, True, "<|eot|>"))
    ids = tokenize_segments([segments], SegmentEncoder(smol_tok))[0].ids.tolist()
    assert ids[:3] == [1, 4093, 198]
    exported = copy.copy(smol_tok)
    exported.chat_template = chat_template("chatml", special_tokens(smol_tok, True, "<|eot|>"))
    assert exported.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, return_dict=False)[:2] == [
        1, 4093]


def test_sentencepiece_answer_after_a_special_token_keeps_its_prefix_space(sp_tokenizer_dir):
    """mistral-common's tokenizer.model.v1 as `data.tokenizer` loads it, [INST] / [/INST] added as special tokens,
    a Mistral-style chat template: the answer right after [/INST] is trained as the model is prompted, `▁Four`."""
    from jaxalign.data import load_tokenizer

    tok = load_tokenizer(str(sp_tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]}, replace_extra_special_tokens=False)
    tok.chat_template = MISTRAL_TEMPLATE
    conversation = Conversation((Message("user", "What is 2 + 2?"), Message("assistant", "Four"),
                                 Message("user", "And 3 + 3?"), Message("assistant", "Six")), "t")
    segments = render(conversation, "tokenizer", special_tokens(tok, True, "<|eot|>"), tokenizer=tok)
    result = tokenize_segments([segments], SegmentEncoder(tok))[0]
    messages = [{"role": m.role, "content": m.content} for m in conversation.messages]
    assert result.ids.tolist() == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert tok.convert_ids_to_tokens(result.ids[result.response].tolist()) == ["▁Four", "</s>", "▁Six", "</s>"]


def test_end_of_turn_of_a_tokenizer_chat_template(byte_tok, smol_tok, sp_tok):
    assert end_of_turn("tokenizer", special_tokens(byte_tok, True, "<|eot|>"), byte_tok) == "<|im_end|>"
    assert end_of_turn("tokenizer", special_tokens(smol_tok, True, "<|eot|>"), smol_tok) == "<|im_end|>"
    for template in (MISTRAL_TEMPLATE, None, "{{ raise_exception('roles must alternate') }}"):
        tok = copy.copy(sp_tok)
        tok.chat_template = template
        assert end_of_turn("tokenizer", special_tokens(tok, True, "<|eot|>"), tok) == "</s>"
