"""On-policy rollouts on the training mesh: prompts from a loader, responses from the current policy with the
device-level sampler, scores from a reward function, and the token-level layout every RL objective trains on.

A rollout batch (`Rollout.batch`, global arrays `[R, L - 1]` with L = prompt length P + `max_new_tokens`) is an LM
batch of prompt + response in the layout of `jaxalign.data.packing` (`input_ids`, `targets`, `positions`,
`segment_ids`; `loss_mask` 1 on the response tokens up to and including the end token), so the one log-prob helper
(`jaxalign.objectives.logprobs`) gives the policy's, the old policy's and the reference's per-token log-probs in
the same slots. Generation and the forward passes run jitted under the training mesh on the current params, with no
copy of the weights; only token ids go to the host, to be detokenised for the reward function.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxalign import sharding as shd
from jaxalign.sampling import SamplingParams, decode


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How responses are sampled: `max_new_tokens`, `temperature` (the log-probs of every model are taken at it),
    `top_p`, `top_k` (0 = off); `stop_tokens` end a response (default: the tokenizer's eos and the template's
    end-of-turn token)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_tokens: tuple[str, ...] = ()

    def __post_init__(self):
        from jaxalign.errors import JaxalignError

        if self.max_new_tokens < 1:
            raise JaxalignError(f"config key 'generation.max_new_tokens': expected >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise JaxalignError(f"config key 'generation.temperature': RL samples from the policy, so it must be "
                                f"> 0, got {self.temperature}")

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def check_room(self, seq_len: int) -> None:
        """Raises `JaxalignError` naming `train.seq_len` when a sequence of `seq_len` tokens leaves no room for a
        prompt before `max_new_tokens`."""
        from jaxalign.errors import JaxalignError

        if seq_len <= self.max_new_tokens:
            raise JaxalignError(f"config key 'train.seq_len': {seq_len} leaves no room for a prompt before "
                                f"generation.max_new_tokens={self.max_new_tokens} new tokens")


def response_batch(prompts: dict, tokens: jax.Array, lengths: jax.Array) -> dict:
    """The LM batch `[R, P + N - 1]` of left-padded prompts (`input_ids`, `segment_ids`, `positions` `[R, P]`)
    followed by sampled `tokens` `[R, N]` of which the first `lengths[r]` are the response: targets are the next
    tokens, `loss_mask` marks the response tokens as targets, segment 1 on prompt + response and 0 on padding."""
    rows, new = tokens.shape
    response = jnp.arange(new)[None, :] < lengths[:, None]
    ids = jnp.concatenate([prompts["input_ids"], tokens], axis=1)
    segments = jnp.concatenate([prompts["segment_ids"], response.astype(jnp.int32)], axis=1)
    prompt_lengths = jnp.sum(prompts["segment_ids"], axis=1)
    positions = jnp.concatenate([prompts["positions"], prompt_lengths[:, None] + jnp.arange(new)[None]], axis=1)
    positions = jnp.where(segments != 0, positions, 0)
    loss_mask = jnp.concatenate([jnp.zeros_like(prompts["input_ids"]), response.astype(jnp.int32)], axis=1)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": segments[:, :-1],
            "positions": positions[:, :-1], "loss_mask": loss_mask[:, 1:]}


class Sampler:
    """Samples responses to prompt batches from the current policy params on the training mesh (one compiled
    program per prompt shape)."""

    def __init__(self, policy, generation: GenerationConfig, stop_token_ids: Sequence[int], pad_id: int):
        self.policy, self.generation = policy, generation
        self.stop_token_ids = np.asarray(sorted(set(stop_token_ids)), np.int32)
        self.pad_id = pad_id
        self._program = {}

    def __call__(self, params, prompts: dict, rng: jax.Array, mesh, rules, greedy: bool = False):
        """`(batch, tokens [R, N], lengths [R])` for global prompt arrays; greedy for evaluation."""
        key = ("greedy" if greedy else "sample", prompts["input_ids"].shape)
        if key not in self._program:
            sampling = SamplingParams(temperature=0.0) if greedy else self.generation.sampling()
            batch_sharding = shd.batch_sharding(mesh, rules, 2)
            row_sharding = shd.batch_sharding(mesh, rules, 1)

            def program(params, prompts, rng, stop_ids):
                tokens, _, lengths = decode(
                    self.policy, params, prompts["input_ids"], prompts["segment_ids"], prompts["positions"], rng,
                    max_new_tokens=self.generation.max_new_tokens, sampling=sampling, stop_token_ids=stop_ids,
                    pad_id=self.pad_id)
                return response_batch(prompts, tokens, lengths), tokens, lengths

            self._program[key] = jax.jit(program, out_shardings=(batch_sharding, batch_sharding, row_sharding))
        return self._program[key](params, prompts, rng, jnp.asarray(self.stop_token_ids))


PROMPT_KEYS = ("input_ids", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Responses:
    """Responses to a prompt batch, on every process: `examples`, `texts` and `ended` (a stop token ended it) for
    the real rows (padding rows of a last batch left out), and the sampled LM `batch` (global arrays, all rows) with
    `real` `[R]` marking the real rows in it."""

    examples: list
    texts: list[str]
    ended: np.ndarray
    batch: dict
    real: np.ndarray


def respond(sampler: "Sampler", params, tokenizer, loader, local: dict, context, rng: jax.Array, *,
            repeat: int = 1, greedy: bool = False) -> Responses:
    """`sampler`'s responses (policy `params` on `context.mesh`) to the process-local prompt batch `local` of the
    prompt `loader`, each prompt `repeat` times in consecutive rows; greedy for evaluation."""
    index = np.repeat(gather(local["example_index"], context), repeat)
    arrays = {k: np.repeat(local[k], repeat, axis=0) for k in PROMPT_KEYS}
    prompts = shd.global_batch(arrays, context.mesh, context.rules)
    batch, tokens, lengths = sampler(params, prompts, rng, context.mesh, context.rules, greedy=greedy)
    real = index >= 0
    texts, ended = decode_responses(tokenizer, gather(tokens, context)[real], gather(lengths, context)[real],
                                    sampler.stop_token_ids)
    return Responses([loader.examples[i] for i in index[real]], texts, ended, batch, real)


def check_rows(context, rows: int, key: str) -> None:
    """Raises `JaxalignError` naming config key `key` when `rows` sampled together do not split over the batch
    shards of `context.mesh`."""
    from jaxalign.errors import JaxalignError

    axes, shards = shd.batch_axes(context.mesh, context.rules)
    if rows % shards:
        names = " x ".join(f"mesh.{a}={context.mesh.shape[a]}" for a in axes)
        raise JaxalignError(f"config key '{key}': {rows} rows per generate call are not a multiple of the {shards} "
                            f"batch shards ({names})")


def gather(x, context) -> np.ndarray:
    """A global array (or process-local numpy rows) as one host array of all rows, on every process."""
    if isinstance(x, np.ndarray):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True)) if jax.process_count() > 1 else x
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def prompt_messages(example) -> list[dict]:
    """A prompt example's chat as `[{role, content}]`."""
    return [{"role": m.role, "content": m.text()} for m in example.messages]


