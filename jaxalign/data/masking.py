"""Segments -> token ids with a per-token `trained` flag; mask modes; truncation.

`trained[j]` says token j is a training target (the loss of predicting it from tokens < j counts). Token 0 of an
example is never predicted, whatever its flag; `packing.py` turns these flags into the batch's `loss_mask`.
"""

from dataclasses import dataclass

import numpy as np

from jaxalign.data.templates import Segment, render_text
from jaxalign.data.tokenizer import SegmentEncoder
from jaxalign.errors import JaxalignError

MASK_MODES = ("prompt", "assistant", "last_turn", "full")


@dataclass(frozen=True)
class Tokens:
    """An example's tokens: `ids` int32, `response` bool (token from a response segment), `turn` int32."""

    ids: np.ndarray
    response: np.ndarray
    turn: np.ndarray


def tokenize_segments(segment_lists: list[list[Segment]], encoder: SegmentEncoder) -> list[Tokens]:
    """Tokenises many examples at once: each example's rendered text as one string (see `SegmentEncoder`), each
    token taking `response` and `turn` from the segments its characters come from (response if any of them is
    response; a token with no characters, such as SentencePiece's "▁" before text, from the character it precedes).

    Raises `JaxalignError` when a special segment (bos, eos, end-of-turn) is not exactly one token of the
    tokenizer's vocabulary.
    """
    encoded = encoder.encode([render_text(segments) for segments in segment_lists])
    return [_assign(segments, ids, offsets, encoder) for segments, (ids, offsets) in zip(segment_lists, encoded)]


def _assign(segments: list[Segment], ids: np.ndarray, offsets: np.ndarray, encoder: SegmentEncoder) -> Tokens:
    lengths = [len(s.text) for s in segments]
    response_chars = np.repeat([s.response for s in segments], lengths)
    turn_chars = np.repeat(np.asarray([s.turn for s in segments], np.int32), lengths)
    n = response_chars.size
    if n == 0:
        return Tokens(ids, np.zeros(0, bool), np.zeros(0, np.int32))
    start = np.minimum(offsets[:, 0], n - 1)
    end = np.maximum(offsets[:, 1], start + 1)
    responses_before = np.concatenate([[0], np.cumsum(response_chars)])
    response = responses_before[end] > responses_before[start]
    last = np.minimum(end, n) - 1
    turn = np.where(response_chars[last], turn_chars[last], turn_chars[start])
    position = 0
    for segment, length in zip(segments, lengths):
        if segment.special:
            token_id = encoder.special_id(segment.text)
            hit = np.flatnonzero((offsets[:, 0] == position) & (offsets[:, 1] == position + length))
            if hit.size != 1 or ids[hit[0]] != token_id:
                raise JaxalignError(
                    f"token {segment.text!r} is not one token of the tokenizer (it is not an added or special "
                    "token); list it in config key 'data.added_tokens' so it is added and the embeddings resized"
                )
        position += length
    return Tokens(ids, response, turn.astype(np.int32))


def trained_flags(tokens: Tokens, mode: str) -> np.ndarray:
    """Which tokens are trained under mask `mode` (see `DataConfig.mask`)."""
    if mode == "full":
        return np.ones_like(tokens.response)
    if mode == "assistant":
        return tokens.response.copy()
    if mode == "last_turn":
        if not tokens.response.any():
            return tokens.response.copy()
        last = tokens.turn[tokens.response].max()
        return tokens.response & (tokens.turn == last)
    if mode == "prompt":
        flags = np.zeros_like(tokens.response)
        hits = np.flatnonzero(tokens.response)
        if hits.size:
            flags[hits[0] :] = True
        return flags
    raise JaxalignError(f"config key 'data.mask': expected one of {', '.join(MASK_MODES)}, got {mode!r}")


@dataclass(frozen=True)
class Fitted:
    """An example cut to fit: `ids`, `trained`; `truncated` if anything was cut; `dropped` with the reason."""

    ids: np.ndarray
    trained: np.ndarray
    truncated: bool
    dropped: str | None


def fit(ids: np.ndarray, trained: np.ndarray, seq_len: int, max_prompt_fraction=None, overlong="truncate") -> Fitted:
    """Cuts the prompt to `max_prompt_fraction * seq_len` (keeping its start), then the example to `seq_len`.

    Dropped (with a reason) when nothing trainable remains or, with `overlong='drop'`, when it does not fit.
    """
    truncated = False
    targets = np.flatnonzero(trained[1:]) + 1
    if targets.size == 0:
        return Fitted(ids, trained, False, "no trained tokens")
    if max_prompt_fraction is not None:
        prompt_len = int(targets[0])
        limit = max(1, int(seq_len * max_prompt_fraction))
        if prompt_len > limit:
            ids = np.concatenate([ids[:limit], ids[prompt_len:]])
            trained = np.concatenate([trained[:limit], trained[prompt_len:]])
            truncated = True
    if ids.size > seq_len:
        if overlong == "drop":
            return Fitted(ids, trained, False, "longer than seq_len")
        ids, trained = ids[:seq_len], trained[:seq_len]
        truncated = True
    if not trained[1:].any():
        return Fitted(ids, trained, truncated, "all trained tokens truncated")
    return Fitted(ids, trained, truncated, None)


def split_blocks(ids: np.ndarray, trained: np.ndarray, seq_len: int) -> list[Fitted]:
    """Consecutive blocks of at most `seq_len` tokens (long dialogues split to fit, as Vicuna's and the imitation
    study's 2048-token blocks). Blocks without a trained target are left out; none left: one dropped example."""
    blocks = []
    for start in range(0, ids.size, seq_len):
        block_ids, block_trained = ids[start : start + seq_len], trained[start : start + seq_len]
        if block_trained[1:].any():
            blocks.append(Fitted(block_ids, block_trained, False, None))
    return blocks or [Fitted(ids, trained, False, "no trained tokens")]
