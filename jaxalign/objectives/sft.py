"""Supervised fine-tuning: next-token cross-entropy on the trained tokens of an LM batch.

`make_loss_fn(model)` gives the pure `loss_fn(params, batch, rng) -> (objective, metrics)`: the objective is a
`Mean` of the summed negative log-likelihood of the trained tokens over their count, so the loop's division by the
count of the whole global batch yields the mean over trained tokens, independent of how the batch is split over
devices or accumulation steps. `make_algorithm` wraps it as the loop's `Algorithm`.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from jaxalign.errors import JaxalignError
from jaxalign.objectives.logprobs import token_log_probs
from jaxalign.train.algorithm import Algorithm, DataSource, Mean, Trainable


def make_loss_fn(model) -> Callable:
    """The SFT loss of `model` (a `LlamaForCausalLM`).

    With an `rng` the forward pass runs in training mode (dropout, e.g. LIMA's residual dropout, draws from it);
    with `rng=None` it is deterministic, as evaluation needs. Returns `(objective, metrics)`: the objective is the
    summed negative log-likelihood over the trained tokens with their count, and `metrics["correct"]` the share of
    trained tokens whose target is the arg-max prediction (next-token accuracy), both `Mean`s.
    """

    def loss_fn(params, batch: Mapping[str, jax.Array], rng: jax.Array | None):
        deterministic = rng is None
        logits = model.apply(
            {"params": params},
            batch["input_ids"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            deterministic=deterministic,
            rngs=None if deterministic else {"dropout": rng},
        )
        mask = batch["loss_mask"].astype(jnp.float32)
        targets = batch["targets"]
        loss_sum = -jnp.sum(token_log_probs(logits, targets) * mask)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * mask)
        weight = jnp.sum(mask)
        return Mean(loss_sum, weight), {"correct": Mean(correct, weight)}

    return loss_fn


def make_algorithm(model, optimizer, train_data, *, init=None, eval_data=None) -> Algorithm:
    """SFT as the loop runs it: one trainable `model` (a `LlamaForCausalLM`) with `optimizer` (an
    `OptimizerConfig`), starting from `init(shardings) -> params` (default: random), trained on `train_data` (an
    iterable of LM batches with `state_dict()` / `load_state_dict()`); `eval_data()` gives fresh eval batches."""
    loss_fn = make_loss_fn(model)
    return Algorithm(
        trainables={"model": Trainable(model, optimizer, init)},
        loss=lambda params, frozen, batch, rng: loss_fn(params["model"], batch, rng),
        source=DataSource(train_data),
        eval_batches=eval_data,
        eval_derived=perplexity if eval_data is not None else None,
    )


def perplexity(eval_line: dict) -> dict[str, float]:
    """`eval_perplexity` = exp(`eval_loss`), the loop's mean NLL per trained token over the whole eval split."""
    return {"eval_perplexity": math.exp(min(eval_line["eval_loss"], 700.0))}


def resize_embeddings(params, config, new_vocab_size: int):
    """Grows the vocabulary to `new_vocab_size` for added special tokens (Alpaca's `[PAD]`, LIMA's EOT).

    New input-embedding rows and output-projection columns are the mean of the existing ones, so a new token starts
    as an average token rather than noise that would dominate the softmax. Returns `(params, config)`.
    """
    old_vocab_size = config.vocab_size
    if new_vocab_size < old_vocab_size:
        raise JaxalignError(
            f"cannot shrink the vocabulary from {old_vocab_size} to {new_vocab_size} tokens; "
            "the tokenizer has fewer tokens than the model's embedding table"
        )
    if new_vocab_size == old_vocab_size:
        return params, config
    extra = new_vocab_size - old_vocab_size

    def grow(table: jax.Array, axis: int) -> jax.Array:
        mean = jnp.mean(table.astype(jnp.float32), axis=axis, keepdims=True).astype(table.dtype)
        return jnp.concatenate([table, jnp.repeat(mean, extra, axis=axis)], axis=axis)

    trunk = dict(params["model"])
    trunk["embed_tokens"] = {"embedding": grow(trunk["embed_tokens"]["embedding"], axis=0)}
    params = {**params, "model": trunk}
    if "lm_head" in params:
        params["lm_head"] = {"kernel": grow(params["lm_head"]["kernel"], axis=1)}
    return params, dataclasses.replace(config, vocab_size=new_vocab_size)
