"""`jaxalign chat`: a multi-turn chat with a model in the terminal, printing the reply as it is generated.

Type a message and press Enter; `/reset` starts a new conversation, `/exit` (or end of input) quits.

The conversation is rendered with the model's chat template (a jaxalign export holds the format it was trained
in), a built-in template (`--template alpaca`), or as plain text (`--no-chat-template`: each message on its own
line, for a base model to continue). A reply is at most `--max-new-tokens` tokens and never longer than the
model's context leaves after the conversation; a conversation that fills the context asks for `/reset`.
"""

import argparse
import sys

from jaxalign.arguments import add_model_arguments, add_sampling_arguments
from jaxalign.data.templates import BUILTIN_TEMPLATES
from jaxalign.errors import JaxalignError

HELP = "commands: /reset starts a new conversation, /exit quits"
MAX_NEW_TOKENS = 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--system", default=None, help="system message that opens every conversation")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    parser.add_argument("--template", choices=BUILTIN_TEMPLATES, default=None,
                        help="prompt in this built-in template (as data.template trained it) instead of the "
                             "tokenizer's chat template")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="chat in plain text: each message on its own line, no chat template")
    parser.set_defaults(max_new_tokens=MAX_NEW_TOKENS)


class TextStream:
    """Prints the text of row 0's new tokens as the decode loop reports them.

    The whole reply is re-decoded at each token and only the new suffix printed, so tokens that are parts of one
    character or word print correctly. One instance serves a whole session, so the compiled loop that calls it is
    reused from turn to turn.
    """

    def __init__(self, tokenizer, stop_ids: tuple[int, ...], out=None):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.out = sys.stdout if out is None else out
        self.tokens: list[int] = []
        self.printed = ""

    def start(self) -> None:
        self.tokens = []
        self.printed = ""

    def __call__(self, tokens, active) -> None:
        token = int(tokens[0])
        if not bool(active[0]) or token in self.stop_ids:
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def encode_plain(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` as plain text, each message's content on its own line (the tokenizer adds its own
    special tokens, as for any text)."""
    return tokenizer("".join(m["content"] + "\n" for m in messages))["input_ids"]


def run(args: argparse.Namespace) -> int:
    import jax

    from jaxalign.data.templates import prompt_template
    from jaxalign.data.tokenizer import encode_chat, stop_token_ids
    from jaxalign.hf import load_tokenizer
    from jaxalign.models.loading import load_model
    from jaxalign.sampling import SamplingParams, generate

    if args.max_new_tokens < 1:
        raise JaxalignError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.template and args.no_chat_template:
        raise JaxalignError("--template and --no-chat-template exclude each other: choose one")
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    model, params = load_model(args.model, args.dtype, head="causal_lm", scan_layers=False)  # faster decoding
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    stops = stop_token_ids(model.config, tokenizer)
    if args.no_chat_template:
        encode = encode_plain
    else:
        stops = tuple(dict.fromkeys((*stops, prompt_template(tokenizer, args.template))))
        encode = encode_chat
    context = model.config.max_position_embeddings
    stream = TextStream(tokenizer, stops)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    rng = jax.random.key(args.seed)
    interactive = sys.stdin.isatty()
    print(f"chatting with {args.model} ({HELP})", flush=True)
    turn = 0
    while True:
        if interactive:
            print("\nyou> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages = list(opening)
            print("(new conversation)", flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", flush=True)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        prompt = encode(tokenizer, messages)
        room = context - len(prompt)
        if room < 1:
            messages.pop()
            print(f"(the conversation has {len(prompt)} tokens and fills the model's context of {context} "
                  "positions; /reset starts a new conversation)", flush=True)
            continue
        max_new_tokens = min(args.max_new_tokens, room)
        stream.start()
        print("assistant> ", end="", flush=True)
        result = generate(
            model, params, [prompt], max_new_tokens, rng=jax.random.fold_in(rng, turn),
            sampling=sampling, stop_token_ids=stops, on_tokens=stream,
        )
        tokens = result.completions()[0]
        reply = tokenizer.decode(tokens, skip_special_tokens=True)
        print(reply[len(stream.printed):], flush=True)
        if max_new_tokens < args.max_new_tokens and len(tokens) == max_new_tokens and tokens[-1] not in stops:
            print(f"(the reply was cut at the model's context of {context} positions; /reset starts a new "
                  "conversation)", flush=True)
        messages.append({"role": "assistant", "content": reply})
        turn += 1
    return 0
