"""`jaxalign check-parity HF_FOLDER`: the same tokens through transformers (PyTorch, CPU) and jaxalign.

Prints the max absolute logit difference, the max difference relative to the largest |logit|, the mean KL
divergence KL(transformers || jaxalign) per position and whether greedy next tokens agree; exits 1 when the
relative difference is above `--tolerance`.
"""

import argparse
import sys
from pathlib import Path

from jaxalign.errors import JaxalignError

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. In 1969, the first humans walked on the Moon"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_folder", type=Path, help="Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to run (tokenized with the folder's tokenizer)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest allowed max|diff| / max|logit| (default 1e-4)")
    parser.add_argument("--num-tokens", type=int, default=32,
                        help="random token ids to use when the folder has no tokenizer (default 32)")


def compare(reference, ours) -> dict:
    """Difference statistics between two logit arrays `[L, V]` (computed in float64, so the KL is not noise)."""
    import numpy as np

    reference, ours = np.asarray(reference, np.float64), np.asarray(ours, np.float64)
    diff = np.abs(reference - ours)
    ref_logp = reference - np.logaddexp.reduce(reference, axis=-1, keepdims=True)
    our_logp = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    kl = np.sum(np.exp(ref_logp) * (ref_logp - our_logp), axis=-1)
    return {
        "max_abs_diff": float(diff.max()),
        "max_abs_logit": float(np.abs(reference).max()),
        "max_rel_diff": float(diff.max() / np.abs(reference).max()),
        "mean_kl": float(kl.mean()),
        "greedy_agreement": float(np.mean(reference.argmax(-1) == ours.argmax(-1))),
    }


def token_ids(folder: Path, prompt: str, num_tokens: int, vocab_size: int):
    import numpy as np

    from jaxalign.hf import load_tokenizer

    try:
        tokenizer = load_tokenizer(folder)
    except JaxalignError:
        print(f"{folder}: no tokenizer; using {num_tokens} pseudo-random token ids", file=sys.stderr)
        return np.random.default_rng(0).integers(0, vocab_size, size=num_tokens)
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise JaxalignError("--prompt: tokenizes to no tokens")
    return np.asarray(ids)


def run(args: argparse.Namespace) -> int:
    try:
        import torch
        import transformers
    except ImportError:
        raise JaxalignError(
            "check-parity needs PyTorch to run the transformers reference; install it with "
            "`pip install torch` (CPU is enough), or `pip install jaxalign[test]`"
        ) from None
    import jax.numpy as jnp
    import numpy as np

    import jaxalign

    model, params = jaxalign.load_pretrained(args.hf_folder, dtype="float32")
    ids = token_ids(args.hf_folder, args.prompt, args.num_tokens, model.config.vocab_size)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids[None], jnp.int32)))[0]
    del params
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = reference_model(torch.tensor(ids[None])).logits[0].float().numpy()
    stats = compare(reference, ours)
    print(f"tokens: {len(ids)}")
    print(f"max |logit| (transformers): {stats['max_abs_logit']:.4f}")
    print(f"max abs diff: {stats['max_abs_diff']:.3e}")
    print(f"max rel diff (max abs diff / max |logit|): {stats['max_rel_diff']:.3e}")
    print(f"mean KL(transformers || jaxalign): {stats['mean_kl']:.3e}")
    print(f"greedy next-token agreement: {stats['greedy_agreement']:.2%}")
    if stats["max_rel_diff"] > args.tolerance:
        print(f"FAIL: relative difference {stats['max_rel_diff']:.3e} > tolerance {args.tolerance:g}")
        return 1
    print(f"OK: within tolerance {args.tolerance:g}")
    return 0
