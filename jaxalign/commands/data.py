"""`jaxalign data inspect CONFIG [key=value ...]`: how the data of a run config renders, masks and packs.

Reads the `data:` section (and `tokenizer` / `model.path` to find the tokenizer when `data.tokenizer` is unset,
`train.seq_len` and `train.batch_size` for the shapes) of the same YAML `jaxalign sft` uses; ignores the rest.
Prints a few examples with trained spans marked (green on a terminal, `[[...]]` otherwise) and the counts of one
epoch: examples, tokens, trained tokens, truncated, dropped, skipped records, packing efficiency.
"""

import sys


def add_arguments(parser):
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    inspect = sub.add_parser("inspect", help="render examples with their loss masks and count tokens")
    inspect.add_argument("config", help="run config YAML (its data: section is used)")
    inspect.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.template=alpaca")
    inspect.add_argument("-n", "--num-examples", type=int, default=3, help="examples to render (default 3)")
    inspect.add_argument("--split", choices=("train", "eval"), default="train")
    inspect.add_argument("--seq-len", type=int, help="default: train.seq_len of the config, else 512")
    inspect.add_argument("--batch-size", type=int, help="default: train.batch_size of the config, else 8")
    inspect.add_argument("--limit", type=int, help="count at most this many examples (default: the whole epoch)")
    inspect.add_argument("--color", choices=("auto", "always", "never"), default="auto")


def resolve_tokenizer_spec(data_config, run: dict) -> str:
    """`data.tokenizer`, else a top-level `tokenizer`, else `model.path`."""
    from jaxalign.errors import JaxalignError

    model = run.get("model") if isinstance(run.get("model"), dict) else {}
    for spec in (data_config.tokenizer, run.get("tokenizer"), model.get("path")):
        if isinstance(spec, str) and spec:
            return spec
    raise JaxalignError("no tokenizer: set config key 'data.tokenizer' (e.g. 'byte' or a HF folder) or 'model.path'")


def run(args) -> int:
    from jaxalign.config import apply_overrides, from_dict, load_yaml
    from jaxalign.data import DataConfig, DataLoader, load_tokenizer, prepare_tokenizer
    from jaxalign.errors import JaxalignError

    raw = apply_overrides(load_yaml(args.config), args.overrides)
    config = from_dict(DataConfig, raw.get("data"), where=f"{args.config}: ", prefix="data")
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    seq_len = args.seq_len or train.get("seq_len") or 512
    batch_size = args.batch_size or train.get("batch_size") or 8
    if not isinstance(seq_len, int) or not isinstance(batch_size, int):
        raise JaxalignError(f"{args.config}: config keys 'train.seq_len' and 'train.batch_size' must be integers")
    tokenizer_spec = resolve_tokenizer_spec(config, raw)
    tokenizer = load_tokenizer(tokenizer_spec)
    new_tokens = prepare_tokenizer(config, tokenizer)
    loader = DataLoader(config, tokenizer, batch_size=batch_size, seq_len=seq_len, split=args.split)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())

    print(f"tokenizer: {tokenizer_spec} (vocab {len(tokenizer)}); added tokens: {new_tokens or 'none'}")
    print(f"template: {config.template}  mask: {config.mask}  pack: {config.pack}  seq_len: {seq_len}")
    for source in loader.sources:
        print(f"source {source.spec.path}: format {source.format}, {len(source.examples)} records")
    order = loader.shard(0)[: args.num_examples]
    items = loader.preprocessor.process([loader.examples[i] for i in order])
    for index, example_items in zip(order, items):
        example = loader.examples[index]
        for block, item in enumerate(example_items):
            status = f"dropped: {item.dropped}" if item.dropped else ("truncated" if item.truncated else "")
            label = f" block {block + 1}/{len(example_items)}" if len(example_items) > 1 else ""
            print(f"\n--- {example.origin}{label} {status}".rstrip())
            names = ("chosen", "rejected") if len(item.parts) == 2 else ("",)
            for name, part in zip(names, item.parts):
                if name:
                    print(f"[{name}]")
                print(render_marked(tokenizer, part.ids, part.trained, color))
    stats = loader.pass_stats(0, args.limit)
    print("\ncounts (one epoch" + (f", first {args.limit} examples" if args.limit else "") + "):")
    for key in ("examples", "tokens", "trained_tokens", "truncated", "dropped", "rows", "batches"):
        print(f"  {key}: {stats[key]}")
    print(f"  packing_efficiency: {stats['packing_efficiency']:.3f}")
    print(f"  skipped records: {len(loader.skipped)}")
    for message in loader.skipped[:10]:
        print(f"    {message}")
    if len(loader.skipped) > 10:
        print(f"    ... and {len(loader.skipped) - 10} more")
    return 0


def render_marked(tokenizer, ids, trained, color: bool) -> str:
    """The decoded tokens with trained runs in green (color) or inside `[[` `]]` (token 0 is never predicted)."""
    flags = [bool(t) for t in trained]
    if flags:
        flags[0] = False
    out, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or flags[end] != flags[start]:
            text = tokenizer.decode([int(t) for t in ids[start:end]], skip_special_tokens=False)
            if flags[start]:
                text = f"\x1b[32m{text}\x1b[0m" if color else f"[[{text}]]"
            out.append(text)
            start = end
    return "".join(out)
