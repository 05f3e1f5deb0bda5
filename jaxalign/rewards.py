"""Rewards for RL: one interface `reward(prompts, responses, metadata) -> scores [B]` (float32 numpy).

- `ModelReward`: a trained reward model (jaxalign or Hugging Face folder) scoring each rendered prompt + response.
- `Llama2Reward`: LLaMA-2-Chat's two-model combination (Touvron et al. 2023, §3.2.3): with `R = σ(score)`, the safety
  reward `R_s` when the prompt is a safety prompt or `R_s < 0.15`, else the helpfulness reward `R_h`; then
  `whiten(logit(R))` over the batch.
- `function_reward("module:function")`: a Python function with the same signature (verifiable tasks).

`prompts[b]` is a chat (`[{role, content}]` ending with the user turn) or a string (one user turn), `responses[b]`
a string, `metadata[b]` a dict (e.g. `{"safety": 1}` or a task's reference answer).
"""

import importlib
import inspect
from collections.abc import Callable, Sequence

import numpy as np

from jaxalign.errors import JaxalignError

RewardFn = Callable[[Sequence, Sequence[str], Sequence[dict]], np.ndarray]


def whiten(values, eps: float = 1e-8) -> np.ndarray:
    """`(x - mean) / sqrt(var + eps)` over all of `values` (float32); a batch of one becomes 0."""
    values = np.asarray(values, np.float32)
    return ((values - values.mean()) / np.sqrt(values.var() + eps)).astype(np.float32)


def combine_llama2(score_helpful, score_safety, is_safety, threshold: float = 0.15) -> np.ndarray:
    """LLaMA-2's combined reward before whitening, in (0, 1): `σ(score_safety)` where `is_safety` or
    `σ(score_safety) < threshold`, else `σ(score_helpful)`. Scores are the reward models' raw outputs `[B]`."""
    helpful = _sigmoid(np.asarray(score_helpful, np.float64))
    safety = _sigmoid(np.asarray(score_safety, np.float64))
    use_safety = np.asarray(is_safety, bool) | (safety < threshold)
    return np.where(use_safety, safety, helpful).astype(np.float32)


def llama2_final_reward(score_helpful, score_safety, is_safety, threshold: float = 0.15) -> np.ndarray:
    """`whiten(logit(combine_llama2(...)))` over the batch, taking the logit of the chosen model's raw score
    directly (`logit(σ(s)) = s`, without the rounding of a sigmoid near 0 or 1)."""
    safety = np.asarray(score_safety, np.float64)
    use_safety = np.asarray(is_safety, bool) | (_sigmoid(safety) < threshold)
    return whiten(np.where(use_safety, safety, np.asarray(score_helpful, np.float64)))


def function_reward(spec: str) -> RewardFn:
    """The Python function named `module:function` (importable from the working directory or installed), called
    as `fn(prompts, responses, metadata)` and expected to return one number per response."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise JaxalignError(f"reward function {spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise JaxalignError(f"reward function {spec!r}: cannot import module {module_name!r}: {err}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise JaxalignError(f"reward function {spec!r}: module {module_name!r} has no function {name!r}")
    try:
        inspect.signature(fn).bind(None, None, None)
    except TypeError:
        raise JaxalignError(f"reward function {spec!r}: must take (prompts, responses, metadata)") from None

    def reward(prompts, responses, metadata) -> np.ndarray:
        scores = np.asarray(fn(prompts, responses, metadata), np.float32).reshape(-1)
        if scores.shape[0] != len(responses):
            raise JaxalignError(f"reward function {spec!r} returned {scores.shape[0]} scores for "
                                f"{len(responses)} responses")
        return scores

    return reward


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))
