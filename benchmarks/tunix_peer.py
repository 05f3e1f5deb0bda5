"""Tunix's side of the benchmarks, run in Tunix's own virtual environment (it pins other transformers / tokenizers
versions than jaxalign), as a subprocess of `generate_throughput.py` / `sft_throughput.py --tunix-python PYTHON`:

    python -m venv ~/tunix-venv && ~/tunix-venv/bin/pip install google-tunix==0.1.7 "jax[cpu]"
    ~/tunix-venv/bin/python benchmarks/tunix_peer.py sample REQUEST.json
    ~/tunix-venv/bin/python benchmarks/tunix_peer.py sft REQUEST.json      # then one line "step" per step on stdin

`sample` REQUEST.json: {"model": HF folder (safetensors), "prompts": [[token ids], ...], "new_tokens": N,
"repeats": R}. Loads the folder into `tunix.models.llama3.Llama3` with Tunix's own safetensors loader, samples
greedily with `tunix.generate.sampler.Sampler` (prompts left-padded to the next power of two, a KV cache of prompt + N
slots), exactly N tokens per row (no stop token), once untimed (compilation), then R timed runs. Prints one JSON
line: {"runs_s": [...], "first_call_s": s, "tokens": [[N ids], ...], "tunix": version}.

`sft` REQUEST.json: {"model": {vocab_size, hidden_size, intermediate_size, num_layers, num_heads}, "batches":
[[[token ids] x B] ...]} (rows of L tokens). A randomly initialised untied `Llama3` in float32 trained by
`tunix.sft.peft_trainer.PeftTrainer`'s jitted train step (its default next-token loss over every position, the
causal mask and positions Tunix's SFT utilities build) with AdamW (0.9, 0.999, lr 1e-4) after global-norm clipping
at 1.0. For each line on stdin it runs one step on the next batch and prints {"seconds": s, "loss": x}.
"""

import json
import sys
import time
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from tunix.generate import sampler as sampler_lib
from tunix.models.llama3 import model as llama3
from tunix.models.llama3 import params as llama3_params
from tunix.sft import peft_trainer
from tunix.sft import utils as sft_utils


class TokenIds:
    """A "tokenizer" whose text is space-separated token ids, so that Tunix samples from exactly the token prompts
    the other frameworks get: no BOS is added (`bos_id` 0 means none), padding is id 0."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return self.vocab_size  # never sampled: every row runs the full N tokens

    def pad_id(self) -> int:
        return 0


def model_config(folder: Path) -> llama3.ModelConfig:
    hf = json.loads((folder / "config.json").read_text())
    heads = hf["num_attention_heads"]
    return llama3.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, num_kv_heads=hf.get("num_key_value_heads", heads),
        rope_theta=int(hf.get("rope_theta", 10000)), norm_eps=hf.get("rms_norm_eps", 1e-6),
        weight_tying=bool(hf.get("tie_word_embeddings", False)),
    )


def sample(request: dict) -> dict:
    folder = Path(request["model"])
    config = model_config(folder)
    model = llama3_params.create_model_from_safe_tensors(str(folder), config, dtype=jax.numpy.float32)
    prompts = request["prompts"]
    new_tokens = request["new_tokens"]
    prompt_slots = 1 << (max(len(p) for p in prompts) - 1).bit_length()
    cache = sampler_lib.CacheConfig(cache_size=prompt_slots + new_tokens, num_layers=config.num_layers,
                                    num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
    tokenizer = TokenIds(config.vocab_size)
    sampler = sampler_lib.Sampler(model, tokenizer, cache)
    texts = [tokenizer.decode(p) for p in prompts]

    def run():
        out = sampler(texts, max_generation_steps=new_tokens, max_prompt_length=prompt_slots,
                      eos_tokens=[tokenizer.eos_id()], temperature=0.0)
        return [np.asarray(t).tolist()[:new_tokens] for t in out.tokens]

    start = time.perf_counter()
    first = run()
    first_call = time.perf_counter() - start
    runs = []
    for _ in range(request["repeats"]):
        start = time.perf_counter()
        tokens = run()
        runs.append(time.perf_counter() - start)
    assert tokens == first
    return {"runs_s": runs, "first_call_s": first_call, "tokens": tokens, "tunix": metadata.version("google-tunix")}


def model_inputs(batch: peft_trainer.TrainingInput) -> dict:
    return {"input_tokens": batch.input_tokens, "input_mask": batch.input_mask,
            "positions": sft_utils.build_positions_from_mask(batch.input_mask),
            "attention_mask": sft_utils.make_causal_attn_mask(batch.input_mask)}


def sft(request: dict) -> None:
    shape = request["model"]
    heads = shape["num_heads"]
    config = llama3.ModelConfig(
        num_layers=shape["num_layers"], vocab_size=shape["vocab_size"], embed_dim=shape["hidden_size"],
        hidden_dim=shape["intermediate_size"], num_heads=heads, head_dim=shape["hidden_size"] // heads,
        num_kv_heads=heads, rope_theta=10000, norm_eps=1e-6, weight_tying=False,
    )
    model = llama3.Llama3(config, rngs=nnx.Rngs(0))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
    trainer = peft_trainer.PeftTrainer(model, optimizer, peft_trainer.TrainingConfig(eval_every_n_steps=10**9))
    train_step, _ = trainer.with_gen_model_input_fn(model_inputs).jit_train_and_eval_step(cache_nnx_graph=True)
    batches = [peft_trainer.TrainingInput(input_tokens=np.asarray(b, np.int32),
                                          input_mask=np.ones(np.shape(b), bool)) for b in request["batches"]]
    for index, _ in enumerate(sys.stdin):
        start = time.perf_counter()
        loss, _, _ = train_step(batches[index % len(batches)])
        loss = float(jax.block_until_ready(loss))
        print(json.dumps({"seconds": time.perf_counter() - start, "loss": loss}), flush=True)


if __name__ == "__main__":
    command, path = sys.argv[1:3]
    request = json.loads(Path(path).read_text())
    if command == "sample":
        print(json.dumps(sample(request)), flush=True)
    elif command == "sft":
        sft(request)
    else:
        raise SystemExit(f"unknown command {command!r}; expected: sample or sft")
