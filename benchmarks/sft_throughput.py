"""SFT training throughput: jaxalign's real train step against transformers + PyTorch on the same tokens.

    python benchmarks/sft_throughput.py                  # CPU: ~60M-parameter LLaMA, batch 8 x 512, float32
    python benchmarks/sft_throughput.py --device gpu     # GPU: ~1B-parameter LLaMA, batch 8 x 2048, bfloat16
    python benchmarks/sft_throughput.py --tunix-python ~/tunix-venv/bin/python   # also Tunix (CPU, float32)

Both sides train the same architecture (untied LLaMA, SwiGLU, RoPE, full attention) with AdamW and global-norm
clipping at 1.0 on identical random token batches, loss on every token. Each side runs one untimed step first
(compilation, allocation), then `--steps` timed steps alternating between the two sides (a shared machine's load
changes hit both alike); tokens/s uses the median step. With `--tunix-python`, Tunix's PeftTrainer train step
(`benchmarks/tunix_peer.py sft`, in Tunix's own virtual environment) takes its turn in the same alternation, on the
same input rows (its loss predicts the L - 1 next tokens inside each row; the work per step is the same).
Printed: tokens/s of each, their ratio, and jaxalign's model
FLOP/s as a fraction of two peaks measured in the same run: jitted square matmuls in the same dtype, and the step's
own matrix products (`step_matmuls`) each run alone.

Model FLOPs per token = 6 x (weights used in matmuls, i.e. all but the input embedding table)
                        + 12 x layers x seq_len x hidden (attention scores and weighted sum, forward + backward),
the usual accounting of the PaLM paper; remat recomputation is not counted.
`--breakdown` adds timings of the pieces of one jaxalign step (forward, forward + backward, optimiser update, and
the attention core alone) to show what limits it.
"""

import argparse
import dataclasses
import itertools
import json
import statistics
import os
import platform
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Setup:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    batch_size: int
    seq_len: int
    dtype: str
    remat: str = "none"
    attention: str = "auto"
    logits_chunk_length: int | None = None

    def matmul_params(self) -> int:
        """Weights that take part in matmuls: attention and MLP projections of every layer plus the LM head."""
        per_layer = 4 * self.hidden_size * self.hidden_size + 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * per_layer + self.hidden_size * self.vocab_size

    def total_params(self) -> int:
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.matmul_params() + self.vocab_size * self.hidden_size + norms

    def flops_per_token(self) -> float:
        return 6.0 * self.matmul_params() + 12.0 * self.num_layers * self.seq_len * self.hidden_size


SETUPS = {
    "cpu": Setup(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                 batch_size=8, seq_len=512, dtype="float32"),
    "gpu": Setup(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=16,
                 batch_size=8, seq_len=2048, dtype="bfloat16", remat="full"),
}


