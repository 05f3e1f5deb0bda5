"""The LLaMA-family decoder (Llama 1/2/3, Mistral, Qwen2, SmolLM) as pure-functional `flax.linen` modules.

Architecture differences are config fields, not subclasses: grouped-query attention (`num_kv_heads`), q/k/v bias
(`attention_bias`, Qwen2), RoPE scaling (`rope_scaling` in Hugging Face style), sliding-window attention
(`sliding_window`, Mistral), tied embeddings, and a `head_dim` that differs from `hidden_size // num_heads`.

Parameter tree of `LlamaForCausalLM` (with `scan_layers=True` every leaf under `layers` gains a leading layer axis;
with `scan_layers=False` the layers are `layers_0`, `layers_1`, ...)::

    model/embed_tokens/embedding                 [vocab, embed]
    model/layers/input_layernorm/scale           [embed]
    model/layers/self_attn/{q,k,v}_proj/kernel   [embed, heads | kv_heads, head_dim]   (+ bias [heads, head_dim])
    model/layers/self_attn/o_proj/kernel         [heads, head_dim, embed]
    model/layers/post_attention_layernorm/scale  [embed]
    model/layers/mlp/{gate,up}_proj/kernel       [embed, mlp]
    model/layers/mlp/down_proj/kernel            [mlp, embed]
    model/norm/scale                             [embed]
    lm_head/kernel                               [embed, vocab]   (absent with tied embeddings)

KV cache (see `init_cache`): `k`, `v` stack the per-layer caches on a leading layer axis, head-major as attention
reads them, `[num_layers, batch, num_kv_heads, max_length, head_dim]`, so `cache["k"][i]` is layer i's cache. The
stacked arrays travel through the layer scan and each layer writes its new tokens into them in place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.errors import JaxalignError
from jaxalign.models import attention

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture plus numerics of one LLaMA-family model; field names follow Hugging Face where they exist."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Activation checkpointing of each layer. "dots" also saves the attention's score matmuls, so its memory grows
    # with the square of the length even with blockwise attention; "dots_no_batch" saves the projections only.
    remat: Literal["none", "full", "dots", "dots_no_batch", "nothing_saveable"] = "none"
    scan_layers: bool = True
    # How attention is computed (`jaxalign.models.attention`): "dense", "blockwise" in tiles of at most
    # `attention_block` queries x keys, or "auto" (blockwise, but dense when decoding one token per row).
    attention: Literal["auto", "dense", "blockwise"] = "auto"
    attention_block: int = 512
    # Positions per slice when log-probs are computed from hidden states (`jaxalign.objectives.logprobs`); None
    # picks slices whose float32 logits hold about 2**25 values.
    logits_chunk_length: int | None = None
    residual_dropout: tuple[float, float] = (0.0, 0.0)
    # Low-rank adapters (`jaxalign.models.lora`): rank 0 = none; set them with `lora.apply_to`.
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise JaxalignError(
                    f"model config: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise JaxalignError(
                f"model config: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise JaxalignError(
                    f"model config: rope_scaling.rope_type={rope_type!r} is not supported; expected one of {ROPE_TYPES}"
                )
        if self.attention not in attention.IMPLEMENTATIONS:
            raise JaxalignError(
                f"model config: attention={self.attention!r}; expected one of {attention.IMPLEMENTATIONS}"
            )
        for key in ("attention_block", "logits_chunk_length"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise JaxalignError(f"model config: {key}={value!r}; expected a positive integer")
        if len(self.residual_dropout) != 2 or not all(0.0 <= r < 1.0 for r in self.residual_dropout):
            raise JaxalignError(
                f"model config: residual_dropout={self.residual_dropout!r}; expected (first_layer_rate, "
                "last_layer_rate) with rates in [0, 1)"
            )

    def __hash__(self):
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in values))

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    def layer_dropout_rates(self) -> np.ndarray:
        """Residual dropout rate of each layer, linear in depth from the first to the last layer."""
        first, last = self.residual_dropout
        if self.num_layers == 1:
            return np.array([first], np.float32)
        return np.linspace(first, last, self.num_layers, dtype=np.float32)

    @classmethod
    def tiny(cls, **overrides) -> LlamaConfig:
        """A small config for tests: 2 layers, hidden 64, GQA with 4 query and 2 key/value heads."""
        values = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        values.update(overrides)
        return cls(**values)


def rope_inverse_frequencies(config: LlamaConfig, max_positions: jax.Array | None = None) -> jax.Array:
    """Inverse RoPE frequencies `[head_dim // 2]` in float32, computed as `transformers` does for each rope type.

    `max_positions` (largest position + 1 in the current call) only matters for dynamic NTK scaling, where the base
    grows once a sequence exceeds `max_position_embeddings`. transformers keeps the grown frequencies across calls
    until a shorter sequence resets them; here each call uses its own longest position (the same during prefill
    and monotone decoding).
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    scaling = config.rope_scaling or {}
    rope_type = config.rope_type
    if rope_type == "dynamic":
        factor = jnp.float32(scaling["factor"])
        max_pos = config.max_position_embeddings
        seq_len = jnp.maximum(jnp.asarray(max_positions if max_positions is not None else max_pos), max_pos)
        base = config.rope_theta * ((factor * seq_len.astype(jnp.float32) / max_pos) - (factor - 1)) ** (
            dim / (dim - 2)
        )
        return 1.0 / (base.astype(jnp.float32) ** jnp.asarray(exponents))
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
        smooth = ((old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).astype(
            np.float32
        )
        smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
    return jnp.asarray(inv_freq, jnp.float32)


def rope_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`cos`, `sin` of shape `[B, L, head_dim]` in float32 (the half-size table repeated, as in `rotate_half`)."""
    inv_freq = rope_inverse_frequencies(config, jnp.max(positions) + 1)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x` `[B, L, heads, head_dim]` in float32 with the `rotate_half` convention of transformers."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype: Any = None) -> dict:
    """An empty KV cache: `k`, `v` `[num_layers, B, num_kv_heads, max_length, head_dim]`, `segment_ids` and
    `positions` `[B, max_length]` (segment 0 marks an empty slot) and `index`, the next slot to write."""
    dtype = config.compute_dtype if dtype is None else jnp.dtype(dtype)
    shape = (config.num_layers, batch_size, config.num_kv_heads, max_length, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
        "positions": jnp.zeros((batch_size, max_length), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def _param_init(init, names):
    # rules=(): parameters get their shardings from jit, never from a constraint at unbox time; a constraint there
    # breaks DenseGeneral's flat-then-reshaped kernel init (which flax also runs abstractly during apply).
    return nn.with_logical_partitioning(init, names, rules=())


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, then scaled by a learned weight (as LlamaRMSNorm)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", _param_init(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.config.params_dtype
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return scale.astype(self.config.compute_dtype) * normed.astype(self.config.compute_dtype)


def _dense(config: LlamaConfig, features, names, name, axis=-1, bias=False):
    bias_names = names[-len(features) :] if isinstance(features, tuple) else names[-1:]
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=bias,
        dtype=config.compute_dtype,
        param_dtype=config.params_dtype,
        kernel_init=_param_init(nn.initializers.normal(0.02), names),
        bias_init=_param_init(nn.initializers.zeros, bias_names),
        name=name,
    )


class LoraAdapter(nn.Module):
    """The low-rank update `(α / r) · dropout(x) A B` of one projection (see `jaxalign.models.lora`): `x` is
    `[N, *in_shape]`, the result `[N, *out_shape]` in the compute dtype; A and B are float32 parameters."""

    config: LlamaConfig
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    out_shape: tuple[int, ...]
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        in_shape = x.shape[1:]
        in_axes = tuple(range(len(in_shape)))
        a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=in_axes, out_axis=-1)
        # float32 whatever the base's dtype: the adapters are what trains
        a = self.param("lora_a", _param_init(a_init, self.in_names + ("lora_rank",)), in_shape + (cfg.lora_rank,),
                       jnp.float32)
        b = self.param("lora_b", _param_init(nn.initializers.zeros, ("lora_rank",) + self.out_names),
                       (cfg.lora_rank,) + self.out_shape, jnp.float32)
        if cfg.lora_dropout and not self.deterministic:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - cfg.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0.0).astype(x.dtype)
        dtype = cfg.compute_dtype
        low = jnp.tensordot(x.astype(dtype), a.astype(dtype), axes=(tuple(range(1, x.ndim)), in_axes))
        update = jnp.tensordot(low, b.astype(dtype), axes=((1,), (0,)))
        return update * jnp.asarray(cfg.lora_alpha / cfg.lora_rank, dtype)


def _project(module: nn.Module, x, features, names, name, axis=-1, bias=False, deterministic=True):
    """`x [N, ...]` through the projection `name` (a DenseGeneral over `axis`), plus its low-rank adapter when the
    config targets it."""
    cfg = module.config
    out = _dense(cfg, features, names, name, axis=axis, bias=bias)(x)
    if cfg.lora_rank and name in cfg.lora_targets:
        out_shape = features if isinstance(features, tuple) else (features,)
        n_in = len(names) - len(out_shape)
        out = out + LoraAdapter(cfg, tuple(names[:n_in]), tuple(names[n_in:]), out_shape, deterministic,
                                name=f"{name}_lora")(x)
    return out


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads, RoPE, segment masks and an optional KV-cache layer.

    Projections (here, in `MLP` and in `LMHead`) run on `[B * L, ...]` token matrices: a weight gradient then
    contracts a single token dimension, where a `[B, L, ...]` dot_general makes XLA on CPU write transposed copies of
    the activations (a fifth of a training step's time).
    """

    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, cos, sin, masking, cache_kv=None, layer=None, cache_index=None):
        cfg = self.config
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        batch, length = x.shape[:2]
        tokens = x.reshape(batch * length, x.shape[-1])
        bias, det = cfg.attention_bias, self.deterministic
        q = _project(self, tokens, (heads, head_dim), ("embed", "heads", "head_dim"), "q_proj", bias=bias,
                     deterministic=det)
        k = _project(self, tokens, (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), "k_proj", bias=bias,
                     deterministic=det)
        v = _project(self, tokens, (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), "v_proj", bias=bias,
                     deterministic=det)
        q = q.reshape(batch, length, heads, head_dim)
        k = k.reshape(batch, length, kv_heads, head_dim)
        v = v.reshape(batch, length, kv_heads, head_dim)
        q = nn.with_logical_constraint(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        new_kv = None
        if cache_kv is not None:
            # Write this layer's new keys and values into the stacked cache [layers, B, K, S, D] and read its layer
            # back: an update of the scan's carry that XLA performs in place.
            new_kv = tuple(
                jax.lax.dynamic_update_slice(stacked, new[None].astype(stacked.dtype), (layer, 0, 0, cache_index, 0))
                for stacked, new in zip(cache_kv, (k, v))
            )
            k, v = (jax.lax.dynamic_index_in_dim(stacked, layer, keepdims=False).astype(q.dtype)
                    for stacked in new_kv)

        q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
        mask, mask_inputs = masking
        if mask is not None:
            out = attention.dense_attention(q, k, v, mask)
        else:
            out = attention.blockwise_attention(q, k, v, mask_inputs, cfg.sliding_window, cfg.attention_block)
        out = _project(self, out, cfg.hidden_size, ("heads", "head_dim", "embed"), "o_proj", axis=(-2, -1),
                       deterministic=det)
        out = out.reshape(batch, length, cfg.hidden_size)
        return out, new_kv


class MLP(nn.Module):
    """SwiGLU feed-forward block."""

    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        det = self.deterministic
        tokens = x.reshape(-1, x.shape[-1])
        gate = _project(self, tokens, cfg.intermediate_size, ("embed", "mlp"), "gate_proj", deterministic=det)
        up = _project(self, tokens, cfg.intermediate_size, ("embed", "mlp"), "up_proj", deterministic=det)
        hidden = (nn.silu(gate) * up).reshape(x.shape[:-1] + (cfg.intermediate_size,))
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        out = _project(self, hidden.reshape(tokens.shape[0], -1), cfg.hidden_size, ("mlp", "embed"), "down_proj",
                       deterministic=det)
        return out.reshape(x.shape[:-1] + (cfg.hidden_size,))


def _residual_dropout(module: nn.Module, x, rate, deterministic: bool):
    """Dropout whose rate may be a traced per-layer value (scanned layers share one module)."""
    if deterministic or max(module.config.residual_dropout) == 0.0:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU block. Call signature fits `nn.scan`: `((hidden, kv), (dropout_rate, layer)) ->
    ((hidden, kv), None)`, `kv` the stacked KV cache `(k, v)` or None."""

    config: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, carry, per_layer, cos, sin, masking, cache_index):
        hidden, cache_kv = carry
        dropout_rate, layer = per_layer
        residual = hidden
        attn_out, new_kv = Attention(self.config, self.deterministic, name="self_attn")(
            RMSNorm(self.config, name="input_layernorm")(hidden), cos, sin, masking, cache_kv, layer, cache_index
        )
        hidden = residual + _residual_dropout(self, attn_out, dropout_rate, self.deterministic)
        mlp_out = MLP(self.config, self.deterministic, name="mlp")(RMSNorm(self.config, name="post_attention_layernorm")(hidden))
        hidden = hidden + _residual_dropout(self, mlp_out, dropout_rate, self.deterministic)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "embed"))
        return (hidden, new_kv), None


def _check_cache_room(cache: dict, length: int) -> None:
    """Writing past the end would silently overwrite earlier slots (XLA clamps the update), so refuse it whenever
    the write position is known (always outside jit)."""
    max_length = cache["segment_ids"].shape[1]
    try:
        end = int(cache["index"]) + length
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        end = length
    if end > max_length:
        raise JaxalignError(
            f"KV cache: writing {length} tokens at slot {end - length} needs {end} slots, the cache has "
            f"{max_length}; make init_cache(max_length=...) larger"
        )


def _layer_class(config: LlamaConfig):
    if config.remat == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=REMAT_POLICIES[config.remat], prevent_cse=not config.scan_layers)


class LlamaModel(nn.Module):
    """The trunk: embeddings, decoder layers, final norm. Returns hidden states `[B, L, hidden]` (and the new cache
    when `cache` is given)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, positions=None, segment_ids=None, cache=None, deterministic=True):
        cfg = self.config
        batch, length = input_ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        start = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
        segment_ids = segment_ids.astype(jnp.int32)
        positions = positions.astype(jnp.int32)
        query_slots = start + jnp.arange(length, dtype=jnp.int32)

        if cache is None:
            mask_inputs = attention.MaskInputs(segment_ids, positions, query_slots, segment_ids, positions, query_slots)
            cache_kv = None
            new_cache = None
        else:
            _check_cache_room(cache, length)
            cache_segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, start, axis=1)
            cache_positions = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, start, axis=1)
            key_slots = jnp.arange(cache_segments.shape[1], dtype=jnp.int32)
            mask_inputs = attention.MaskInputs(segment_ids, positions, query_slots, cache_segments, cache_positions,
                                               key_slots)
            cache_kv = (cache["k"], cache["v"])
            new_cache = {"segment_ids": cache_segments, "positions": cache_positions, "index": start + length}
        if attention.choose(cfg.attention, length) == "dense":
            masking = (attention.attention_mask(mask_inputs, cfg.sliding_window), mask_inputs)
        else:
            masking = (None, mask_inputs)

        cos, sin = rope_tables(cfg, positions)
        embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            embedding_init=_param_init(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="embed_tokens",
        )
        hidden = embed_tokens(input_ids.astype(jnp.int32))
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "embed"))
        rates = jnp.asarray(cfg.layer_dropout_rates())
        layer_cls = _layer_class(cfg)

        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        if cfg.scan_layers:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            (hidden, cache_kv), _ = scanned(cfg, deterministic, name="layers")(
                (hidden, cache_kv), (rates, layers), cos, sin, masking, start
            )
        else:
            for i in range(cfg.num_layers):
                (hidden, cache_kv), _ = layer_cls(cfg, deterministic, name=f"layers_{i}")(
                    (hidden, cache_kv), (rates[i], i), cos, sin, masking, start
                )

        hidden = RMSNorm(cfg, name="norm")(hidden)
        if cache is None:
            return hidden
        new_cache["k"], new_cache["v"] = cache_kv
        return hidden, new_cache


