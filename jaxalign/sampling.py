"""Sampling from LLaMA-family models: samplers on logits, and prefill + decode with a KV cache.

Samplers are pure functions of (rng, logits) and a frozen `SamplingParams`; the order of logits processing is the
one transformers uses: temperature, then top-k, then top-p (nucleus). `temperature == 0` means greedy.

`decode` is the device-level loop on a left-padded prompt batch, a pure function to call inside any `jax.jit` (RL
rollouts call it inside their step, under the training mesh); `generate` wraps it for lists of token ids on the host.
"""

import contextlib
import dataclasses
import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign.data.packing import prompt_batch
from jaxalign.errors import JaxalignError
from jaxalign.models.llama import init_cache
from jaxalign.objectives.logprobs import token_log_probs
from jaxalign.sharding import DEFAULT_RULES, batch_sharding


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Hashable, so a compiled decode loop is reused for equal settings.

    temperature: 0 is greedy (argmax); otherwise logits are divided by it before top-k / top-p.
    top_k: keep only the k most likely tokens (0 = no limit).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0 = no limit).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise JaxalignError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise JaxalignError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise JaxalignError(f"top_p must be in (0, 1] (1 = no limit), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the log-probs `decode` reports: the sampling temperature, or 1 when greedy."""
        return 1.0 if self.greedy else self.temperature


def _sorted_candidates(logits: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """The tempered logits of the candidate tokens, most likely first, with -inf on those top-p removes; and their ids.

    Works in the sorted space so that exactly k tokens survive top-k even when logits tie.
    """
    logits = logits.astype(jnp.float32) / params.temperature
    vocab = logits.shape[-1]
    k = min(params.top_k, vocab) if params.top_k else vocab
    values, token_ids = jax.lax.top_k(logits, k)
    if params.top_p < 1.0:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(mass_before < params.top_p, values, -jnp.inf)
    return values, token_ids


def process_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Logits `[..., V]` of the distribution `sample_logits` draws from: tempered, -inf outside the allowed set.

    For greedy, every token but the argmax is -inf.
    """
    if params.greedy:
        best = jnp.argmax(logits, axis=-1)
        keep = jax.nn.one_hot(best, logits.shape[-1], dtype=jnp.bool_)
        return jnp.where(keep, logits.astype(jnp.float32), -jnp.inf)
    if params.top_k == 0 and params.top_p == 1.0:
        return logits.astype(jnp.float32) / params.temperature
    values, token_ids = _sorted_candidates(logits, params)
    batch_shape = logits.shape[:-1]
    flat_values = values.reshape(-1, values.shape[-1])
    flat_ids = token_ids.reshape(-1, token_ids.shape[-1])
    rows = jnp.arange(flat_ids.shape[0])[:, None]
    full = jnp.full((flat_ids.shape[0], logits.shape[-1]), -jnp.inf, jnp.float32).at[rows, flat_ids].set(flat_values)
    return full.reshape(*batch_shape, logits.shape[-1])


def sample_logits(rng: jax.Array, logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Token ids `[...]` drawn from logits `[..., V]`; `rng` is ignored when greedy."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if params.top_k == 0 and params.top_p == 1.0:
        return jax.random.categorical(rng, logits.astype(jnp.float32) / params.temperature, axis=-1).astype(jnp.int32)
    values, token_ids = _sorted_candidates(logits, params)
    choice = jax.random.categorical(rng, values, axis=-1)
    return jnp.take_along_axis(token_ids, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `generate` returns, one row per prompt.

    tokens: `[B, max_new_tokens]` int32; row i holds `lengths[i]` generated tokens (the stop token included when the
      row stopped on one), then `pad_id`.
    logprobs: `[B, max_new_tokens]` float32, log p(token) under `softmax(logits / T)` with T the sampling
      temperature (1 when greedy), before top-k / top-p and before the `min_new_tokens` mask: what
      `jaxalign.objectives.logprobs.token_log_probs(logits, token, T)` gives on a full forward pass over prompt +
      completion; 0 after the end of a row.
    lengths: `[B]` int32.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray

    def completions(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]

    def completion_logprobs(self) -> list[list[float]]:
        return [row[:n].tolist() for row, n in zip(self.logprobs, self.lengths)]


def bucket_size(n: int, minimum: int = 1) -> int:
    """The power of two >= max(n, minimum): prompt lengths and batch sizes are rounded up so compiles are reused."""
    return 1 << (max(n, minimum) - 1).bit_length()


def decode(
    model,
    params,
    input_ids: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    stop_token_ids: jax.Array,
    pad_id: int | jax.Array,
    min_new_tokens: int | jax.Array = 0,
    active: jax.Array | None = None,
    on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Completes a left-padded prompt batch with up to `max_new_tokens` tokens per row, entirely on device.

    A pure function of its arrays, to be traced inside any `jax.jit`: also inside a train step under
    `jax.set_mesh(mesh)` and `flax.linen.logical_axis_rules(rules)` with params sharded by the training layout, where
    the KV cache is sharded by the same rules. Prefill is one model call, then a `lax.while_loop` samples until every
    row is done, on a cache of `P + max_new_tokens` slots. Nothing goes to the host unless `on_tokens` is given.

    input_ids, segment_ids, positions: `[B, P]` int32, left-padded as `jaxalign.data.packing.prompt_batch` builds
      them (segment 1 on prompt tokens, 0 on padding; positions 0, 1, ... from each prompt's first token). The
      caller keeps each prompt's length + `max_new_tokens` within the model's context.
    rng: a PRNG key, split once per step; unused when greedy.
    max_new_tokens, sampling: static (a new value compiles a new program).
    stop_token_ids: int `[S]`, possibly empty; a row ends with the first one it emits (which counts in its length).
    pad_id: fills `tokens` after the end of a row.
    min_new_tokens: stop tokens are masked out of the first `min_new_tokens` steps.
    active: bool `[B]`, the rows to complete (default: rows with a prompt token); other rows get length 0.
    on_tokens: streaming, `on_tokens(tokens [B], active [B])` after each step, through an ordered host callback
      (one device only).

    Returns `(tokens, logprobs, lengths)`:
      tokens `[B, max_new_tokens]` int32: row b holds `lengths[b]` sampled tokens, then `pad_id`;
      logprobs `[B, max_new_tokens]` float32: `token_log_probs(logits, token, sampling.logprob_temperature)`, i.e.
        log p(token) under the full distribution `softmax(logits / T)` (T = the sampling temperature, 1 when greedy)
        before top-k / top-p truncation and the `min_new_tokens` mask, as a forward pass over prompt + completion
        gives it; 0 after the end of a row;
      lengths `[B]` int32.
    Raises JaxalignError (while tracing) when the prompt arrays are not all `[B, P]` or a static setting is out of
    range.
    """
    batch, length = _checked_prompt_arrays(input_ids, segment_ids, positions, active)
    if max_new_tokens < 1:
        raise JaxalignError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(min_new_tokens, int) and not 0 <= min_new_tokens <= max_new_tokens:
        raise JaxalignError(f"min_new_tokens must be in 0..max_new_tokens={max_new_tokens}, got {min_new_tokens}")
    if active is None:
        active = jnp.any(segment_ids != 0, axis=1)
    stop_token_ids = jnp.asarray(stop_token_ids, jnp.int32).reshape(-1)
    variables = {"params": params}

    cache = _constrain_cache(init_cache(model.config, batch, length + max_new_tokens))
    hidden, cache = model.apply(variables, input_ids, positions, segment_ids, cache, method=_trunk)
    logits = model.apply(variables, hidden[:, -1], method="logits")

    def pick(step, logits, rng, done, tokens, logprobs, lengths):
        rng, key = jax.random.split(rng)
        is_stop = _is_in(jnp.arange(logits.shape[-1]), stop_token_ids)
        allowed = jnp.where(is_stop[None, :] & (step < min_new_tokens), -jnp.inf, logits)
        token = jnp.where(done, pad_id, sample_logits(key, allowed, sampling))
        logprob = jnp.where(done, 0.0, token_log_probs(logits, token, sampling.logprob_temperature))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
        logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, logprob[:, None], step, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        if on_tokens is not None:
            jax.debug.callback(on_tokens, token, ~done, ordered=True)
        done = done | _is_in(token, stop_token_ids)
        return token, rng, done, tokens, logprobs, lengths

    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32)
    lengths = jnp.zeros((batch,), jnp.int32)
    first = pick(0, logits, rng, ~active, tokens, logprobs, lengths)

    def cond(state):
        step, _, _, (_, _, done, *_) = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, positions, (token, rng, done, tokens, logprobs, lengths) = state
        logits, cache = model.apply(variables, token[:, None], positions[:, None], jnp.ones_like(token)[:, None], cache)
        picked = pick(step, logits[:, 0], rng, done, tokens, logprobs, lengths)
        return step + 1, _constrain_cache(cache), positions + 1, picked

    state = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, positions[:, -1] + 1, first))
    _, _, _, (_, _, _, tokens, logprobs, lengths) = state
    return tokens, logprobs, lengths


