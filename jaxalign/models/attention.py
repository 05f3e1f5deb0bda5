"""Scaled dot-product attention of the decoder, in two implementations that give the same result.

- `dense_attention`: the reference. It builds the `[B, Lq, S]` mask and the full float32 `[B, heads, Lq, S]` scores;
  the fastest for decoding (one query per row), but memory grows with `Lq · S`.
- `blockwise_attention`: query blocks of `block` rows against key blocks of `block` columns with an online softmax
  (Rabe & Staats 2021, "Self-attention does not need O(n²) memory"; Dao et al. 2022, FlashAttention). Masks are built
  per block from segment ids, positions and slots; key blocks wholly after a query block's last slot are skipped.
  The backward pass recomputes one query block at a time (`jax.checkpoint`), so forward and backward memory grow
  linearly with the length.

`choose(implementation, query_length)` picks one for `LlamaConfig.attention` ("auto": blockwise for every input of
more than one token per row, dense for decoding; on CPU blockwise is also the faster in training, as it never
materialises the mask or the scores).

Shapes: `q [B, Lq, kv_heads, groups, head_dim]` (query heads grouped by their key/value head), `k`, `v`
`[B, kv_heads, S, head_dim]` (head-major, the KV cache's layout); the result is `[B * Lq, kv_heads * groups, head_dim]` in `q`'s dtype. A query that
may attend to no key (padding, segment 0) gets zeros.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30
IMPLEMENTATIONS = ("auto", "dense", "blockwise")


class MaskInputs(NamedTuple):
    """What decides which keys a query sees: segment ids and positions `[B, Lq]` / `[B, S]` (int32) and the slots
    `[Lq]` / `[S]` (a token's index in the sequence or the KV cache; causality compares slots, the sliding window
    positions). Segment 0 marks padding and empty cache slots."""

    query_segments: jax.Array
    query_positions: jax.Array
    query_slots: jax.Array
    key_segments: jax.Array
    key_positions: jax.Array
    key_slots: jax.Array


def attention_mask(inputs: MaskInputs, sliding_window: int | None) -> jax.Array:
    """Boolean `[B, Lq, S]`: same non-zero segment, key slot <= query slot, and within the sliding window."""
    q_seg, k_seg = inputs.query_segments, inputs.key_segments
    same_segment = (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    causal = inputs.key_slots[None, None, :] <= inputs.query_slots[None, :, None]
    mask = same_segment & causal
    if sliding_window is not None:
        distance = inputs.query_positions[:, :, None] - inputs.key_positions[:, None, :]
        mask = mask & (distance < sliding_window)
    return mask


def choose(implementation: str, query_length: int) -> str:
    """"dense" or "blockwise" for `LlamaConfig.attention` = `implementation` with `query_length` queries per row."""
    if implementation != "auto":
        return implementation
    return "blockwise" if query_length > 1 else "dense"


def dense_attention(q, k, v, mask: jax.Array) -> jax.Array:
    """Attention with the full mask `[B, Lq, S]` and float32 scores (see the module docstring for shapes)."""
    batch, length, kv_heads, groups, head_dim = q.shape
    # Head-major q/k/v: both attention matmuls and their gradients then contract the minor dimension of the
    # [L, S] score tensors, so XLA transposes the small [L, head_dim] operands instead of the scores.
    q = q.transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkgld,bksd->bkgls", q, k).astype(jnp.float32) * (head_dim**-0.5)
    valid = mask[:, None, None, :, :]
    scores = jnp.where(valid, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(jnp.any(valid, axis=-1, keepdims=True), probs, 0.0).astype(v.dtype)
    if length == 1:
        out = jnp.einsum("bkgls,bksd->bkgld", probs, v).transpose(3, 0, 1, 2, 4)
    else:
        out = jnp.einsum("bkgls,bksd->lbkgd", probs, v)
    return out.transpose(1, 0, 2, 3, 4).reshape(batch * length, kv_heads * groups, head_dim)


def _blocks(x: jax.Array, block: int, axis: int, fill=0) -> jax.Array:
    """`x` padded along `axis` to a multiple of `block` and split there: the block index becomes axis 0."""
    length = x.shape[axis]
    padded = -(-length // block) * block
    if padded != length:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, padded - length)
        x = jnp.pad(x, widths, constant_values=fill)
    x = x.reshape(x.shape[:axis] + (padded // block, block) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def blockwise_attention(q, k, v, inputs: MaskInputs, sliding_window: int | None, block: int) -> jax.Array:
    """Attention by tiles of at most `block × block` (queries × keys) with an online softmax and a FlashAttention
    backward pass, never holding more than one tile's scores (see the module docstring for shapes). Equal to
    `dense_attention` up to rounding."""
    batch, length, kv_heads, groups, head_dim = q.shape
    query_block, key_block = min(block, length), min(block, k.shape[2])
    # One barrier over q and the mask inputs makes the masks depend on q: differentiated inside the layer scan, JAX
    # would otherwise hoist the loop-invariant per-tile masks out of the loop as an [nq, nk] stack of tiles.
    q, inputs = jax.lax.optimization_barrier((q, inputs))
    big = jnp.iinfo(jnp.int32).max
    query_info = (
        _blocks(inputs.query_segments, query_block, axis=1),  # padding: segment 0, attends to nothing
        _blocks(inputs.query_positions, query_block, axis=1),
        _blocks(inputs.query_slots, query_block, axis=0, fill=-1),
    )
    key_info = (
        _blocks(inputs.key_segments, key_block, axis=1),  # padding: segment 0, never attended
        _blocks(inputs.key_positions, key_block, axis=1),
        _blocks(inputs.key_slots, key_block, axis=0, fill=big),
    )
    out = _tiled_attention(
        _blocks(q.transpose(0, 2, 3, 1, 4), query_block, axis=3),  # [nq, B, K, G, bq, D]
        _blocks(k, key_block, axis=2),  # [nk, B, K, bk, D]
        _blocks(v, key_block, axis=2),
        query_info,
        key_info,
        sliding_window,
    )
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, -1, kv_heads * groups, head_dim)[:, :length]
    return out.reshape(batch * length, kv_heads * groups, head_dim)


def _tile_mask(query_info, key_info, sliding_window):
    """Boolean `[B, 1, 1, bq, bk]` of one tile, and whether any key of the tile precedes a query (else skip it)."""
    q_seg, q_pos, q_slot = query_info
    k_seg, k_pos, k_slot = key_info
    mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    mask = mask & (k_slot[None, None, :] <= q_slot[None, :, None])
    if sliding_window is not None:
        mask = mask & (q_pos[:, :, None] - k_pos[:, None, :] < sliding_window)
    return mask[:, None, None]


def _reachable(query_info, key_info):
    return jnp.min(key_info[2]) <= jnp.max(query_info[2])


def _tile_scores(q_block, k_block, mask):
    scale = q_block.shape[-1] ** -0.5
    scores = jnp.einsum("bkgqd,bksd->bkgqs", q_block, k_block, preferred_element_type=jnp.float32)
    return jnp.where(mask, scores * scale, MASK_VALUE)


def _forward(q_blocks, k_blocks, v_blocks, query_info, key_info, sliding_window):
    """Blocked outputs `[nq, B, K, G, bq, D]` and the log-sum-exp of each query's scores `[nq, B, K, G, bq]`
    (float32; `inf` for a query that sees no key, so that its recomputed probabilities are 0)."""

    def query_block(args):
        q_block, q_info = args
        stats_shape = q_block.shape[:-1]
        start = (
            jnp.full(stats_shape, MASK_VALUE, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros(q_block.shape, jnp.float32),
        )

        def key_block(carry, xs):
            k_block, v_block, k_info = xs

            def update(carry):
                running_max, denominator, accumulator = carry
                mask = _tile_mask(q_info, k_info, sliding_window)
                scores = _tile_scores(q_block, k_block, mask)
                new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
                probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
                correction = jnp.exp(running_max - new_max)
                denominator = denominator * correction + jnp.sum(probs, axis=-1)
                update = jnp.einsum("bkgqs,bksd->bkgqd", probs.astype(v_block.dtype), v_block,
                                    preferred_element_type=jnp.float32)
                return new_max, denominator, accumulator * correction[..., None] + update

            return jax.lax.cond(_reachable(q_info, k_info), update, lambda c: c, carry), None

        (running_max, denominator, accumulator), _ = jax.lax.scan(key_block, start, (k_blocks, v_blocks, key_info))
        seen = denominator > 0
        out = jnp.where(seen[..., None], accumulator / jnp.where(seen, denominator, 1.0)[..., None], 0.0)
        log_sum_exp = jnp.where(seen, running_max + jnp.log(jnp.where(seen, denominator, 1.0)), jnp.inf)
        return out.astype(q_block.dtype), log_sum_exp

    return jax.lax.map(query_block, (q_blocks, query_info))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _tiled_attention(q_blocks, k_blocks, v_blocks, query_info, key_info, sliding_window):
    return _forward(q_blocks, k_blocks, v_blocks, query_info, key_info, sliding_window)[0]


def _tiled_attention_forward(q_blocks, k_blocks, v_blocks, query_info, key_info, sliding_window):
    out, log_sum_exp = _forward(q_blocks, k_blocks, v_blocks, query_info, key_info, sliding_window)
    return out, (q_blocks, k_blocks, v_blocks, query_info, key_info, out, log_sum_exp)


def _tiled_attention_backward(sliding_window, residuals, d_out):
    """FlashAttention's backward pass (Dao et al. 2022, Algorithm 4): per key block, the scores of every reachable
    query block are recomputed from the saved log-sum-exp; dK and dV accumulate over query blocks, dQ over key
    blocks."""
    q_blocks, k_blocks, v_blocks, query_info, key_info, out, log_sum_exp = residuals
    scale = q_blocks.shape[-1] ** -0.5
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [nq, B, K, G, bq]

    def key_block(d_q, xs):
        k_block, v_block, k_info = xs

        def query_block(carry, ys):
            q_block, d_out_block, lse_block, delta_block, q_info = ys

            def update(carry):
                d_k, d_v = carry
                mask = _tile_mask(q_info, k_info, sliding_window)
                scores = _tile_scores(q_block, k_block, mask)
                probs = jnp.where(mask, jnp.exp(scores - lse_block[..., None]), 0.0)
                d_v = d_v + jnp.einsum("bkgqs,bkgqd->bksd", probs.astype(d_out_block.dtype), d_out_block,
                                       preferred_element_type=jnp.float32)
                d_probs = jnp.einsum("bkgqd,bksd->bkgqs", d_out_block, v_block, preferred_element_type=jnp.float32)
                d_scores = probs * (d_probs - delta_block[..., None]) * scale
                d_k = d_k + jnp.einsum("bkgqs,bkgqd->bksd", d_scores.astype(q_block.dtype), q_block,
                                       preferred_element_type=jnp.float32)
                d_q_block = jnp.einsum("bkgqs,bksd->bkgqd", d_scores.astype(k_block.dtype), k_block,
                                       preferred_element_type=jnp.float32)
                return (d_k, d_v), d_q_block

            def skip(carry):
                return carry, jnp.zeros(q_block.shape, jnp.float32)

            return jax.lax.cond(_reachable(q_info, k_info), update, skip, carry)

        zeros = jnp.zeros(k_block.shape, jnp.float32)
        (d_k, d_v), d_q_parts = jax.lax.scan(
            query_block, (zeros, zeros), (q_blocks, d_out, log_sum_exp, delta, query_info)
        )
        return d_q + d_q_parts, (d_k.astype(k_block.dtype), d_v.astype(v_block.dtype))

    d_q, (d_k, d_v) = jax.lax.scan(key_block, jnp.zeros(q_blocks.shape, jnp.float32),
                                   (k_blocks, v_blocks, key_info))
    return d_q.astype(q_blocks.dtype), d_k, d_v, None, None


_tiled_attention.defvjp(_tiled_attention_forward, _tiled_attention_backward)
