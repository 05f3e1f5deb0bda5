"""Supervised fine-tuning: next-token cross-entropy on the trained tokens of an LM batch.

`make_loss_fn(model)` gives the pure `loss_fn(params, batch, rng) -> (objective, metrics)`: the objective is a
`Mean` of the summed negative log-likelihood of the trained tokens over their count, so the loop's division by the
count of the whole global batch yields the mean over trained tokens, independent of how the batch is split over
devices or accumulation steps. `make_algorithm` wraps it as the loop's `Algorithm`.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.errors import JaxalignError
from jaxalign.objectives.logprobs import model_token_statistics
from jaxalign.train.algorithm import Algorithm, DataSource, Mean, Trainable


def make_loss_fn(model) -> Callable:
    """The SFT loss of `model` (a `LlamaForCausalLM`).

    With an `rng` the forward pass runs in training mode (dropout, e.g. LIMA's residual dropout, draws from it);
    with `rng=None` it is deterministic, as evaluation needs. Returns `(objective, metrics)`: the objective is the
    summed negative log-likelihood over the trained tokens with their count, and `metrics["correct"]` the share of
    trained tokens whose target is the arg-max prediction (next-token accuracy), both `Mean`s.
    """

    def loss_fn(params, batch: Mapping[str, jax.Array], rng: jax.Array | None):
        stats = model_token_statistics(model, params, batch, rng=rng, correct=True, needed=batch["loss_mask"])
        mask = batch["loss_mask"].astype(jnp.float32)
        loss_sum = -jnp.sum(stats.log_probs * mask)
        correct = jnp.sum(stats.correct * mask)
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


def resize_embeddings(params, config, num_tokens: int, new_ids: Sequence[int] = ()):
    """Fits the embedding tables to a tokenizer of `num_tokens` tokens to which special tokens were added (Alpaca's
    `[PAD]`, LIMA's EOT, `data.added_tokens`), `new_ids` being the added tokens' ids.

    The tables grow to `num_tokens` rows when they have fewer. A table padded past its tokenizer (Qwen2 ships 151,936
    rows for 151,665 tokens) keeps its size, and an added token's id falls on one of its untrained padding rows. The
    rows of tokens that have no trained row (`new_ids`, and ids past the old table) are set, in the input embedding
    and in the output projection, to the mean of the rows of the tokenizer's other tokens, so a new token starts as
    an average token rather than as zeros or noise that would dominate the softmax; padding rows past `num_tokens`
    are neither averaged nor changed. Returns `(params, config)`, the config's `vocab_size` the rows of the tables.
    """
    old_rows = config.vocab_size
    outside = sorted(i for i in new_ids if not 0 <= i < num_tokens)
    if outside:
        raise JaxalignError(f"added token ids {outside} are not ids of a tokenizer with {num_tokens} tokens")
    fresh = np.union1d(np.asarray(new_ids, np.int64), np.arange(old_rows, num_tokens))
    if fresh.size == 0:
        return params, config
    real_rows = min(old_rows, num_tokens)
    fresh_in_table = fresh[fresh < real_rows]
    real_count = real_rows - fresh_in_table.size
    if real_count == 0:
        raise JaxalignError("every token of the tokenizer is new: there are no trained embedding rows to average")
    rows = max(old_rows, num_tokens)

    def fill(table: jax.Array, axis: int) -> jax.Array:
        table_vd = jnp.moveaxis(table, axis, 0)
        if rows > old_rows:
            padding = jnp.zeros((rows - old_rows, *table_vd.shape[1:]), table.dtype)
            table_vd = jnp.concatenate([table_vd, padding])
        values = table_vd.astype(jnp.float32)
        total = jnp.sum(values[:real_rows], axis=0) - jnp.sum(values[fresh_in_table], axis=0)
        mean = (total / real_count).astype(table.dtype)
        return jnp.moveaxis(table_vd.at[fresh].set(mean), 0, axis)

    trunk = dict(params["model"])
    trunk["embed_tokens"] = {"embedding": fill(trunk["embed_tokens"]["embedding"], axis=0)}
    params = {**params, "model": trunk}
    if "lm_head" in params:
        params["lm_head"] = {"kernel": fill(params["lm_head"]["kernel"], axis=1)}
    return params, dataclasses.replace(config, vocab_size=rows)
