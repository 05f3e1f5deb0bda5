"""Rejection-sampling fine-tuning (LLaMA-2-Chat, Touvron et al. 2023, §3.2.3): the bookkeeping of its rounds.

Each round samples K responses per prompt from the newest policy, keeps the best-scored one per prompt, and pools
it with the best of all earlier rounds: per prompt the pool holds the best response ever seen (a later sample
replaces it only with a strictly higher score), since fine-tuning only on the last round's samples caused
regressions. The policy is then fine-tuned on the pool with the SFT loss (`jaxalign rs`).

The pool is a JSONL file, one line per prompt: `{"prompt": [{role, content}, ...], "completion": str, "score":
float, "round": int}`, the prompt-completion format `jaxalign.data` trains on.
"""

import dataclasses
import json
import os

import numpy as np

from jaxalign import storage
from jaxalign.errors import JaxalignError


@dataclasses.dataclass(frozen=True)
class PoolEntry:
    """The best response seen so far to one prompt: `prompt` (the chat `[{role, content}]` ending with the user
    turn), `completion`, its `score` and the `round` (1-based) that sampled it."""

    prompt: list
    completion: str
    score: float
    round: int

    @property
    def key(self) -> str:
        return prompt_key(self.prompt)


def prompt_key(prompt: list) -> str:
    """The identity of a prompt in the pool: its messages as canonical JSON."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def best_samples(scores: np.ndarray) -> np.ndarray:
    """Index `[P]` of the best of each prompt's K samples in `scores` `[P, K]` (the first of equal scores)."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be [prompts, samples], got shape {scores.shape}")
    return np.argmax(scores, axis=1)


def round_statistics(scores: np.ndarray) -> dict[str, float]:
    """A round's sampling report from `scores` `[P, K]`: `sample_score_mean` and `sample_score_max` over all
    samples, `best_score_mean` (the mean of each prompt's best), and `best_minus_median` (the mean over prompts of
    best minus median, the gain that choosing the best of K buys: LLaMA-2's Figure 7)."""
    scores = np.asarray(scores, np.float64)
    best = scores.max(axis=1)
    return {
        "sample_score_mean": float(scores.mean()),
        "sample_score_max": float(scores.max()),
        "best_score_mean": float(best.mean()),
        "best_minus_median": float((best - np.median(scores, axis=1)).mean()),
    }


def merge(pool: dict[str, PoolEntry], candidates: list[PoolEntry]) -> dict[str, PoolEntry]:
    """A new pool: per prompt the entry with the highest score among `pool`'s and `candidates`' (an earlier entry
    stays on a tie). `pool` is not changed."""
    merged = dict(pool)
    for entry in candidates:
        kept = merged.get(entry.key)
        if kept is None or entry.score > kept.score:
            merged[entry.key] = entry
    return merged


def write_pool(path: str | os.PathLike, pool: dict[str, PoolEntry]) -> None:
    """Writes the pool as JSONL (entries sorted by prompt, so the file is the same for the same pool) in one step
    (`storage.write_text`): a crash never leaves a partial pool."""
    storage.write_text(path, "".join(json.dumps(dataclasses.asdict(pool[key]), ensure_ascii=False) + "\n"
                                     for key in sorted(pool)))


def read_pool(path: str | os.PathLike) -> dict[str, PoolEntry]:
    """The pool `write_pool` wrote. Raises `JaxalignError` naming `file:line` for a line that is not an entry."""
    pool = {}
    with storage.location(path).open() as handle:
        for number, line in enumerate(handle, start=1):
            try:
                entry = PoolEntry(**json.loads(line))
            except (TypeError, ValueError) as error:
                raise JaxalignError(f"{path}:{number}: not a pool entry {{prompt, completion, score, round}} "
                                    f"({error})") from None
            pool[entry.key] = entry
    return pool