def prompt_metadata(example) -> dict:
    """What a reward function may read besides the text: the prompt's `reference` answer, `safety` (True for a
    safety prompt; LLaMA-2's reward combination reads it) and its origin."""
    return {"reference": example.reference, "safety": example.safety == 1, "origin": example.origin}


def decode_responses(tokenizer, tokens: np.ndarray, lengths: np.ndarray, stop_token_ids: np.ndarray
                     ) -> tuple[list[str], np.ndarray]:
    """(response texts without their end token, whether each ended with a stop token) from host arrays. A text is
    stripped of the whitespace around it: the spaces a template puts between the prompt and the answer and before
    the end token ("[/INST] answer </s>") belong to the template, not to the answer the reward or a training set
    reads (which renders them again)."""
    texts, ended = [], np.zeros(len(lengths), bool)
    for row, (ids, n) in enumerate(zip(tokens, lengths)):
        ids = list(ids[:n])
        if ids and ids[-1] in stop_token_ids:
            ended[row] = True
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts, ended


def prompt_loaders(config, tokenizer, prompts_per_batch: int, algorithm: str):
    """(the train prompt loader, `eval_data()` or None) of an RL run's `data` section: `prompts_per_batch` prompts
    per batch, each cut to `train.seq_len - generation.max_new_tokens` tokens; preference pairs give their prompts.
    Raises JaxalignError naming `data.train` for data of another kind."""
    from jaxalign.errors import JaxalignError
    from jaxalign.train.command import build_loaders

    prompt_length = config.train.seq_len - config.generation.max_new_tokens
    loader_config = dataclasses.replace(config.train, batch_size=prompts_per_batch, seq_len=prompt_length)
    train_loader, eval_data = build_loaders(config.data, tokenizer, loader_config)
    if train_loader.kind == "preference":
        train_loader, eval_data = prompts_of_pairs(train_loader, eval_data, tokenizer)
    if train_loader.kind != "prompt":
        raise JaxalignError(f"config key 'data.train': {algorithm} samples responses to prompts, but the data holds "
                            f"{train_loader.kind} examples (use prompt records: {{prompt}} or {{messages}} ending "
                            "with a user turn, e.g. demo:prompts)")
    return train_loader, eval_data


