"""Scalar heads on the LLaMA trunk: per-token scores for reward models and PPO value functions."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign.errors import JaxalignError
from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM, LlamaModel

# What sits on the trunk: next-token logits (`LlamaForCausalLM`) or one scalar per token (`LlamaForScore`).
HEADS = ("causal_lm", "score")


class LlamaForScore(nn.Module):
    """Trunk + linear scalar head. Returns float32 scores `[B, L]`, one per token (read the last token of each
    sequence for a reward, every token for a value). Params: `model` (same tree as in `LlamaForCausalLM`) and
    `score/kernel [embed]`: a bias-free linear map, as transformers' `LlamaForSequenceClassification` (num_labels 1,
    `score.weight [1, embed]`) holds it."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, positions=None, segment_ids=None, deterministic=True):
        cfg = self.config
        hidden = LlamaModel(cfg, name="model")(input_ids, positions, segment_ids, None, deterministic)
        return ScoreHead(cfg, name="score")(hidden)


class ScoreHead(nn.Module):
    """`hidden [B, L, embed] -> [B, L]` in float32, no bias; the kernel starts as N(0, 1/(embed + 1)), so initial
    scores are near zero."""

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
        scores = jnp.einsum("ble,e->bl", hidden, kernel.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(scores, ("batch", "length"))


def model_for_head(config: LlamaConfig, head: str) -> nn.Module:
    """`LlamaForCausalLM(config)` for head "causal_lm", `LlamaForScore(config)` for "score"."""
    if head not in HEADS:
        raise JaxalignError(f"head {head!r}: expected one of {', '.join(HEADS)}")
    return LlamaForCausalLM(config) if head == "causal_lm" else LlamaForScore(config)


def init_score_head(config: LlamaConfig, rng: jax.Array, shardings=None) -> dict:
    """Fresh `score` params (`kernel [embed]`, `config.param_dtype`) created directly on `shardings` (a
    `{"kernel"}` pytree of shardings; default: the first local device)."""

    def init(rng):
        with nn.logical_axis_rules(()):
            hidden = jnp.zeros((1, 1, config.hidden_size), config.compute_dtype)
            return nn.meta.unbox(ScoreHead(config).init(rng, hidden)["params"])

    return jax.jit(init, out_shardings=shardings)(rng)


def score_params_from_causal_lm(lm_params: dict, score_params: dict) -> dict:
    """Score-model params whose trunk is taken from a causal LM (e.g. the SFT model), keeping the given head."""
    return {"model": lm_params["model"], "score": score_params["score"]}


def last_token_scores(scores: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The score at the last non-padding token of each row `[B]` (rows hold one example, padding has segment 0,
    left or right)."""
    slots = jnp.arange(scores.shape[1])
    last = jnp.max(jnp.where(segment_ids != 0, slots, -1), axis=1)
    return jnp.take_along_axis(scores, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
