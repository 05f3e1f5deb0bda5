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
def model_dir(smollm2_dir, tmp_path_factory):
    """A tiny random LLaMA (weights large enough that replies depend on the prompt) with SmolLM2's tokenizer and
    chat template, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny_chat_model")
    tokenizer = load_tokenizer(smollm2_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def chat(model_dir, monkeypatch, capsys, stdin_text, *extra):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    code = main(["chat", "--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "6", *extra])
    return code, capsys.readouterr().out


def test_multi_turn_chat_streams_replies_that_continue_the_conversation(model_dir, monkeypatch, capsys):
    import jaxalign
    from jaxalign.commands.generate import encode_chat

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
