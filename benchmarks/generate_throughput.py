"""Generation throughput: jaxalign `generate` against transformers `generate` (PyTorch, KV cache, greedy) and,
with `--tunix-python`, Tunix's sampler (the JAX peer).

All generate exactly `--new-tokens` tokens (stop tokens off) for the same `--batch` prompts of different lengths
with the same weights. jaxalign and transformers run in this process, alternating runs; Tunix runs in its own
virtual environment (`benchmarks/tunix_peer.py`, started after the alternating runs, with the same number of timed
runs after an untimed one). Prints tokens/s of each, the ratios, how many rows agree token for token, and
jaxalign's compile time (XLA compilation, measured separately from the timed runs).

    python benchmarks/generate_throughput.py                    # ~58M random LLaMA and SmolLM2-135M
    python benchmarks/generate_throughput.py --models random    # only the random model
    python benchmarks/generate_throughput.py --tunix-python ~/tunix-venv/bin/python
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

import jaxalign
from jaxalign.sampling import generate

SMOLLM2_DIR = Path(os.environ.get("JAXALIGN_TEST_CACHE", Path.home() / ".cache" / "jaxalign-tests")) / (
    "smollm2-135m-instruct"
)
RANDOM_LLAMA = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def random_llama(folder: Path) -> Path:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**RANDOM_LLAMA))
    model.save_pretrained(folder)
    return folder


def make_prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token prompts of lengths spread over 16..64 (the jaxalign bucket is 64)."""
    rng = np.random.default_rng(seed)
    lengths = np.linspace(16, 64, batch).astype(int)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


class CompileTimer:
    def __init__(self):
        self.seconds = 0.0

    def __call__(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.seconds += duration


def jaxalign_runner(folder: Path, prompts, new_tokens: int):
    model, params = jaxalign.load_pretrained(folder, dtype="float32")

    def run():
        return generate(model, params, prompts, new_tokens, stop_token_ids=())

    return run


def transformers_runner(folder: Path, prompts, new_tokens: int):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pad = 0
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1

    def run():
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, pad_token_id=pad, use_cache=True, temperature=None, top_p=None, top_k=None,
            )
        return out[:, width:].numpy()

    return run


def bench(name: str, folder: Path, args) -> dict:
    config = transformers.AutoConfig.from_pretrained(folder)
    prompts = make_prompts(args.batch, config.vocab_size, args.seed)
    tokens = args.batch * args.new_tokens
    ours = jaxalign_runner(folder, prompts, args.new_tokens)
    theirs = transformers_runner(folder, prompts, args.new_tokens)

    timer = CompileTimer()
    jax.monitoring.register_event_duration_secs_listener(timer)
    start = time.perf_counter()
    first = ours()
    first_call = time.perf_counter() - start
    jax.monitoring.unregister_event_duration_listener(timer)
    theirs()

    ours_times, theirs_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = ours()
        ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        reference = theirs()
        theirs_times.append(time.perf_counter() - start)
    ours_s, theirs_s = statistics.median(ours_times), statistics.median(theirs_times)
    agree = sum(row.tolist() == ref.tolist() for row, ref in zip(result.tokens, reference))
    assert np.array_equal(first.tokens, result.tokens)
    out = {
        "model": name,
        "params_m": sum(np.prod(s) for s in _shapes(folder)) / 1e6,
        "jaxalign_tok_s": tokens / ours_s,
        "transformers_tok_s": tokens / theirs_s,
        "ratio": theirs_s / ours_s,
        "compile_s": timer.seconds,
        "first_call_s": first_call,
        "rows_equal": f"{agree}/{len(prompts)}",
    }
    if args.tunix_python:
        tunix = tunix_runs(args.tunix_python, folder, prompts, args.new_tokens, args.repeats)
        tunix_s = statistics.median(tunix["runs_s"])
        out.update(tunix_tok_s=tokens / tunix_s, tunix_ratio=tunix_s / ours_s,
                   tunix_rows_equal=f"{sum(row.tolist() == ref for row, ref in zip(result.tokens, tunix['tokens']))}"
                                    f"/{len(prompts)}")
        print(f"{name}: Tunix {tunix['tunix']} {out['tunix_tok_s']:.0f} tok/s, jaxalign / Tunix "
              f"{out['tunix_ratio']:.2f}x; greedy rows identical to jaxalign's {out['tunix_rows_equal']}; first call "
              f"{tunix['first_call_s']:.1f} s; runs (s) {[round(t, 2) for t in tunix['runs_s']]}", flush=True)
    print(
        f"{name} ({out['params_m']:.0f}M params): jaxalign {out['jaxalign_tok_s']:.0f} tok/s, transformers "
        f"{out['transformers_tok_s']:.0f} tok/s, ratio {out['ratio']:.2f}x; jaxalign XLA compile {timer.seconds:.1f} s "
        f"(first call {first_call:.1f} s); greedy rows identical {out['rows_equal']}; "
        f"runs (s) jaxalign {[round(t, 2) for t in ours_times]} transformers {[round(t, 2) for t in theirs_times]}",
        flush=True,
    )
    return out


def tunix_runs(python: str, folder: Path, prompts, new_tokens: int, repeats: int) -> dict:
    """`benchmarks/tunix_peer.py sample` in the Python of Tunix's virtual environment."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as request:
        json.dump({"model": str(folder), "prompts": prompts, "new_tokens": new_tokens, "repeats": repeats}, request)
        request.flush()
        result = subprocess.run([python, str(Path(__file__).with_name("tunix_peer.py")), "sample", request.name],
                                capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if result.returncode:
        sys.exit(f"Tunix peer failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _shapes(folder: Path):
    from safetensors import safe_open

    for file in folder.glob("*.safetensors"):
        with safe_open(file, "np") as handle:
            for key in handle.keys():
                yield handle.get_slice(key).get_shape()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("random", "smollm2"), default=["random", "smollm2"])
    parser.add_argument("--smollm2", type=Path, default=SMOLLM2_DIR, help="SmolLM2-135M(-Instruct) HF folder")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tunix-python", default=None,
                        help="Python of a virtual environment with google-tunix: also time Tunix's sampler")
    args = parser.parse_args()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; jax {jax.__version__} ({jax.devices()[0].platform}), torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; batch "
        f"{args.batch}, {args.new_tokens} new tokens, greedy, float32",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name == "random":
                bench("random LLaMA", random_llama(Path(tmp) / "random"), args)
            else:
                bench("SmolLM2-135M", args.smollm2, args)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
