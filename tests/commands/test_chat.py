"""`jaxalign chat`: multi-turn conversation over piped stdin, streamed replies, /reset and /exit."""

import io
import sys

import pytest

from jaxalign.cli import main
from jaxalign.commands.chat import TextStream
from jaxalign.hf import load_tokenizer
from jaxalign.sampling import generate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tiny_chat_model):
    return tiny_chat_model(256)


def chat(model_dir, monkeypatch, capsys, stdin_text, *extra):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    code = main(["chat", "--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "6", *extra])
    return code, capsys.readouterr().out


def test_multi_turn_chat_streams_replies_that_continue_the_conversation(model_dir, monkeypatch, capsys):
    import jaxalign
    from jaxalign.data.tokenizer import encode_chat

    code, out = chat(model_dir, monkeypatch, capsys, "Hi\n/help\nTell me more\n/reset\nHi\n/exit\nnever read\n",
                     "--system", "Be brief.")
    assert code == 0
    turns = out.split("assistant> ")[1:]
    assert len(turns) == 3
    assert "unknown command /help" in turns[0] and "(new conversation)" in turns[1]

    tokenizer = load_tokenizer(model_dir)
    model, params = jaxalign.load_pretrained(model_dir)

    def reply_to(messages):
        prompt = encode_chat(tokenizer, messages)
        result = generate(model, params, [prompt], 6, stop_token_ids=(tokenizer.eos_token_id,))
        return tokenizer.decode(result.completions()[0], skip_special_tokens=True)

    system = {"role": "system", "content": "Be brief."}
    first = reply_to([system, {"role": "user", "content": "Hi"}])
    second = reply_to([system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                       {"role": "user", "content": "Tell me more"}])
    assert first != second
    for turn, reply in zip(turns, [first, second, first]):
        assert turn.startswith(reply + "\n")


def test_chat_ends_at_end_of_input(model_dir, monkeypatch, capsys):
    code, out = chat(model_dir, monkeypatch, capsys, "")
    assert code == 0 and "assistant>" not in out


def test_text_stream_prints_only_complete_characters():
    class ByteTokenizer:
        def decode(self, tokens, skip_special_tokens=True):
            return bytes(tokens).decode("utf-8", errors="replace")

    out = io.StringIO()
    stream = TextStream(ByteTokenizer(), stop_ids=(0,), out=out)
    stream.start()
    printed = []
    for byte in "hé🙂".encode():
        stream([byte], [True])
        printed.append(out.getvalue())
    stream([0], [True])
    stream([65], [False])
    assert printed == ["h", "h", "hé", "hé", "hé", "hé", "hé🙂"]
    assert out.getvalue() == "hé🙂"


def test_the_quickstart_model_chats_in_alpaca_with_the_default_reply_length(quickstart_run, monkeypatch, capsys):
    """Default --max-new-tokens (512) on a 320-position model: every turn gets a reply that fits what the context
    leaves, prompted in Alpaca as the model was trained; a conversation that fills the context asks for /reset."""
    import jaxalign
    from jaxalign.data.tokenizer import encode_chat

    quickstart_model = quickstart_run[0] / "hf"

    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a colour.\nAnother one.\n/reset\nName a colour.\n"))
    assert main(["chat", "--model", str(quickstart_model), "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "error" not in out
    turns = out.split("assistant> ")[1:]

    tokenizer = load_tokenizer(quickstart_model)
    model, params = jaxalign.load_pretrained(quickstart_model)
    assert model.config.max_position_embeddings == 320
    messages = [{"role": "user", "content": "Name a colour."}]
    prompt = encode_chat(tokenizer, messages)
    assert tokenizer.decode(prompt) == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    first = generate(model, params, [prompt], min(512, 320 - len(prompt)), stop_token_ids=(2,))
    reply = tokenizer.decode(first.completions()[0], skip_special_tokens=True)
    assert turns[0].startswith(reply + "\n")
    second = encode_chat(tokenizer, messages + [{"role": "assistant", "content": reply},
                                                {"role": "user", "content": "Another one."}])
    if len(second) < 320:
        assert len(turns) == 3
    else:
        assert len(turns) == 2 and "fills the model's context of 320 positions; /reset" in out
    assert turns[-1].startswith(reply + "\n")


def test_builtin_template_and_plain_text_options(model_dir, monkeypatch, capsys):
    import jaxalign

    from jaxalign.data.formats import Message, Prompt
    from jaxalign.data.masking import tokenize_segments
    from jaxalign.data.templates import render, special_tokens
    from jaxalign.data.tokenizer import SegmentEncoder

    tokenizer = load_tokenizer(model_dir)
    model, params = jaxalign.load_pretrained(model_dir)

    def reply_to(prompt):
        result = generate(model, params, [prompt], 6, stop_token_ids=(tokenizer.eos_token_id,))
        return tokenizer.decode(result.completions()[0], skip_special_tokens=True)

    _, out = chat(model_dir, monkeypatch, capsys, "Hi\n", "--template", "koala")
    segments = render(Prompt((Message("user", "Hi"),), None, "t"), "koala", special_tokens(tokenizer, True, "<|eot|>"))
    prompt = tokenize_segments([segments], SegmentEncoder(tokenizer))[0].ids.tolist()
    assert tokenizer.decode(prompt) == "<|im_start|>BEGINNING OF CONVERSATION: USER: Hi GPT:"
    assert out.split("assistant> ")[1].startswith(reply_to(prompt) + "\n")

    _, out = chat(model_dir, monkeypatch, capsys, "Hi\n", "--no-chat-template")
    assert out.split("assistant> ")[1].startswith(reply_to(tokenizer("Hi\n")["input_ids"]) + "\n")

    code = main(["chat", "--model", str(model_dir), "--template", "lima"])
    assert code == 2 and "the tokenizer has no token '<|eot|>'" in capsys.readouterr().err
