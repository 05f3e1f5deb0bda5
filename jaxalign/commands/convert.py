"""`jaxalign convert SRC DST`: Hugging Face folder <-> jaxalign model checkpoint, direction detected from SRC."""

import argparse
import shutil
from pathlib import Path

from jaxalign.errors import JaxalignError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="an HF model folder (config.json) or a jaxalign model checkpoint")
    parser.add_argument("dst", type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="cast parameters (default: keep the source dtype)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read .bin (pickle) weights when an HF folder has no safetensors; only for trusted files")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied


def run(args: argparse.Namespace) -> int:
    import sys

    from jaxalign.hf import save_pretrained
    from jaxalign.models.checkpoint import is_model_checkpoint, read_model_head, save_model_checkpoint
    from jaxalign.models.loading import load_model

    src, dst = args.src, args.dst
    if not src.is_dir():
        raise JaxalignError(f"{src}: no such folder")
    if dst.exists() and any(dst.iterdir()):
        raise JaxalignError(f"{dst}: exists and is not empty; choose a new output folder")
    to_hf = not (src / "config.json").is_file() and is_model_checkpoint(src)
    if to_hf and read_model_head(src) != "causal_lm":
        raise JaxalignError(
            f"{src}: holds a score model (a reward or value model); Hugging Face export writes causal LMs only"
        )
    model, params = load_model(src, dtype=args.dtype, allow_pickle=args.allow_pickle)
    if to_hf:
        save_pretrained(model, params, dst)
        direction = "jaxalign checkpoint -> Hugging Face folder"
    else:
        save_model_checkpoint(dst, model.config, params)
        direction = "Hugging Face folder -> jaxalign checkpoint"
    copied = copy_tokenizer_files(src, dst)
    print(f"{direction}: wrote {dst} ({model.config.num_layers} layers, params {model.config.param_dtype}"
          f"{', tokenizer files copied' if copied else ''})", file=sys.stderr)
    return 0