class LMHead(nn.Module):
    """Untied output projection; the matmul accumulates in float32 so logits are float32 in any compute dtype."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, hidden):
        cfg = self.config
        kernel = self.param(
            "kernel",
            _param_init(nn.initializers.normal(0.02), ("embed", "vocab")),
            (cfg.hidden_size, cfg.vocab_size),
            cfg.params_dtype,
        )
        tokens = hidden.reshape(-1, hidden.shape[-1])
        logits = jnp.dot(tokens, kernel.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
        return logits.reshape(hidden.shape[:-1] + (cfg.vocab_size,))


class LlamaForCausalLM(nn.Module):
    """Trunk + language-model head. Returns float32 logits `[B, L, vocab]`, and `(logits, new_cache)` with a cache."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = LMHead(cfg)

    def __call__(self, input_ids, positions=None, segment_ids=None, cache=None, deterministic=True):
        out = self.model(input_ids, positions, segment_ids, cache, deterministic)
        hidden, new_cache = (out, None) if cache is None else out
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)

    def hidden_states(self, input_ids, positions=None, segment_ids=None, deterministic=True):
        """The trunk's final hidden states `[B, L, hidden]` in the compute dtype: `logits` of them are the logits
        of `__call__` (`jaxalign.objectives.logprobs` applies the head to a slice of positions at a time)."""
        return self.model(input_ids, positions, segment_ids, None, deterministic)

    def logits(self, hidden):
        """Float32 logits `[..., vocab]` from final hidden states `[..., hidden]` (the tied embedding or the head);
        `model.apply(..., method="logits")` lets a sampler apply the head to the last position only."""
        if self.config.tie_word_embeddings:
            embedding = nn.meta.unbox(self.model.variables["params"]["embed_tokens"]["embedding"])
            embedding = embedding.astype(self.config.compute_dtype)
            tokens = hidden.reshape(-1, hidden.shape[-1])
            logits = jnp.einsum("te,ve->tv", tokens, embedding, preferred_element_type=jnp.float32)
            logits = logits.reshape(hidden.shape[:-1] + (self.config.vocab_size,))
        else:
            logits = self.lm_head(hidden)
        if logits.ndim == 3:
            logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits


