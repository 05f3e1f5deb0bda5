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
