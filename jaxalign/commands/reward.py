"""`jaxalign reward --model RM --data FILE.jsonl [--out FILE]`: a reward model's score for each record.

Records are `{prompt, response}` (prompt a string or a message list) or preference pairs in any format the data
pipeline reads (`{prompt, chosen, rejected, strength?}`, LLaMA-Factory's `{conversations, chosen, rejected}`,
Anthropic-HH `{chosen, rejected}`). Each is rendered with `--template` (default: the model folder's own chat template,
which a jaxalign export carries) and scored at its last token. Output: one JSON line per record, `{"reward": r}` or
`{"reward_chosen", "reward_rejected", "margin"}`; a summary on stderr with the mean reward and, for pairs, the
accuracy (`r_chosen > r_rejected`) overall and per strength.
"""

import argparse
import json
import sys
from pathlib import Path

from jaxalign import storage
from jaxalign.arguments import add_model_arguments
from jaxalign.commands.jsonl import read_objects
from jaxalign.errors import JaxalignError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", type=storage.location, required=True,
                        help="JSONL file of {prompt, response} records or preference pairs")
    parser.add_argument("--out", type=storage.location, default=None,
                        help="write the JSON lines here (default: stdout)")
    parser.add_argument("--template", default="tokenizer",
                        help="template the reward model was trained with (default: the tokenizer's chat template)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="longest conversation in tokens (default: the model's max_position_embeddings)")


def read_examples(path: Path) -> list:
    """Parsed examples: a `Conversation` per `{prompt, response}` record, a `PreferencePair` per pair."""
    from jaxalign.data.formats import detect_format, parse_record
    from jaxalign.rewards import response_example

    examples = []
    for line_number, record in read_objects(path, "data file"):
        origin = f"{path}:{line_number}"
        if "response" in record and "chosen" not in record:
            if "prompt" not in record:
                raise JaxalignError(f"{origin}: field 'prompt' is missing (a scored record is {{prompt, response}})")
            examples.append(response_example(record["prompt"], record["response"], origin))
            continue
        fmt = detect_format(record, origin)
        if fmt not in ("preference", "hh"):
            raise JaxalignError(f"{origin}: expected a {{prompt, response}} record or a preference pair "
                                f"(prompt, chosen, rejected), got a {fmt} record")
        examples.append(parse_record(record, fmt, origin))
    if not examples:
        raise JaxalignError(f"{path}: no records to score")
    return examples


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from jaxalign.config import from_dict
    from jaxalign.data.config import DataConfig
    from jaxalign.data.formats import PreferencePair
    from jaxalign.hf import load_tokenizer
    from jaxalign.models.heads import LlamaForScore
    from jaxalign.models.loading import load_model
    from jaxalign.objectives.reward import STRENGTH_NAMES
    from jaxalign.rewards import ModelReward

    if args.batch_size < 1:
        raise JaxalignError(f"--batch-size {args.batch_size}: expected a positive number")
    examples = read_examples(args.data)
    model, params = load_model(args.model, args.dtype)
    if not isinstance(model, LlamaForScore):
        raise JaxalignError(f"--model {args.model}: a language model, not a reward model (a jaxalign score "
                            "checkpoint or a Hugging Face *ForSequenceClassification); train one with jaxalign rm")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    data_config = from_dict(DataConfig, {"template": args.template}, prefix="--template")
    reward = ModelReward(model, params, tokenizer, data_config, args.max_length, args.batch_size)

    lines, singles, correct = [], [], {}
    pairs = [e for e in examples if isinstance(e, PreferencePair)]
    single = [e for e in examples if not isinstance(e, PreferencePair)]
    pair_scores = iter(reward.score(pairs)) if pairs else iter(())
    single_scores = iter(reward.score(single)) if single else iter(())
    for example in examples:
        if isinstance(example, PreferencePair):
            chosen, rejected = (float(x) for x in next(pair_scores))
            lines.append({"reward_chosen": chosen, "reward_rejected": rejected, "margin": chosen - rejected})
            bucket = STRENGTH_NAMES[example.strength] if example.strength >= 0 else None
            for key in ("all", bucket):
                if key is not None:
                    correct.setdefault(key, []).append(chosen > rejected)
        else:
            singles.append(float(next(single_scores)))
            lines.append({"reward": singles[-1]})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
    summary = [f"scored {len(examples)} records"]
    if singles:
        summary.append(f"mean reward {np.mean(singles):.4f}")
    if pairs:
        summary.append(f"{len(pairs)} pairs: accuracy {np.mean(correct['all']):.4f}")
        summary += [f"{name} {np.mean(correct[name]):.4f} ({len(correct[name])})"
                    for name in STRENGTH_NAMES if name in correct]
    print("; ".join(summary), file=sys.stderr)
    return 0
