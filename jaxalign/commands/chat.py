"""`jaxalign chat`: a multi-turn chat with a model in the terminal, printing the reply as it is generated.

Type a message and press Enter; `/reset` starts a new conversation, `/exit` (or end of input) quits.
"""

import argparse
import sys

from jaxalign.arguments import add_model_arguments, add_sampling_arguments
from jaxalign.errors import JaxalignError

HELP = "commands: /reset starts a new conversation, /exit quits"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--system", default=None, help="system message that opens every conversation")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    parser.set_defaults(max_new_tokens=512)


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


def run(args: argparse.Namespace) -> int:
    import jax

    from jaxalign.data.tokenizer import encode_chat, has_chat_template, stop_token_ids
    from jaxalign.hf import load_tokenizer
    from jaxalign.models.loading import load_model
    from jaxalign.sampling import SamplingParams, generate

    if args.max_new_tokens < 1:
        raise JaxalignError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    model, params = load_model(args.model, args.dtype, head="causal_lm")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if not has_chat_template(tokenizer):
        raise JaxalignError(
            f"{args.tokenizer or args.model}: the tokenizer has no chat template; give a tokenizer folder that has "
            "one with --tokenizer"
        )
    stops = stop_token_ids(model.config, tokenizer)
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
        prompt = encode_chat(tokenizer, messages)
        stream.start()
        print("assistant> ", end="", flush=True)
        try:
            result = generate(
                model, params, [prompt], args.max_new_tokens, rng=jax.random.fold_in(rng, turn),
                sampling=sampling, stop_token_ids=stops, on_tokens=stream,
            )
        except JaxalignError as err:
            messages.pop()
            print(f"\n(error: {err}; /reset starts a new conversation)", flush=True)
            continue
        reply = tokenizer.decode(result.completions()[0], skip_special_tokens=True)
        print(reply[len(stream.printed):], flush=True)
        messages.append({"role": "assistant", "content": reply})
        turn += 1
    return 0
