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
    python benchmarks/generate_throughput.py --models smollm2 --breakdown   # where a decode step's time goes

`--breakdown` times jaxalign's decode step ((run with N new tokens - run with 8) / (N - 8)), also with the model
loaded with `scan_layers=False` (a module per layer, so no per-step slice of the stacked weights), against the matrix
products of the same step alone, on the model's own weights at batch `--batch`: the layer weights read through a scan
over the stacked layer axis (as the model reads them), the same products on weights split per layer beforehand, and
the language-model head alone.
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
    model, params = jaxalign.load_pretrained(folder, dtype="float32", scan_layers=False)  # as `jaxalign generate`

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


def _timed(fn, *args, repeats: int = 20) -> float:
    """Median seconds of `fn(*args)` (compiled first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_breakdown(name: str, folder: Path, args) -> None:
    """Prints the decode step's time and that of its matrix products alone (see the module docstring)."""
    import jax.numpy as jnp

    config = transformers.AutoConfig.from_pretrained(folder)
    prompts = make_prompts(args.batch, config.vocab_size, args.seed)
    model, params = jaxalign.load_pretrained(folder, dtype="float32")

    def decode_step(model, params) -> float:
        runs = {n: _timed(lambda n=n: generate(model, params, prompts, n, stop_token_ids=()).tokens, repeats=3)
                for n in (8, args.new_tokens)}
        return (runs[args.new_tokens] - runs[8]) / (args.new_tokens - 8)

    step = decode_step(model, params)
    unrolled_step = decode_step(*jaxalign.load_pretrained(folder, dtype="float32", scan_layers=False))
    layers = params["model"]["layers"]
    stacked = []
    for block, proj in (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                        ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")):
        kernel = layers[block][proj]["kernel"]  # [layers, in..., out...] as 2-D products per layer
        stacked.append(kernel.reshape(kernel.shape[0], -1, kernel.shape[-1]) if proj == "o_proj" else
                       kernel.reshape(kernel.shape[0], kernel.shape[1], -1))
    head = params.get("lm_head", {}).get("kernel")
    head = params["model"]["embed_tokens"]["embedding"].T if head is None else head
    per_layer = [[k[i] for k in stacked] for i in range(stacked[0].shape[0])]
    x = jnp.ones((args.batch, config.hidden_size), jnp.float32) / config.hidden_size

    def products(h, weights):
        q, k, v, o, gate, up, down = weights
        total = jnp.sum(h @ k) + jnp.sum(h @ v)
        h = h + (h @ q) @ o * 1e-3
        return h + ((h @ gate) * (h @ up)) @ down * 1e-3 + total * 0.0

    scanned = jax.jit(lambda h, ws: jax.lax.scan(lambda h, w: (products(h, w), None), h, ws)[0])
    looped = jax.jit(lambda h, ws: [h := products(h, w) for w in ws][-1])
    logits = jax.jit(lambda h, w: h @ w)
    scan_s, loop_s, head_s = _timed(scanned, x, tuple(stacked)), _timed(looped, x, per_layer), _timed(logits, x, head)
    flops = 2 * args.batch * (sum(k.size for k in stacked) + head.size)
    print(f"{name} decode step at batch {args.batch}: {step * 1e3:.1f} ms (loaded with scan_layers=False: "
          f"{unrolled_step * 1e3:.1f} ms); its matrix products alone: layers through "
          f"the stacked scan {scan_s * 1e3:.1f} ms, layers on per-layer weights {loop_s * 1e3:.1f} ms, head "
          f"{head_s * 1e3:.1f} ms; products at {flops / 1e9 / (loop_s + head_s):.0f} GFLOP/s; everything else "
          f"{(step - scan_s - head_s) * 1e3:.1f} ms", flush=True)


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
    parser.add_argument("--breakdown", action="store_true",
                        help="only time jaxalign's decode step against its matrix products (no peers)")
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
            label, folder = (("random LLaMA", random_llama(Path(tmp) / "random")) if name == "random" else
                             ("SmolLM2-135M", args.smollm2))
            (decode_breakdown if args.breakdown else bench)(label, folder, args)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
