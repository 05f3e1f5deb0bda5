"""Tokenizers for the data pipeline: the built-in byte tokenizer, loading by name, chat prompts for generation,
and the encoding of rendered examples.

A rendered example is a list of segments (see `templates.py`). Its token ids are the tokenizer's ids of the whole
rendered string (`tokenizer(text, add_special_tokens=False)`, what transformers' `apply_chat_template` and
inference servers produce), and each token belongs to the segment its characters come from, by the tokenizer's
character offsets. So training sees exactly the ids the model is prompted with, whatever the tokenizer does at
segment boundaries (SentencePiece's "▁" after a special token, byte-level BPE's whitespace runs). A token that
spans a prompt and a response segment counts as response, so no character of an answer goes untrained; the
built-in templates put their boundaries where the tokenizers split anyway (tests check this for byte-level BPE,
SentencePiece and the byte tokenizer). One merge is the tokenizer's own and cannot be split: byte-level BPE encodes
the `plain` template's "\n\n" before an answer as two tokens, but as one at the end of a generation prompt.
"""

import json

import numpy as np

from jaxalign import storage
from jaxalign.errors import JaxalignError

BYTE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|eot|>", "[PAD]")

BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer built in code (no download): 8 special tokens then the 256 bytes; vocab 264.

    ids: 0 `<pad>`, 1 `<s>` (bos), 2 `</s>` (eos), 3 `<unk>`, 4 `<|im_start|>`, 5 `<|im_end|>`, 6 `<|eot|>`,
    7 `[PAD]`, then byte b at 8 + b. Its chat template is ChatML with a leading bos.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of_char()[c])
    vocab = {token: i for i, token in enumerate(BYTE_SPECIAL_TOKENS)}
    vocab.update({char: len(BYTE_SPECIAL_TOKENS) + i for i, char in enumerate(byte_chars)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(BYTE_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=list(BYTE_SPECIAL_TOKENS[4:]),
        chat_template=BYTE_CHAT_TEMPLATE,
        model_max_length=1 << 30,
    )


def _byte_of_char() -> dict[str, int]:
    """The GPT-2 byte-to-unicode table, inverted: printable stand-in character -> byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def load_tokenizer(spec: str):
    """`byte` -> the built-in byte tokenizer; otherwise a local HF folder (tokenizer.json / tokenizer.model)."""
    if spec == "byte":
        return byte_tokenizer()
    path = storage.local_folder(spec, weights=False)
    if not path.is_dir():
        raise JaxalignError(f"tokenizer {spec!r}: not 'byte' and not a folder (expected a Hugging Face model folder)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise JaxalignError(f"tokenizer {spec}: could not load a tokenizer from this folder: {err}") from None


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` (`{"role", "content"}` dicts) rendered by the tokenizer's chat template, ending with
    the assistant's turn opener. Raises `JaxalignError` when the tokenizer has no chat template."""
    if not has_chat_template(tokenizer):
        raise JaxalignError("the tokenizer has no chat template (tokenizer_config.json 'chat_template')")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def stop_token_ids(config, tokenizer) -> tuple[int, ...]:
    """The model config's EOS ids and the tokenizer's EOS (a chat model's end-of-turn token), without repeats."""
    eos = config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


class SegmentEncoder:
    """Encodes rendered texts as whole strings, in batches, with each token's character span.

    Offsets come from a copy of the tokenizer's backend (as it is when the encoder is made: add tokens first)
    without its post-processor, truncation or padding: with no special tokens added a post-processor changes only
    offsets (byte-level BPE trims whitespace from them), never ids.
    """

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise JaxalignError(
                f"tokenizer {type(tokenizer).__name__} has no `tokenizers` backend, which the data pipeline needs "
                "for token offsets; load it with transformers' AutoTokenizer from a folder with tokenizer.json"
            )
        from tokenizers import Tokenizer

        self.tokenizer = tokenizer
        self._backend = Tokenizer.from_str(backend.to_str())
        self._backend.post_processor = None
        self._backend.no_truncation()
        self._backend.no_padding()
        self._special_ids: dict[str, int] = {}

    def special_id(self, token: str) -> int:
        """The id of special token string `token`; an error naming the config keys when it is not in the vocab."""
        if token not in self._special_ids:
            vocab = self.tokenizer.get_vocab()
            if token not in vocab:
                raise JaxalignError(
                    f"token {token!r} is not in the tokenizer's vocabulary; list it in config key 'data.added_tokens' "
                    "(or data.eot_token / data.pad_token) so it is added and the embeddings resized"
                )
            self._special_ids[token] = vocab[token]
        return self._special_ids[token]

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """`(ids [n] int32, offsets [n, 2] int64)` per text: the ids `tokenizer(text, add_special_tokens=False)`
        gives, and each token's `[start, end)` character span in the text."""
        encodings = self._backend.encode_batch(texts, add_special_tokens=False)
        return [
            (np.asarray(e.ids, np.int32), np.asarray(e.offsets, np.int64).reshape(-1, 2)) for e in encodings
        ]
