"""Sampling from LLaMA-family models: samplers on logits, and jitted prefill + decode with a KV cache.

Samplers are pure functions of (rng, logits) and a frozen `SamplingParams`; the order of logits processing is the
one transformers uses: temperature, then top-k, then top-p (nucleus). `temperature == 0` means greedy.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jaxalign.errors import JaxalignError


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


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log p(token) under the model's raw distribution (temperature 1, no top-k / top-p): `[..., V]`, `[...]` -> `[...]`."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logprobs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
