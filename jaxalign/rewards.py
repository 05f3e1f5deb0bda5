"""Rewards for RL: one interface `reward(prompts, responses, metadata) -> scores [B]` (float32 numpy).

- `ModelReward`: a trained reward model (jaxalign or Hugging Face folder) scoring each rendered prompt + response.
- `Llama2Reward`: LLaMA-2-Chat's two-model combination (Touvron et al. 2023, §3.2.3): with `R = σ(score)`, the safety
  reward `R_s` when the prompt is a safety prompt or `R_s < 0.15`, else the helpfulness reward `R_h`; then
  `whiten(logit(R))` over the batch.
- `function_reward("module:function")`: a Python function with the same signature (verifiable tasks), such as
  `contains_reference`, `correct_answer` (the final answer equals the reference) and `boxed_format` here.

`prompts[b]` is a chat (`[{role, content}]` ending with the user turn) or a string (one user turn), `responses[b]`
a string, `metadata[b]` a dict (e.g. `{"safety": 1}` or a task's reference answer).
"""

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from fractions import Fraction

import jax
import numpy as np

from jaxalign import storage
from jaxalign.data.formats import parse_record
from jaxalign.data.loader import Preprocessor
from jaxalign.errors import JaxalignError
from jaxalign.objectives import ppo
from jaxalign.objectives.reward import sequence_rewards
from jaxalign.sampling import bucket_size

RewardFn = Callable[[Sequence, Sequence[str], Sequence[dict]], np.ndarray]


def whiten(values, eps: float = 1e-8) -> np.ndarray:
    """`(x - mean) / sqrt(var + eps)` over all of `values` (float32 numpy; `jaxalign.objectives.ppo.whiten` without
    a mask); a batch of one becomes 0."""
    return np.asarray(ppo.whiten(np.asarray(values, np.float32), eps=eps))


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
    return whiten(_logit_combined(score_helpful, score_safety, is_safety, threshold))


def _logit_combined(score_helpful, score_safety, is_safety, threshold: float) -> np.ndarray:
    """`logit(combine_llama2(...))`: the raw score of the model the combination chooses (float32 `[B]`)."""
    safety = np.asarray(score_safety, np.float64)
    use_safety = np.asarray(is_safety, bool) | (_sigmoid(safety) < threshold)
    return np.where(use_safety, safety, np.asarray(score_helpful, np.float64)).astype(np.float32)


class ModelReward:
    """A reward model as a `RewardFn`: each prompt + response is rendered with `data_config`'s template (the one the
    model was trained with; `tokenizer` uses the tokenizer's own chat template), tokenised, and scored at its last
    token in batches of `batch_size` rows padded to power-of-two lengths (few compiles). A conversation longer than
    `max_length` tokens raises `JaxalignError` (a cut one would be scored at the wrong token).

        reward = ModelReward(*load_model("runs/rm/hf"), load_tokenizer("runs/rm/hf"), DataConfig(template="alpaca"))
        scores = reward(["What is 2+2?"], ["4."], [{}])
    """

    def __init__(self, model, params, tokenizer, data_config, max_length: int | None = None, batch_size: int = 8):
        self.params = params
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_position_embeddings
        truncation = dataclasses.replace(data_config.truncation, overlong="drop", max_prompt_fraction=None)
        self.preprocessor = Preprocessor(dataclasses.replace(data_config, truncation=truncation), tokenizer,
                                         self.max_length)
        self._rewards = jax.jit(lambda p, ids, positions, segments: sequence_rewards(model, p, ids, positions,
                                                                                     segments))

    def __call__(self, prompts, responses, metadata) -> np.ndarray:
        examples = [response_example(prompt, response, f"response {index}")
                    for index, (prompt, response) in enumerate(zip(prompts, responses, strict=True))]
        return self.score(examples)

    def score(self, examples) -> np.ndarray:
        """Rewards of parsed examples: `[N]` for conversations (scored whole), `[N, 2]` (chosen, rejected) for
        `PreferencePair`s."""
        items = [item for group in self.preprocessor.process(list(examples)) for item in group]
        for example, item in zip(examples, items):
            if item.dropped is not None:
                longest = max(part.ids.size for part in item.parts)
                raise JaxalignError(f"{example.origin}: {longest} tokens, more than the maximum length "
                                    f"{self.max_length} (the model's positions, or --max-length)")
        if not items:
            return np.zeros(0, np.float32)
        rewards = self._score_sequences([part.ids for item in items for part in item.parts]).reshape(len(items), -1)
        return rewards[:, 0] if rewards.shape[1] == 1 else rewards

    def _score_sequences(self, sequences: list[np.ndarray]) -> np.ndarray:
        rewards = np.zeros(len(sequences), np.float32)
        order = sorted(range(len(sequences)), key=lambda i: sequences[i].size)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            longest = max(sequences[i].size for i in chunk)
            length = min(bucket_size(longest, 16), self.max_length)
            ids = np.full((self.batch_size, length), self.preprocessor.pad_id, np.int32)
            segments = np.zeros((self.batch_size, length), np.int32)
            positions = np.zeros((self.batch_size, length), np.int32)
            for row, i in enumerate(chunk):
                n = sequences[i].size
                ids[row, :n], segments[row, :n], positions[row, :n] = sequences[i], 1, np.arange(n)
            scores = np.asarray(self._rewards(self.params, ids, positions, segments))
            rewards[chunk] = scores[: len(chunk)]
        return rewards