def token_batches(setup: Setup, count: int, seed: int = 0) -> list[dict]:
    """Random token rows `[B, L + 1]` split into inputs and next-token targets, every token trained."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        tokens = rng.integers(0, setup.vocab_size, (setup.batch_size, setup.seq_len + 1), dtype=np.int32)
        ones = np.ones((setup.batch_size, setup.seq_len), np.int32)
        batches.append({
            "input_ids": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": ones, "segment_ids": ones,
            "positions": np.broadcast_to(np.arange(setup.seq_len, dtype=np.int32), ones.shape).copy(),
        })
    return batches


def matmul_peak(dtype: str, sizes: tuple[int, ...], repeats: int = 20) -> tuple[float, int]:
    """Best FLOP/s over square jitted matmuls of `sizes` in `dtype` (float32 accumulation), and the best size.

    The best of many repeats, so a busy shared machine still shows what the cores can do when they are free.
    """
    import jax
    import jax.numpy as jnp

    best_rate, best_size = 0.0, sizes[0]
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    for size in sizes:
        keys = jax.random.split(jax.random.PRNGKey(size))
        a = jax.random.normal(keys[0], (size, size), jnp.float32).astype(dtype)
        b = jax.random.normal(keys[1], (size, size), jnp.float32).astype(dtype)
        matmul(a, b).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            rate = 2.0 * size**3 / (time.perf_counter() - start)
            if rate > best_rate:
                best_rate, best_size = rate, size
    return best_rate, best_size


def step_matmuls(setup: Setup) -> list[tuple[str, tuple, tuple, int]]:
    """The matrix products of one training step as `(einsum, lhs shape, rhs shape, count)`: every weight's forward
    product and its two backward products (input and weight gradients), with the token dimension as the model has
    it (`[B * L, ...]` token matrices; the LM head in the slices the log-probs are computed in), and attention's two
    forward and four backward products per batch row and head. Their FLOPs are the model FLOPs of
    `Setup.flops_per_token` (plus the LM head slices' padding)."""
    tokens, hidden, inter = setup.batch_size * setup.seq_len, setup.hidden_size, setup.intermediate_size
    weights = [((hidden, hidden), 4 * setup.num_layers), ((hidden, inter), 2 * setup.num_layers),
               ((inter, hidden), setup.num_layers)]
    from jaxalign.objectives.logprobs import logits_slice_length

    chunk = min(logits_slice_length(jaxalign_model(setup).config, setup.batch_size), setup.seq_len)
    slices = -(-setup.seq_len // chunk)
    products = []
    for rows, count in [(tokens, None), (setup.batch_size * chunk, slices)]:
        for (k, n), times in (weights if count is None else [((hidden, setup.vocab_size), count)]):
            products += [("tk,kn->tn", (rows, k), (k, n), times),  # forward
                         ("tn,kn->tk", (rows, n), (k, n), times),  # input gradient
                         ("tk,tn->kn", (rows, k), (rows, n), times)]  # weight gradient
    rows, length, head_dim = setup.batch_size * setup.num_heads, setup.seq_len, setup.hidden_size // setup.num_heads
    products += [("bld,bsd->bls", (rows, length, head_dim), (rows, length, head_dim), 2 * setup.num_layers),
                 ("bls,bsd->bld", (rows, length, length), (rows, length, head_dim), 4 * setup.num_layers)]
    return products


def step_matmul_times(setup: Setup, repeats: int = 5) -> list[tuple[float, int, float]]:
    """`(FLOPs, count, best seconds)` of each of the step's matrix products (`step_matmuls`), each jitted by itself in
    `setup.dtype`."""
    import jax
    import jax.numpy as jnp

    times = []
    for spec, lhs_shape, rhs_shape, count in step_matmuls(setup):
        lhs = jnp.ones(lhs_shape, setup.dtype)
        rhs = jnp.ones(rhs_shape, setup.dtype)
        product = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32))
        contracted = lhs_shape[0] if spec == "tk,tn->kn" else lhs_shape[-1]
        flops = 2.0 * np.prod(jax.eval_shape(product, lhs, rhs).shape) * contracted
        times.append((flops, count, _best_time(product, lhs, rhs, repeats=repeats)))
    return times


def model_matmul_peak(*measurements: list[tuple[float, int, float]]) -> float:
    """FLOP/s of the step's own matrix products run alone: their FLOPs over the sum of their times, each product's
    time the best of `measurements` (passes of `step_matmul_times`, e.g. before and after the timed steps, so a
    slower spell of a shared machine does not lower the peak). A step made of nothing but these products would run
    at this rate; the square-matmul peak is what the cores reach on large square products."""
    flops = seconds = 0.0
    for passes in zip(*measurements):
        product_flops, count, _ = passes[0]
        flops += count * product_flops
        seconds += count * min(best for _, _, best in passes)
    return flops / seconds


def jaxalign_model(setup: Setup):
    from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=setup.vocab_size, hidden_size=setup.hidden_size, intermediate_size=setup.intermediate_size,
        num_layers=setup.num_layers, num_heads=setup.num_heads, num_kv_heads=setup.num_heads,
        max_position_embeddings=setup.seq_len, dtype=setup.dtype, param_dtype="float32", remat=setup.remat,
        attention=setup.attention, logits_chunk_length=setup.logits_chunk_length,
    )
    return LlamaForCausalLM(config)


