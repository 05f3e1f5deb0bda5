"""Segments -> token ids with a per-token `trained` flag; mask modes; truncation.

`trained[j]` says token j is a training target (the loss of predicting it from tokens < j counts). Token 0 of an
example is never predicted, whatever its flag; `packing.py` turns these flags into the batch's `loss_mask`.
"""

from dataclasses import dataclass

import numpy as np

from jaxalign.data.templates import Segment
from jaxalign.data.tokenizer import CONTINUE, START, SegmentEncoder
from jaxalign.errors import JaxalignError

MASK_MODES = ("prompt", "assistant", "last_turn", "full")


@dataclass(frozen=True)
class Tokens:
    """An example's tokens: `ids` int32, `response` bool (token from a response segment), `turn` int32."""

    ids: np.ndarray
    response: np.ndarray
    turn: np.ndarray


def tokenize_segments(segment_lists: list[list[Segment]], encoder: SegmentEncoder) -> list[Tokens]:
    """Tokenises many examples at once; each text segment on its own, special segments as one id each.

    Each text is encoded in its context: example start / after bos, after text, after another special token
    (see `SegmentEncoder`).
    """
    texts, contexts, where = [], [], []
    for e, segments in enumerate(segment_lists):
        context = START
        for s, segment in enumerate(segments):
            if segment.special:
                context = START if segment.text == encoder.tokenizer.bos_token else segment.text
                continue
            texts.append(segment.text)
            contexts.append(context)
            where.append((e, s))
            context = CONTINUE
    encoded = encoder.encode(texts, contexts)
    pieces: list[list[list[int]]] = [[[] for _ in segments] for segments in segment_lists]
    for (e, s), ids in zip(where, encoded):
        pieces[e][s] = ids
    out = []
    for e, segments in enumerate(segment_lists):
        ids, response, turn = [], [], []
        for s, segment in enumerate(segments):
            seg_ids = [encoder.special_id(segment.text)] if segment.special else pieces[e][s]
            ids.extend(seg_ids)
            response.extend([segment.response] * len(seg_ids))
            turn.extend([segment.turn] * len(seg_ids))
        out.append(
            Tokens(np.asarray(ids, np.int32), np.asarray(response, bool), np.asarray(turn, np.int32).reshape(-1))
        )
    return out


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
