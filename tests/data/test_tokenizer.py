import pytest

from jaxalign.data.tokenizer import (
    BYTE_SPECIAL_TOKENS,
    SegmentEncoder,
    byte_tokenizer,
    encode_chat,
    load_tokenizer,
    stop_token_ids,
)
from jaxalign.errors import JaxalignError
from jaxalign.models.llama import LlamaConfig


def test_byte_tokenizer_layout_and_round_trip():
    tok = byte_tokenizer()
    assert len(tok) == 264
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(list(BYTE_SPECIAL_TOKENS)) == list(range(8))
    text = "Héllo, wörld! 日本 <|im_end|>\n\t"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.encode("A", add_special_tokens=False) == [8 + ord("A")]
    assert ids[-3] == tok.convert_tokens_to_ids("<|im_end|>")
    assert len(tok.encode("日", add_special_tokens=False)) == 3


def test_byte_tokenizer_is_deterministic():
    assert byte_tokenizer().get_vocab() == byte_tokenizer().get_vocab()


def test_load_tokenizer(smollm2_dir, tmp_path):
    assert len(load_tokenizer("byte")) == 264
    assert load_tokenizer(str(smollm2_dir)).eos_token == "<|im_end|>"
    with pytest.raises(JaxalignError, match="not 'byte' and not a folder"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(JaxalignError, match="could not load a tokenizer"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("name", ["byte", "sp", "smol"])
def test_encoder_gives_the_tokenizers_ids_and_untrimmed_offsets(name, byte_tok, sp_tok, smol_tok):
    tok = {"byte": byte_tok, "sp": sp_tok, "smol": smol_tok}[name]
    texts = ["<s>[INST] Hi [/INST] Four </s>", "</s>USER: 2 + 3\n\n5", " lead\n\n\ntrail  ", ""]
    for text, (ids, offsets) in zip(texts, SegmentEncoder(tok).encode(texts)):
        assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
        assert offsets.shape == (ids.size, 2)
        assert (offsets[1:, 0] >= offsets[:-1, 1]).all()
        covered = "".join(text[a:b] for a, b in offsets.tolist())
        assert covered == text


def test_encoder_ignores_truncation_and_padding_stored_in_the_tokenizer(byte_tok):
    from transformers import PreTrainedTokenizerFast

    backend = byte_tok.backend_tokenizer.__class__.from_str(byte_tok.backend_tokenizer.to_str())
    backend.enable_truncation(max_length=4)
    backend.enable_padding(length=16)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    ((ids, offsets),) = SegmentEncoder(tok).encode(["hello world"])
    assert ids.tolist() == [8 + b for b in b"hello world"]
    assert offsets.tolist()[-1] == [10, 11]


def test_byte_tokenizer_survives_save_and_autotokenizer_load(tmp_path):
    from transformers import AutoTokenizer

    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<s>Héllo<|im_end|>\n<|eot|>[PAD]"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)


def test_chat_prompts_end_with_the_assistant_opener_and_stop_at_either_eos():
    tokenizer = byte_tokenizer()
    ids = encode_chat(tokenizer, [{"role": "user", "content": "hi"}])
    assert tokenizer.decode(ids) == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert stop_token_ids(LlamaConfig(eos_token_id=(5, 2)), tokenizer) == (5, 2)
    assert stop_token_ids(LlamaConfig(eos_token_id=None), tokenizer) == (2,)
    tokenizer.chat_template = None
    with pytest.raises(JaxalignError, match="no chat template"):
        encode_chat(tokenizer, [{"role": "user", "content": "hi"}])
