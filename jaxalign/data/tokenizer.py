"""Tokenizers for the data pipeline: the built-in byte tokenizer, loading by name, chat prompts for generation,
and segment-wise encoding.

Segment-wise encoding: a rendered example is a list of segments (see `templates.py`); each text segment is
tokenised on its own and the ids are concatenated, so every token belongs to exactly one segment and the loss
mask never depends on re-tokenising substrings. Two tokenizer details make this match tokenising the whole text:

- SentencePiece-style tokenizers (Llama 1/2, Mistral) prepend a "▁" (a space) to the start of the text they
  encode. The first text of an example (and text right after a bos, as in LLaMA-2-chat's per-turn `<s>[INST]`)
  is encoded as the start of a text, as `tokenizer(text)` with its bos does; a text segment that continues text
  is encoded with the prepend turned off, so a segment " answer" becomes "▁answer" exactly as inside the whole
  string; text after another special token (eos, eot) is encoded as the tokenizer encodes it after that token
  inside a string (transformers conversions differ on whether a "▁" is prepended there).
- BPE merges never cross a segment boundary. The built-in templates put boundaries before a space or after a
  newline / special token, where byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) and SentencePiece pre-tokenisation
  split anyway; tests check segment-wise ids equal whole-string ids for each template. Where they can differ the
  difference is deliberate, the trained tokens being exactly the response's own tokens: a boundary inside a word
  (a response glued to the prompt), or after a run of whitespace with byte-level BPE (the `plain` template's
  "{prompt}\n\n" is one "\n\n" token on its own, two "\n" tokens before a word inside the whole string).
"""

import json
from pathlib import Path

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
    path = Path(spec)
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


START = "start"
CONTINUE = "continue"


class SegmentEncoder:
    """Encodes the text segments of examples, in batches, without special tokens being added.

    Each text has a context: `START` (the example's first text, or text after its bos: encoded as the start of a
    text, as `tokenizer(text)` would), `CONTINUE` (text right after text: no "▁" prepended), or the string of the
    special token it follows (encoded as the tokenizer encodes text after that token inside a string).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._start = backend
        self._continuation = _without_prefix_space(backend) if backend is not None else None
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

    def encode(self, texts: list[str], contexts: list[str]) -> list[list[int]]:
        if self._start is None:
            return [self.tokenizer.encode(t, add_special_tokens=False) if t else [] for t in texts]
        out: list[list[int]] = [[] for _ in texts]
        groups: dict[str, list[int]] = {}
        for i, (text, context) in enumerate(zip(texts, contexts)):
            if text:
                groups.setdefault(context, []).append(i)
        for context, chosen in groups.items():
            if context == CONTINUE:
                encodings = self._continuation.encode_batch([texts[i] for i in chosen], add_special_tokens=False)
                ids = [e.ids for e in encodings]
            elif context == START:
                ids = [e.ids for e in self._start.encode_batch([texts[i] for i in chosen], add_special_tokens=False)]
            else:
                ids = self._after_special(context, [texts[i] for i in chosen])
            for i, row in zip(chosen, ids):
                out[i] = row
        return out

    def _after_special(self, token: str, texts: list[str]) -> list[list[int]]:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        encodings = self._start.encode_batch([token + t for t in texts], add_special_tokens=False)
        rows = [e.ids for e in encodings]
        if all(row[:1] == [token_id] for row in rows):
            return [row[1:] for row in rows]
        return [e.ids for e in self._start.encode_batch(texts, add_special_tokens=False)]


def _without_prefix_space(backend):
    """A copy of a `tokenizers.Tokenizer` that never prepends a space: Metaspace's "▁" prepend, a start-anchored
    normaliser (legacy `Prepend("▁")`), or byte-level `add_prefix_space` (GPT-2 style "Ġ")."""
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    changed = _drop_prepend(data.get("pre_tokenizer"), "pre") | _drop_prepend(data.get("normalizer"), "norm")
    if not changed:
        return backend
    return Tokenizer.from_str(json.dumps(data))


def _drop_prepend(node, kind: str) -> bool:
    if not isinstance(node, dict):
        return False
    if node.get("type") == "Sequence":
        items = node.get("pretokenizers" if kind == "pre" else "normalizers") or []
        changed = False
        for item in list(items):
            if kind == "norm" and _is_start_rule(item):
                items.remove(item)
                changed = True
            else:
                changed |= _drop_prepend(item, kind)
        return changed
    if kind == "norm" and _is_start_rule(node):
        node.clear()
        node.update({"type": "Sequence", "normalizers": []})
        return True
    if kind == "pre" and node.get("type") == "Metaspace":
        if node.get("prepend_scheme", "always") != "never" or node.get("add_prefix_space"):
            node["prepend_scheme"] = "never"
            node.pop("add_prefix_space", None)
            return True
    if kind == "pre" and node.get("type") == "ByteLevel" and node.get("add_prefix_space"):
        node["add_prefix_space"] = False
        return True
    return False


def _is_start_rule(node) -> bool:
    """A normaliser that only acts at the start of the text: `Prepend("▁")`, or `Replace(Regex("\\A..."))`."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == "Prepend":
        return True
    pattern = node.get("pattern") or {}
    return node.get("type") == "Replace" and str(pattern.get("Regex", "")).startswith("\\A")