def response_example(prompt, response: str, origin: str):
    """The `Conversation` of `prompt` (a string: one user turn; or a `[{role, content}]` chat ending with the user
    turn) answered by `response`, as the data pipeline parses it (errors name `origin`). A blank response is kept
    as it is (a policy may answer with nothing; it is scored like any other answer)."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = list(prompt)
    else:
        raise JaxalignError(f"{origin}: the prompt must be a string or a message list, got {type(prompt).__name__}")
    placeholder = response if response.strip() else "-"
    parsed = parse_record({"messages": [*messages, {"role": "assistant", "content": placeholder}]}, "messages", origin)
    answer = dataclasses.replace(parsed.messages[-1], content=response)
    return dataclasses.replace(parsed, messages=parsed.messages[:-1] + (answer,))


class Llama2Reward:
    """LLaMA-2's two reward models as one `RewardFn`: `llama2_final_reward` of the helpfulness and safety models'
    scores, with `metadata[b]["safety"]` (truthy) marking safety prompts. `whitened=False` leaves out the whitening
    over the batch: `logit(R_c)`, the chosen model's raw score, comparable across batches (rejection sampling ranks
    samples of different rounds by it)."""

    def __init__(self, helpful: RewardFn, safety: RewardFn, threshold: float = 0.15, whitened: bool = True):
        self.helpful, self.safety, self.threshold, self.whitened = helpful, safety, threshold, whitened

    def __call__(self, prompts, responses, metadata) -> np.ndarray:
        is_safety = [bool(m.get("safety", False)) for m in metadata]
        helpful, safety = self.helpful(prompts, responses, metadata), self.safety(prompts, responses, metadata)
        if self.whitened:
            return llama2_final_reward(helpful, safety, is_safety, self.threshold)
        return _logit_combined(helpful, safety, is_safety, self.threshold)


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


def contains_reference(prompts, responses, metadata) -> np.ndarray:
    """A verifiable reward for exact-answer prompts (`demo:prompts`, QA with short answers): 1.0 when the prompt's
    reference answer (`metadata[b]["reference"]`) appears in the response, compared case-insensitively with runs of
    whitespace collapsed; 0.0 otherwise and for prompts without one. Use as `reward.function:
    jaxalign.rewards:contains_reference`."""

    def normal(text: str) -> str:
        return " ".join(text.lower().split())

    scores = [float(bool(m.get("reference")) and normal(m["reference"]) in normal(r))
              for r, m in zip(responses, metadata, strict=True)]
    return np.asarray(scores, np.float32)


_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_BOXED = "\\boxed{"


def _boxed_contents(text: str) -> list[str]:
    """The contents of every complete `\\boxed{...}` in `text`, in order (nested braces balanced)."""
    contents, start = [], text.find(_BOXED)
    while start >= 0:
        depth, i = 1, start + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            contents.append(text[start + len(_BOXED) : i - 1])
        start = text.find(_BOXED, start + len(_BOXED))
    return contents


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the content of its last complete `\\boxed{...}` (stripped), else the last
    number in the text (an integer, a negative or a decimal: "-3", "2.5"; commas between thousands removed:
    "1,234" → "1234"), else None. Examples: "so \\boxed{42}." → "42"; "12 + 7 = 19." → "19"."""
    boxed = _boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _as_number(text: str) -> Fraction | None:
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    return Fraction(text.replace(",", ""))


