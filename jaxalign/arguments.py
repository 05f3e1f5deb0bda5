"""Command-line options that several commands share. No JAX here: commands add their options when `jaxalign --help`
builds the parser, which must stay fast."""

import argparse

from jaxalign import storage


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--tokenizer` and `--dtype`, for commands that load a model with
    `jaxalign.models.loading.load_model`."""
    parser.add_argument("--model", type=storage.location, required=True,
                        help="a Hugging Face model folder or a jaxalign model checkpoint folder")
    parser.add_argument("--tokenizer", type=storage.location, default=None,
                        help="folder with the tokenizer (default: the model folder)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: the model's)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """`--max-new-tokens`, `--top-p`, `--top-k` and `--seed`, for commands that generate (each adds its own
    `--temperature`, whose default differs)."""
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate per completion")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