def per_layer_params(params: dict) -> dict:
    """The params of a `scan_layers=True` model (a leading layer axis under `model/layers`) as the same model with
    `scan_layers=False` takes them (`model/layers_0`, `model/layers_1`, ...), other entries unchanged.

    `params` is consumed: its stacked leaves are split and dropped one at a time, so the weights are held about
    once. Inference prefers this layout on CPU, where a decoding step of the scanned model copies each layer's
    weights out of the stack before its matrix products (`benchmarks/generate_throughput.py --breakdown`).
    """
    leaves, treedef = jax.tree.flatten(params["model"].pop("layers"))
    columns = []
    while leaves:
        columns.append(list(leaves.pop(0)))
    for i, layer in enumerate(zip(*columns)):
        params["model"][f"layers_{i}"] = jax.tree.unflatten(treedef, layer)
    return params


def logical_axes(model: nn.Module, *example_args, **example_kwargs) -> Any:
    """PartitionSpec pytree of logical axis names matching the params of `model` (traced abstractly, no FLOPs).

    With no example arguments a `[1, 1]` token batch is used.
    """
    if not example_args and "input_ids" not in example_kwargs:
        example_args = (jnp.zeros((1, 1), jnp.int32),)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example_args, **example_kwargs))
    return nn.get_partition_spec(shapes)["params"]
