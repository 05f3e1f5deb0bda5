"""`jaxalign generate`: complete every prompt of a JSONL file with a model and write the completions as JSONL.

Input lines are `{"prompt": "..."}` or `{"messages": [{"role": ..., "content": ...}, ...]}` (other fields are kept);
each output line repeats the input fields and adds `completion` (text), `tokens` and `logprobs` (log-probabilities
of the completion tokens under the model's distribution at `--temperature`, before top-k / top-p; at temperature 1
when greedy), plus `sample` (0..K-1) when `--num-samples K` is above 1.

Prompts are rendered with the model's chat template (a jaxalign export holds the format it was trained in), with a
built-in template (`--template alpaca`), or, for `prompt` lines with `--no-chat-template`, taken as plain text.
Generation stops at the model's eos ids and the template's end-of-turn token.
"""

import argparse
import json
from pathlib import Path

from jaxalign import storage
from jaxalign.arguments import add_model_arguments, add_sampling_arguments
from jaxalign.commands.jsonl import read_objects
from jaxalign.data.templates import BUILTIN_TEMPLATES, prompt_template
from jaxalign.data.tokenizer import encode_chat, stop_token_ids
from jaxalign.errors import JaxalignError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--prompts", type=storage.location, required=True,
                        help="JSONL file of {prompt} or {messages} lines")
    parser.add_argument("--out", type=storage.location, required=True, help="JSONL file to write")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--min-new-tokens", type=int, default=0, help="stop tokens are masked until this many exist")
    parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    parser.add_argument("--batch-size", type=int, default=16, help="completions generated together")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="tokenize `prompt` as plain text instead of as a user turn of the chat template")
    parser.add_argument("--template", choices=BUILTIN_TEMPLATES, default=None,
                        help="render prompts in this built-in template (as data.template trained it) instead of "
                             "the tokenizer's chat template")
    parser.add_argument("--truncate-prompts", action="store_true",
                        help="keep the last tokens of prompts too long for the context instead of failing")


def read_prompts(path: Path) -> list[tuple[int, dict]]:
    """(line number, JSON object) for each line of a prompts file; each needs a `prompt` string or `messages` list."""
    records = []
    for line_number, record in read_objects(path, "prompts file"):
        if isinstance(record.get("messages"), list):
            for message in record["messages"]:
                if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                        and isinstance(message.get("content"), str)):
                    raise JaxalignError(
                        f"{path}:{line_number}: every entry of 'messages' needs string 'role' and 'content'"
                    )
        elif not isinstance(record.get("prompt"), str):
            raise JaxalignError(f"{path}:{line_number}: expected a 'prompt' string or a 'messages' list")
        records.append((line_number, record))
    if not records:
        raise JaxalignError(f"prompts file {path} contains no prompts")
    return records


def encode_record(tokenizer, record: dict, chat_template: bool) -> list[int]:
    if "messages" in record and isinstance(record["messages"], list):
        return encode_chat(tokenizer, record["messages"])
    if chat_template:
        return encode_chat(tokenizer, [{"role": "user", "content": record["prompt"]}])
    return tokenizer(record["prompt"])["input_ids"]


def run(args: argparse.Namespace) -> int:
    import jax
    from tqdm import tqdm

    from jaxalign.hf import load_tokenizer
    from jaxalign.models.loading import load_model
    from jaxalign.sampling import SamplingParams, generate

    for name in ("max_new_tokens", "num_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise JaxalignError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    numbered = read_prompts(args.prompts)
    records = [record for _, record in numbered]
    model, params = load_model(args.model, args.dtype, head="causal_lm", scan_layers=False)  # faster decoding
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    stops = stop_token_ids(model.config, tokenizer)
    if args.template and args.no_chat_template:
        raise JaxalignError("--template and --no-chat-template exclude each other: choose one")
    if not args.no_chat_template or any(isinstance(r.get("messages"), list) for r in records):
        stops = tuple(dict.fromkeys((*stops, prompt_template(tokenizer, args.template))))
    prompts = [encode_record(tokenizer, record, not args.no_chat_template) for record in records]
    room = model.config.max_position_embeddings - args.max_new_tokens
    for (line, _), prompt in zip(numbered, prompts):
        if not prompt:
            raise JaxalignError(f"{args.prompts}:{line}: the prompt encodes to no tokens")
        if len(prompt) > room and not args.truncate_prompts:
            raise JaxalignError(
                f"{args.prompts}:{line}: the prompt has {len(prompt)} tokens, more than the {room} that fit the "
                f"model's context of {model.config.max_position_embeddings} positions with --max-new-tokens "
                f"{args.max_new_tokens}; shorten it, lower --max-new-tokens, or pass --truncate-prompts"
            )

    jobs = [(i, k) for i in range(len(records)) for k in range(args.num_samples)]
    rng = jax.random.key(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out, tqdm(total=len(records), unit="prompt", desc="generate") as progress:
        for start in range(0, len(jobs), args.batch_size):
            chunk = jobs[start : start + args.batch_size]
            result = generate(
                model, params, [prompts[i] for i, _ in chunk], args.max_new_tokens,
                rng=jax.random.fold_in(rng, start), sampling=sampling, stop_token_ids=stops,
                min_new_tokens=args.min_new_tokens, truncate_prompts=args.truncate_prompts,
            )
            for (i, k), tokens, logprobs in zip(chunk, result.completions(), result.completion_logprobs()):
                line = dict(records[i])
                if args.num_samples > 1:
                    line["sample"] = k
                line["completion"] = tokenizer.decode(tokens, skip_special_tokens=True)
                line["tokens"] = tokens
                line["logprobs"] = logprobs
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            progress.update(len({i for i, k in chunk if k == args.num_samples - 1}))
    return 0
