"""`jaxalign score --model PATH --data FILE.jsonl`: log-probability and perplexity of each line's text."""

import argparse
import json
import math
import sys
from pathlib import Path

from jaxalign import storage
from jaxalign.commands.jsonl import read_objects
from jaxalign.errors import JaxalignError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=storage.location, required=True,
                        help="HF model folder or jaxalign model checkpoint")
    parser.add_argument("--data", type=storage.location, required=True, help='JSONL file, one {"text": ...} per line')
    parser.add_argument("--out", type=storage.location, default=None,
                        help="write the JSON lines here (default: stdout)")
    parser.add_argument("--tokenizer", type=storage.location, default=None,
                        help="tokenizer folder (default: the model folder)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="longest allowed text in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute/param dtype")


def read_texts(path: Path) -> list[str]:
    texts = []
    for line_number, record in read_objects(path, "data file"):
        if not isinstance(record.get("text"), str):
            raise JaxalignError(f"{path}:{line_number}: expected an object with a string 'text'")
        texts.append(record["text"])
    if not texts:
        raise JaxalignError(f"{path}: no lines to score")
    return texts


def bucket_length(length: int, limit: int) -> int:
    """Pad lengths to powers of two (at least 16) so a file compiles a handful of shapes, not one per line."""
    return min(max(16, 1 << (max(length, 1) - 1).bit_length()), max(limit, length))


def sequence_logprob_fn(model):
    """Jitted `(params, ids [B, L], segment_ids [B, L]) -> [B]` sum of log p(token t | tokens < t) for t >= 1."""
    import jax

    import jax.numpy as jnp

    from jaxalign.objectives.logprobs import model_token_log_probs, sequence_log_probs

    @jax.jit
    def sequence_logprobs(params, ids, segment_ids):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1] - 1, dtype=jnp.int32), (ids.shape[0], ids.shape[1] - 1))
        batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": segment_ids[:, :-1],
                 "positions": positions}
        total, _ = sequence_log_probs(model_token_log_probs(model, params, batch), segment_ids[:, 1:])
        return total

    return sequence_logprobs


def score_texts(model, params, tokenizer, texts: list[str], batch_size: int, max_length: int, where: str) -> list[dict]:
    import numpy as np

    token_lists = [tokenizer(text)["input_ids"] for text in texts]
    for number, tokens in enumerate(token_lists, start=1):
        if len(tokens) > max_length:
            raise JaxalignError(f"{where}: text {number} has {len(tokens)} tokens, more than --max-length {max_length}")
    sequence_logprobs = sequence_logprob_fn(model)
    order = sorted(range(len(texts)), key=lambda i: len(token_lists[i]))
    results: list[dict] = [{}] * len(texts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        length = bucket_length(max(len(token_lists[i]) for i in chunk), max_length)
        ids = np.zeros((batch_size, length), np.int32)
        segments = np.zeros((batch_size, length), np.int32)
        for row, i in enumerate(chunk):
            ids[row, : len(token_lists[i])] = token_lists[i]
            segments[row, : len(token_lists[i])] = 1
        sums = np.asarray(sequence_logprobs(params, ids, segments))
        for row, i in enumerate(chunk):
            count = len(token_lists[i])
            logprob = float(sums[row])
            perplexity = math.exp(-logprob / (count - 1)) if count > 1 else None
            results[i] = {"num_tokens": count, "logprob": logprob, "perplexity": perplexity}
    return results


def run(args: argparse.Namespace) -> int:
    from jaxalign.hf import load_tokenizer
    from jaxalign.models.loading import load_model

    if args.batch_size < 1:
        raise JaxalignError(f"--batch-size {args.batch_size}: expected a positive number")
    texts = read_texts(args.data)
    model, params = load_model(args.model, args.dtype, head="causal_lm")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    max_length = args.max_length or model.config.max_position_embeddings
    results = score_texts(model, params, tokenizer, texts, args.batch_size, max_length, str(args.data))
    lines = "".join(json.dumps(r) + "\n" for r in results)
    if args.out is None:
        sys.stdout.write(lines)
    else:
        args.out.write_text(lines)
    predicted = sum(max(r["num_tokens"] - 1, 0) for r in results)
    total = sum(r["logprob"] for r in results)
    corpus_ppl = math.exp(-total / predicted) if predicted else float("nan")
    print(f"scored {len(results)} texts, {predicted} predicted tokens: mean logprob/token "
          f"{total / max(predicted, 1):.4f}, perplexity {corpus_ppl:.3f}", file=sys.stderr)
    return 0
