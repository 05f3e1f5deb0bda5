"""Scalar heads on the LLaMA trunk: per-token scores for reward models and PPO value functions."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign.models.llama import LlamaConfig, LlamaModel


class LlamaForScore(nn.Module):
    """Trunk + linear scalar head. Returns float32 scores `[B, L]`, one per token (read the last token of each
    sequence for a reward, every token for a value). Params: `model` (same tree as in `LlamaForCausalLM`) and
    `score/kernel [embed]`, `score/bias []`."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, positions=None, segment_ids=None, deterministic=True):
        cfg = self.config
        hidden = LlamaModel(cfg, name="model")(input_ids, positions, segment_ids, None, deterministic)
        return ScoreHead(cfg, name="score")(hidden)


class ScoreHead(nn.Module):
    """`hidden [B, L, embed] -> [B, L]` in float32; weights start small so initial scores are near zero."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, hidden):
        cfg = self.config
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(1.0 / (cfg.hidden_size + 1) ** 0.5), ("embed",)),
            (cfg.hidden_size,),
            cfg.params_dtype,
        )
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (), cfg.params_dtype)
        scores = jnp.einsum("ble,e->bl", hidden, kernel.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(scores + bias.astype(jnp.float32), ("batch", "length"))


def score_params_from_causal_lm(lm_params: dict, score_params: dict) -> dict:
    """Score-model params whose trunk is taken from a causal LM (e.g. the SFT model), keeping the given head."""
    return {"model": lm_params["model"], "score": score_params["score"]}


def last_token_scores(scores: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The score at the last non-padding token of each row `[B]` (rows hold one example, padding has segment 0,
    left or right)."""
    slots = jnp.arange(scores.shape[1])
    last = jnp.max(jnp.where(segment_ids != 0, slots, -1), axis=1)
    return jnp.take_along_axis(scores, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