def jaxalign_steps(setup: Setup, batches: list[dict], breakdown: dict | None = None):
    """Generator of (seconds, loss) per step of `jaxalign.train.step.train_step`, compiled as the training loop
    compiles it; the first step includes compilation. Fills `breakdown` with the step's parts when given."""
    import jax
    from flax import linen as nn

    from jaxalign import sharding as shd
    from jaxalign.config import RunConfig, from_dict
    from jaxalign.objectives.sft import make_loss_fn
    from jaxalign.train.algorithm import Trainable
    from jaxalign.train.loop import fresh_state, plan
    from jaxalign.train.step import train_step

    config = from_dict(RunConfig, {
        "train": {"steps": 1000, "batch_size": setup.batch_size, "seq_len": setup.seq_len},
        "optimizer": {"name": "adamw", "lr": 1e-4, "schedule": "constant", "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                      "weight_decay": 0.0, "clip": 1.0},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    })
    model = jaxalign_model(setup)
    loss_fn = make_loss_fn(model)
    trainables = {"model": Trainable(model, config.optimizer)}
    layout = plan(config, trainables)
    with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        state = fresh_state(layout, trainables, config.seed)
        device_batches = [shd.global_batch(b, layout.mesh, layout.rules) for b in batches]
        batch_shardings = jax.tree.map(lambda x: x.sharding, device_batches[0])
        batch_spec = shd.spec_for(("batch",), layout.rules)
        step = jax.jit(
            lambda s, b: train_step(s, {}, b, loss=lambda p, f, b, r: loss_fn(p["model"], b, r), txs=layout.txs,
                                    schedules=layout.schedules, grad_accum=1, batch_spec=batch_spec),
            in_shardings=(layout.shardings, batch_shardings), donate_argnums=0,
        )
        for index in itertools.count():
            start = time.perf_counter()
            state, metrics = step(state, device_batches[index % len(device_batches)])
            loss = metrics["loss"].value()
            elapsed = time.perf_counter() - start
            if index == 0 and breakdown is not None:
                breakdown.update(step_breakdown(setup, loss_fn, state, device_batches[0], layout.txs["model"]))
            yield elapsed, loss


def _best_time(fn, *args, repeats: int = 3) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def step_breakdown(setup: Setup, loss_fn, state, batch: dict, tx) -> dict:
    """Seconds of the parts of one step, each compiled on its own (so XLA fuses them differently than the whole)."""
    import jax
    import jax.numpy as jnp

    params = state.params["model"]
    forward = jax.jit(lambda p, b: loss_fn(p, b, None)[0].total)
    grads_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None)[0].total))
    grads = grads_fn(params, batch)
    update = jax.jit(lambda g, o, p: tx.update(g, o, p))
    heads, head_dim = setup.num_heads, setup.hidden_size // setup.num_heads
    shape = (setup.batch_size, setup.seq_len, heads, head_dim)
    q = jnp.ones(shape, setup.dtype)
    mask = jnp.tril(jnp.ones((setup.seq_len, setup.seq_len), bool))[None]

    def attention_core(q, k, v):
        scores = jnp.einsum("blhd,bshd->bhls", q, k).astype(jnp.float32) * head_dim**-0.5
        probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -1e30), axis=-1).astype(v.dtype)
        return jnp.einsum("bhls,bshd->blhd", probs, v)

    attention = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention_core(q, k, v).astype(jnp.float32)),
                                 argnums=(0, 1, 2)))
    return {
        "forward": round(_best_time(forward, params, batch), 4),
        "forward_backward": round(_best_time(grads_fn, params, batch), 4),
        "optimizer_update": round(_best_time(update, grads, state.opt_state["model"], params), 4),
        "attention_core_fwd_bwd_all_layers": round(setup.num_layers * _best_time(attention, q, q, q), 4),
    }