def prompts_of_pairs(train_loader, eval_data, tokenizer):
    """Prompt loaders over the prompts of preference pairs (their `safety` kept), in place of pair loaders."""
    from jaxalign.data.formats import Prompt
    from jaxalign.data.loader import DataLoader

    def prompt_loader(loader):
        sources = [dataclasses.replace(source, examples=[Prompt(e.prompt, None, e.origin, e.safety)
                                                         for e in source.examples])
                   for source in loader.sources]
        return DataLoader(loader.config, tokenizer, batch_size=loader.batch_size, seq_len=loader.seq_len,
                          split=loader.split, process_index=loader.process_index,
                          process_count=loader.process_count, sources=sources)

    train = prompt_loader(train_loader)
    if eval_data is None:
        return train, None
    eval_loader = prompt_loader(eval_data())

    def eval_prompts():
        eval_loader.load_state_dict({"epoch": 0, "position": 0})
        return eval_loader

    return train, eval_prompts


def one_pass(loader, batch_size: int | None = None):
    """A loader over the examples of `loader` that makes one pass in order, in batches of `batch_size` (default:
    `loader`'s), the last padded with rows whose `example_index` is -1 (as an eval loader does)."""
    from jaxalign.data.loader import DataLoader

    return DataLoader(loader.config, loader.preprocessor.tokenizer, batch_size=batch_size or loader.batch_size,
                      seq_len=loader.seq_len, split="eval", process_index=loader.process_index,
                      process_count=loader.process_count, sources=loader.sources)


def stop_token_ids(config, tokenizer) -> list[int]:
    """The ids that end a response: `generation.stop_tokens`, else the tokenizer's eos and the template's
    end-of-turn token."""
    from jaxalign.data.templates import chat_format
    from jaxalign.errors import JaxalignError

    names = list(config.generation.stop_tokens)
    if not names:
        names = [tokenizer.eos_token, chat_format(config.data, tokenizer).end_of_turn]
    ids = []
    for name in names:
        if name is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(name)
        if token_id is None or token_id == tokenizer.unk_token_id and name != tokenizer.unk_token:
            raise JaxalignError(f"config key 'generation.stop_tokens': {name!r} is not a token of the tokenizer")
        ids.append(int(token_id))
    if not ids:
        raise JaxalignError("config key 'generation.stop_tokens': no stop token (the tokenizer has no eos token)")
    return ids