def _checked_prompt_arrays(input_ids, segment_ids, positions, active) -> tuple[int, int]:
    shapes = {"input_ids": input_ids.shape, "segment_ids": segment_ids.shape, "positions": positions.shape}
    if len(input_ids.shape) != 2 or len(set(shapes.values())) != 1:
        described = ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())
        raise JaxalignError(f"decode needs input_ids, segment_ids and positions of one shape [B, P]; got {described}")
    batch, length = input_ids.shape
    if active is not None and tuple(active.shape) != (batch,):
        raise JaxalignError(f"decode: active must have shape [B] = ({batch},), got {tuple(active.shape)}")
    return batch, length


_KV_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


def _constrain_cache(cache: dict) -> dict:
    """Shards the KV cache by the logical rules in context (a no-op without a mesh)."""
    return {**cache, **{name: nn.with_logical_constraint(cache[name], _KV_AXES) for name in ("k", "v")}}


def _trunk(module, input_ids, positions, segment_ids, cache):
    return module.model(input_ids, positions, segment_ids, cache)


def _is_in(values: jax.Array, ids: jax.Array) -> jax.Array:
    """Elementwise: is the value one of `ids` (which may be empty)."""
    return jnp.any(values[..., None] == ids, axis=-1)


def generate(
    model,
    params,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    rng: jax.Array | None = None,
    sampling: SamplingParams = SamplingParams(temperature=0.0),
    stop_token_ids: tuple[int, ...] | None = None,
    min_new_tokens: int = 0,
    pad_id: int | None = None,
    truncate_prompts: bool = False,
    min_prompt_bucket: int = 16,
    mesh: Mesh | None = None,
    rules=None,
    on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> Generation:
    """Completes each prompt (a list of token ids) with up to `max_new_tokens` tokens: `decode` on the host's lists.

    Prompts are left-padded (`jaxalign.data.packing.prompt_batch`) to a power-of-two length bucket and the batch to a
    power-of-two size, so calls with similar shapes reuse one compiled `decode`; stop tokens, pad id and
    `min_new_tokens` are runtime inputs, so changing them does not recompile. A row stops after a token in
    `stop_token_ids` (default: the model's EOS ids); stop tokens are masked until `min_new_tokens` tokens exist.
    Sharded params are used where they are (no copies): pass the `mesh` and logical `rules` (default:
    `jaxalign.sharding.DEFAULT_RULES`) they were sharded with; the batch and KV cache are then sharded by the same
    rules and the (small) outputs come back replicated on every process.

    `on_tokens(tokens [B], active [B])` is called from the device loop after each step (for streaming, single device
    only: JAX orders host callbacks on one device); rows beyond `len(prompts)` are batch padding.
    """
    config = model.config
    if max_new_tokens < 1:
        raise JaxalignError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise JaxalignError(f"min_new_tokens must be in 0..max_new_tokens={max_new_tokens}, got {min_new_tokens}")
    if on_tokens is not None and mesh is not None:
        raise JaxalignError("streaming with on_tokens runs on a single device; call generate without a mesh")
    prompts = _checked_prompts(prompts, config, max_new_tokens, truncate_prompts)
    if stop_token_ids is None:
        eos = config.eos_token_id
        stop_token_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    if pad_id is None:
        pad_id = next(t for t in (config.pad_token_id, *stop_token_ids, 0) if t is not None)
    if rng is None:
        if not sampling.greedy:
            raise JaxalignError("sampling with temperature > 0 needs an explicit rng")
        rng = jax.random.key(0)

    if mesh is not None:
        rules = tuple(
            (name, tuple(axes) if isinstance(axes, list) else axes)
            for name, axes in (DEFAULT_RULES.items() if rules is None else rules)
        )
    batch_multiple = 1 if mesh is None else _batch_shards(mesh, rules)
    batch = -(-bucket_size(len(prompts)) // batch_multiple) * batch_multiple
    length = bucket_size(max(len(p) for p in prompts), min_prompt_bucket)
    padded = prompt_batch(prompts + [None] * (batch - len(prompts)), length, pad_id)
    inputs = tuple(padded[key] for key in ("input_ids", "segment_ids", "positions"))

    program = _decode_program(model, max_new_tokens, sampling, mesh, rules, on_tokens)
    settings = (np.asarray(stop_token_ids, np.int32).reshape(-1), np.int32(pad_id), np.int32(min_new_tokens))
    with _sharding_context(mesh, rules):
        if mesh is not None:
            inputs = tuple(jax.device_put(x, batch_sharding(mesh, rules, x.ndim)) for x in inputs)
        tokens, logprobs, lengths = program(params, *inputs, rng, *settings)
    n = len(prompts)
    return Generation(np.asarray(tokens)[:n], np.asarray(logprobs)[:n], np.asarray(lengths)[:n])


def _checked_prompts(prompts, config, max_new_tokens: int, truncate: bool) -> list[list[int]]:
    if len(prompts) == 0:
        raise JaxalignError("no prompts to complete")
    limit = config.max_position_embeddings - max_new_tokens
    if limit < 1:
        raise JaxalignError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{config.max_position_embeddings} positions"
        )
    checked = []
    for i, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise JaxalignError(f"prompt {i} is empty; a prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise JaxalignError(f"prompt {i}: token id {bad[0]} is outside the vocabulary 0..{config.vocab_size - 1}")
        if len(prompt) > limit:
            if not truncate:
                raise JaxalignError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it must have at most "
                    f"{limit} to fit the model's context of {config.max_position_embeddings} positions (or truncate "
                    "prompts, keeping their last tokens)"
                )
            prompt = prompt[-limit:]
        checked.append(prompt)
    return checked


def _batch_shards(mesh: Mesh, rules) -> int:
    spec = batch_sharding(mesh, rules, 1).spec[0]
    if spec is None:
        return 1
    axes = (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)


@contextlib.contextmanager
def _sharding_context(mesh: Mesh | None, rules):
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


@functools.lru_cache(maxsize=32)
def _decode_program(model, max_new_tokens, sampling, mesh, rules, on_tokens):
    """`decode` jitted for one model and set of static settings; jit caches per input shape.

    The mesh and rules are part of the cache key because tracing reads them from the context `generate` sets.
    """

    def program(params, input_ids, segment_ids, positions, rng, stop_token_ids, pad_id, min_new_tokens):
        return decode(
            model, params, input_ids, segment_ids, positions, rng, max_new_tokens=max_new_tokens, sampling=sampling,
            stop_token_ids=stop_token_ids, pad_id=pad_id, min_new_tokens=min_new_tokens, on_tokens=on_tokens,
        )

    if mesh is None:
        return jax.jit(program)
    return jax.jit(program, out_shardings=NamedSharding(mesh, PartitionSpec()))