def torch_steps(setup: Setup, batches: list[dict], device: str):
    """Generator of (seconds, loss) per step of transformers' LlamaForCausalLM (SDPA attention) + torch AdamW,
    eager, on the same token batches."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=setup.vocab_size, hidden_size=setup.hidden_size, intermediate_size=setup.intermediate_size,
        num_hidden_layers=setup.num_layers, num_attention_heads=setup.num_heads,
        num_key_value_heads=setup.num_heads, max_position_embeddings=setup.seq_len, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    target = torch.device("cuda" if device == "gpu" else "cpu")
    model = transformers.LlamaForCausalLM(config).to(target)
    if setup.remat != "none":
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    autocast = torch.autocast(target.type, dtype=torch.bfloat16, enabled=setup.dtype == "bfloat16")

    def step(batch):
        input_ids = torch.from_numpy(batch["input_ids"]).long().to(target)
        targets = torch.from_numpy(batch["targets"]).long().to(target)
        with autocast:
            logits = model(input_ids=input_ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, setup.vocab_size), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if target.type == "cuda":
            torch.cuda.synchronize()

    for index in itertools.count():
        start = time.perf_counter()
        loss = step(batches[index % len(batches)])
        sync()
        loss = float(loss)
        yield time.perf_counter() - start, loss


def tunix_steps(python: str, setup: Setup, batches: list[dict]):
    """Generator of (seconds, loss) per step of Tunix's SFT train step, run by `tunix_peer.py sft` in `python`."""
    import subprocess
    import tempfile
    from pathlib import Path

    request = {"model": {k: getattr(setup, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                        "num_layers", "num_heads")},
               "batches": [b["input_ids"].tolist() for b in batches]}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(request, file)
        file.flush()
        peer = subprocess.Popen([python, str(Path(__file__).with_name("tunix_peer.py")), "sft", file.name],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
        try:
            while True:
                peer.stdin.write("step\n")
                peer.stdin.flush()
                line = peer.stdout.readline()
                if not line:
                    raise RuntimeError(f"the Tunix peer ended (status {peer.wait()})")
                result = json.loads(line)
                yield result["seconds"], result["loss"]
        finally:
            peer.stdin.close()
            peer.wait()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=sorted(SETUPS), default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per framework")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--remat", default=None, help="jaxalign remat policy (none, full, dots, ...)")
    parser.add_argument("--attention", default=None, help="jaxalign attention: auto, dense or blockwise")
    parser.add_argument("--logits-chunk-length", type=int, default=None,
                        help="positions per slice of the LM head's logits (default: about 2**25 logits per slice)")
    parser.add_argument("--skip-torch", action="store_true", help="measure jaxalign only")
    parser.add_argument("--tunix-python", default=None,
                        help="Python of a virtual environment with google-tunix: also time Tunix's train step")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of one jaxalign step")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    setup = SETUPS[args.device]
    changes = {k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len),
                                 ("remat", args.remat), ("attention", args.attention),
                                 ("logits_chunk_length", args.logits_chunk_length)) if v is not None}
    setup = dataclasses.replace(setup, **changes)
    batches = token_batches(setup, count=2)

    import jax

    results = {
        "setup": dataclasses.asdict(setup),
        "parameters": setup.total_params(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"jax devices: {jax.devices()[0].device_kind} x {jax.device_count()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before": os.getloadavg(),
    }
    sizes = (1024, 2048) if args.device == "cpu" else (4096, 8192)
    results["matmul_peak_flops"], peak_size = matmul_peak(setup.dtype, sizes)
    results["matmul_peak_size"] = peak_size
    matmul_times_before = step_matmul_times(setup)
    breakdown = {} if args.breakdown else None
    runners = {"jaxalign": jaxalign_steps(setup, batches, breakdown)}
    if not args.skip_torch:
        runners["torch"] = torch_steps(setup, batches, args.device)
    if args.tunix_python:
        if args.device != "cpu":
            parser.error("--tunix-python: the Tunix side runs on CPU in float32 only")
        runners["tunix"] = tunix_steps(args.tunix_python, setup, batches)
    # First (compiling / allocating) step of each, then timed steps alternating between the two, so that a change
    # of load on a shared machine hits both sides alike; tokens/s uses the median step.
    for name, runner in runners.items():
        results[name] = {"first_step_s": next(runner)[0], "step_s_all": [], "losses": []}
    for _ in range(args.steps):
        for name, runner in runners.items():
            seconds, loss = next(runner)
            results[name]["step_s_all"].append(round(seconds, 3))
            results[name]["losses"].append(round(loss, 4))
    tokens = setup.batch_size * setup.seq_len
    for name in runners:
        results[name]["step_s"] = statistics.median(results[name]["step_s_all"])
        results[name]["tokens_per_s"] = tokens / results[name]["step_s"]
    if breakdown is not None:
        results["jaxalign"]["breakdown_s"] = breakdown
    results["model_matmul_peak_flops"] = model_matmul_peak(matmul_times_before, step_matmul_times(setup))
    model_flops = results["jaxalign"]["tokens_per_s"] * setup.flops_per_token()
    results["jaxalign"]["model_flops_per_s"] = model_flops
    results["jaxalign"]["fraction_of_matmul_peak"] = model_flops / results["matmul_peak_flops"]
    results["jaxalign"]["fraction_of_model_matmul_peak"] = model_flops / results["model_matmul_peak_flops"]
    if "torch" in results:
        results["torch"]["threads"] = __import__("torch").get_num_threads()
        results["speedup_vs_torch"] = results["jaxalign"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
        torch_flops = results["torch"]["tokens_per_s"] * setup.flops_per_token()
        results["torch"]["model_flops_per_s"] = torch_flops
        results["torch"]["fraction_of_model_matmul_peak"] = torch_flops / results["model_matmul_peak_flops"]
        # The ratio jaxalign would reach if its whole step ran at the peak of its own matrix products.
        results["speedup_vs_torch_ceiling"] = results["model_matmul_peak_flops"] / torch_flops
    if "tunix" in results:
        results["speedup_vs_tunix"] = results["jaxalign"]["tokens_per_s"] / results["tunix"]["tokens_per_s"]
    results["load_average_after"] = os.getloadavg()

    print(f"model: {setup.total_params() / 1e6:.1f}M parameters, batch {setup.batch_size} x {setup.seq_len}, "
          f"{setup.dtype}, remat {setup.remat}; {results['machine']}")
    print(f"{setup.dtype} matmul peak ({peak_size}^3): {results['matmul_peak_flops'] / 1e9:.1f} GFLOP/s; "
          f"the step's own matmul shapes alone: {results['model_matmul_peak_flops'] / 1e9:.1f} GFLOP/s")
    jx = results["jaxalign"]
    print(f"jaxalign: {jx['tokens_per_s']:.0f} tokens/s (median {jx['step_s']:.2f} s/step of {jx['step_s_all']}, "
          f"first step {jx['first_step_s']:.1f} s)"
          f", {model_flops / 1e9:.1f} model GFLOP/s = {100 * jx['fraction_of_matmul_peak']:.1f}% of the square "
          f"matmul peak, {100 * jx['fraction_of_model_matmul_peak']:.1f}% of the step's own matmul shapes' peak")
    if "torch" in results:
        th = results["torch"]
        print(f"pytorch:  {th['tokens_per_s']:.0f} tokens/s (median {th['step_s']:.2f} s/step of {th['step_s_all']}, "
              f"{th['threads']} threads)")
        print(f"jaxalign / pytorch: {results['speedup_vs_torch']:.2f}x; pytorch's step at "
              f"{100 * th['fraction_of_model_matmul_peak']:.1f}% of jaxalign's own-shape matmul peak, so a jaxalign "
              f"step at 100% of it would be {results['speedup_vs_torch_ceiling']:.2f}x")
    if "tunix" in results:
        tx = results["tunix"]
        print(f"tunix:    {tx['tokens_per_s']:.0f} tokens/s (median {tx['step_s']:.2f} s/step of {tx['step_s_all']})")
        print(f"jaxalign / tunix: {results['speedup_vs_tunix']:.2f}x")
    if "breakdown_s" in jx:
        print("jaxalign step parts (s): " + ", ".join(f"{k} {v}" for k, v in jx["breakdown_s"].items()))
    print(f"load average before / after: {results['load_average_before']} / {results['load_average_after']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
