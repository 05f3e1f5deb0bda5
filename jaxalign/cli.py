"""`jaxalign <command>`: each command lives in `jaxalign/commands/<name>.py` with `add_arguments` and `run`.

Command modules import JAX and other heavy libraries inside `run`, so `jaxalign --help` stays fast.
"""

import argparse
import importlib
import importlib.metadata
import os
import sys

from jaxalign.errors import JaxalignError

COMMANDS = {
    # name: (module, one-line help)
    "generate": ("jaxalign.commands.generate", "complete the prompts of a JSONL file with a model"),
    "chat": ("jaxalign.commands.chat", "interactive multi-turn chat with a model, streaming the reply"),
    "convert": ("jaxalign.commands.convert", "Hugging Face model folder <-> jaxalign model checkpoint"),
    "score": ("jaxalign.commands.score", "log-probability and perplexity of each text in a JSONL file"),
    "check-parity": ("jaxalign.commands.check_parity", "compare jaxalign logits with transformers on an HF folder"),
    "sft": ("jaxalign.commands.sft", "supervised fine-tuning (or training from scratch) on instruction / dialogue data"),
    "rm": ("jaxalign.commands.rm", "train a reward model on preference pairs (LLaMA-2 margins by strength)"),
    "dpo": ("jaxalign.commands.dpo", "align a policy on preference pairs: DPO, cDPO, IPO, hinge, robust, SimPO, ORPO, KTO"),
    "ppo": ("jaxalign.commands.ppo", "PPO-RLHF: sample, score with reward models or a function, train policy and critic"),
    "grpo": ("jaxalign.commands.grpo", "group-relative RL with verifiable rewards: GRPO, Dr. GRPO, RLOO, DAPO"),
    "rs": ("jaxalign.commands.rs", "rejection-sampling fine-tuning: best of K samples per prompt, pooled over rounds, SFT"),
    "gatt": ("jaxalign.commands.gatt", "Ghost Attention: multi-turn data keeping a first-turn instruction, fine-tuning, eval"),
    "pipeline": ("jaxalign.commands.pipeline", "run training commands in order (e.g. the LLaMA-2-Chat recipe) and report"),
    "reward": ("jaxalign.commands.reward", "a reward model's score for each response or preference pair of a JSONL file"),
    "plot": ("jaxalign.commands.plot", "PNG curves (loss, eval loss, learning rate) from a run's metrics.jsonl"),
    "data": ("jaxalign.commands.data", "inspect a config's data: rendered examples, loss masks, token counts"),
    "plan": ("jaxalign.commands.plan", "per-device memory, FLOPs and step time of a training config; fits or not"),
}


class Parser(argparse.ArgumentParser):
    """Options and positional arguments in any order, so overrides may follow options
    (`jaxalign plan CONFIG --devices 16 model.path=PATH`): a command's parser parses intermixed arguments; a
    parser that picks a subcommand (`jaxalign`, `jaxalign data`) parses as usual."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._subparsers is not None or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jaxalign", description="Align open LLaMA-family models in JAX.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('jaxalign')}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers is used for tokenizers and configs here; its notice that PyTorch is absent is not for our users.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args) or 0
    except JaxalignError as err:
        print(f"jaxalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxalign {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