def correct_answer(prompts, responses, metadata) -> np.ndarray:
    """A verifiable reward for tasks with one final answer (`demo:arithmetic`, math with a final `\\boxed{}`
    answer, exact-match QA): 1.0 when `extract_answer(response)` equals the prompt's reference answer
    (`metadata[b]["reference"]`, the `answer` field of a prompt record); 0.0 otherwise and for prompts without one.
    Both are compared as numbers when both are numbers ("19.0" equals "19", "1,000" equals "1000"), else as
    strings with surrounding whitespace stripped ("Paris" equals " Paris ", not "paris").

    Use as `reward.function: jaxalign.rewards:correct_answer`. Your own reward is any function with this signature,
    `fn(prompts, responses, metadata)` returning one number per response, named `module:function` the same way
    (e.g. a `my_rewards.py` in the working directory: `reward.function: my_rewards:score`); build on
    `extract_answer` to check answers in another way (a tolerance, a normalised string).
    """
    scores = []
    for response, meta in zip(responses, metadata, strict=True):
        reference = meta.get("reference")
        answer = extract_answer(response)
        if reference is None or not str(reference).strip() or answer is None:
            scores.append(0.0)
            continue
        reference = str(reference).strip()
        expected, got = _as_number(reference), _as_number(answer)
        same = expected == got if expected is not None and got is not None else answer.strip() == reference
        scores.append(float(same))
    return np.asarray(scores, np.float32)


def boxed_format(prompts, responses, metadata) -> np.ndarray:
    """A format reward: 1.0 when the response holds exactly one complete `\\boxed{...}` (and no other
    `\\boxed{`), else 0.0, whatever the answer. Named `jaxalign.rewards:boxed_format` in a config; to teach the
    answer format alongside correctness, sum the two in your own reward function, e.g.
    `return correct_answer(p, r, m) + 0.1 * boxed_format(p, r, m)`."""
    return np.asarray([float(r.count(_BOXED) == 1 and len(_boxed_contents(r)) == 1) for r in responses], np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def build_reward(section, data_config, mesh_config, dtype: str = "float32", param_dtype: str = "float32",
                 whitened: bool = True):
    """(`reward(context, prompts, responses, metadata) -> scores [B]`, the frozen reward models the loop or
    `jaxalign.train.loop.inference` must load onto the mesh, by name) for a `RewardSection`: a function, one
    reward model (`reward`), or LLaMA-2's pair (`reward_helpful`, `reward_safety`; `whitened=False`, here or as a
    keyword of a call, scores each sample by the chosen model's raw score instead of whitening over the batch, e.g.
    to report rewards that compare across batches). Reward models read
    `context.frozen[name]`, render with `section.template` (default: `data_config.template`), in `dtype` /
    `param_dtype`. Raises `JaxalignError` naming `reward` for a folder that is not a reward model."""
    from jaxalign.config import ModelSection
    from jaxalign.data.tokenizer import load_tokenizer
    from jaxalign.models.loading import model_source, read_stored_model
    from jaxalign.train.algorithm import Frozen

    if section.function:
        fn = function_reward(section.function)
        return (lambda context, prompts, responses, metadata, whitened=whitened: fn(prompts, responses, metadata)), {}
    paths = {"reward": section.model} if section.model else {"reward_helpful": section.helpful,
                                                            "reward_safety": section.safety}
    frozen, tokenizers = {}, {}
    for name, path in paths.items():
        key = "reward." + {"reward": "model", "reward_helpful": "helpful", "reward_safety": "safety"}[name]
        source = model_source(ModelSection(path=path, dtype=dtype, param_dtype=param_dtype), head="score",
                              mesh=mesh_config)
        if source.adapter is not None or read_stored_model(storage.local_folder(path, weights=False))[1] != "score":
            raise JaxalignError(f"config key '{key}': {path} is not a reward model (a sequence classifier with one "
                                "score, as `jaxalign rm` exports); a causal LM would be scored by an untrained head")
        frozen[name] = Frozen(source.module(), source.load)
        tokenizers[name] = load_tokenizer(path)
    rendering = dataclasses.replace(data_config, template=section.template or data_config.template)
    scorers: dict[str, ModelReward] = {}

    def reward(context, prompts, responses, metadata, whitened=whitened):
        for name, model in frozen.items():
            if name not in scorers or scorers[name].params is not context.frozen[name]:
                scorers[name] = ModelReward(model.model, context.frozen[name], tokenizers[name], rendering,
                                            max_length=section.max_length,
                                            batch_size=max(1, min(len(responses), 64)))
        if "reward" in scorers:
            return np.asarray(scorers["reward"](prompts, responses, metadata))
        combined = Llama2Reward(scorers["reward_helpful"], scorers["reward_safety"], section.safety_threshold,
                                whitened)
        return combined(prompts, responses, metadata)

    return reward, frozen
