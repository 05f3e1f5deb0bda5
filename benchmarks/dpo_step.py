"""DPO training step: jaxalign's real train step against TRL's DPOTrainer on the same architecture and tokens.

    python benchmarks/dpo_step.py                 # CPU: ~58M-parameter LLaMA, 8 pairs of 128 prompt + 128 completion
    python benchmarks/dpo_step.py --steps 5 --json dpo.json

One DPO step on both sides: the policy's forward and backward pass on the chosen and rejected sequences (stacked
into one batch of 2 x batch rows), a live forward pass of the reference model (a copy of the initial policy, no
precomputed log-probs), the sigmoid loss (beta 0.1) and an AdamW update (lr 1e-4 constant, 0.9 / 0.999, eps 1e-8,
no weight decay, global-norm clipping at 1.0), float32, no activation checkpointing, random initial weights of
the same untied LLaMA config (each library its own init).

- jaxalign: `jaxalign.objectives.dpo.make_loss_fn` with the reference model, inside
  `jaxalign.train.step.train_step`, compiled as the training loop compiles it (state donated, reference params as
  the frozen argument), on a fixed-shape preference batch from `jaxalign.data.packing.preference_batch`.
- TRL: `trl.DPOTrainer.train()` itself (its data collator, `training_step` -> `compute_loss` with the fused LM
  head, then the Trainer loop's gradient clipping, optimizer and scheduler step); a step is timed from the
  Trainer's `on_step_begin` to its `on_step_end` callback, so the collation of the next batch is not counted
  (neither is the placement of jaxalign's batch).

Both see the same token ids: TRL gets the pairs as text over a word-level vocabulary (word `w{i}` is token i),
appends EOS to each completion as it does for any text dataset, and the script checks that its prepared ids equal
the ids jaxalign trains on (prompt + completion + EOS). Every step trains on the same batch of pairs.

Each side runs one untimed step first (compilation, allocation), then `--steps` timed steps alternating between the
two sides (the jaxalign steps run from TRL's `on_step_end` callback), so a change of load on a shared machine hits
both alike; pairs/s uses the median step.
"""

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np

PAD, EOS = 0, 2


@dataclasses.dataclass(frozen=True)
class Setup:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    batch_size: int  # pairs per step
    prompt_len: int
    completion_len: int  # including the EOS that ends each completion
    dtype: str = "float32"
    beta: float = 0.1

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.completion_len

    def total_params(self) -> int:
        per_layer = 4 * self.hidden_size * self.hidden_size + 3 * self.hidden_size * self.intermediate_size
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.num_layers * per_layer + 2 * self.vocab_size * self.hidden_size + norms


CPU = Setup(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
            batch_size=8, prompt_len=128, completion_len=128)


def random_pairs(setup: Setup, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """`batch_size` pairs of (prompt, chosen, rejected) token ids; each completion ends with EOS."""
    rng = np.random.default_rng(seed)

    def ids(n):
        return rng.integers(3, setup.vocab_size, n).tolist()

    return [(ids(setup.prompt_len), ids(setup.completion_len - 1) + [EOS], ids(setup.completion_len - 1) + [EOS])
            for _ in range(setup.batch_size)]


def jaxalign_steps(setup: Setup, pairs: list):
    """Generator of (seconds, loss) per step of `jaxalign.train.step.train_step` with the DPO loss and a live
    reference model, compiled as the training loop compiles it; the first step includes compilation."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from jaxalign import sharding as shd
    from jaxalign.config import RunConfig, from_dict
    from jaxalign.data.packing import preference_batch
    from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM
    from jaxalign.objectives.dpo import LossSettings, make_loss_fn
    from jaxalign.train.algorithm import Frozen, Trainable
    from jaxalign.train.loop import fresh_state, plan
    from jaxalign.train.step import train_step

    config = from_dict(RunConfig, {
        "train": {"steps": 1000, "batch_size": setup.batch_size, "seq_len": setup.seq_len},
        "optimizer": {"name": "adamw", "lr": 1e-4, "schedule": "constant", "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                      "weight_decay": 0.0, "clip": 1.0},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    })
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=setup.vocab_size, hidden_size=setup.hidden_size, intermediate_size=setup.intermediate_size,
        num_layers=setup.num_layers, num_heads=setup.num_heads, num_kv_heads=setup.num_heads,
        max_position_embeddings=setup.seq_len, dtype=setup.dtype, param_dtype="float32", remat="none",
    ))
    loss_fn = make_loss_fn(model, LossSettings(type="sigmoid", beta=setup.beta), "preference", reference_model=model)
    trainables = {"model": Trainable(model, config.optimizer)}

    def half(prompt, completion):
        return np.asarray(prompt + completion, np.int32), np.asarray([0] * len(prompt) + [1] * len(completion))

    batch = preference_batch([(half(p, c), half(p, r), 0, -1) for p, c, r in pairs], setup.seq_len, PAD)
    layout = plan(config, trainables, {"reference": Frozen(model, load=None)})
    with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        state = fresh_state(layout, trainables, config.seed)
        # the reference is the initial policy, in its own buffers (the state is donated every step)
        frozen = {"reference": jax.tree.map(jnp.copy, state.params["model"])}
        device_batch = shd.global_batch(batch, layout.mesh, layout.rules)
        batch_spec = shd.spec_for(("batch",), layout.rules)
        step = jax.jit(
            lambda s, f, b: train_step(s, f, b, loss=lambda p, f, b, r: loss_fn(p["model"], f["reference"], b, r),
                                       txs=layout.txs, schedules=layout.schedules, grad_accum=1,
                                       batch_spec=batch_spec),
            in_shardings=(layout.shardings, layout.frozen_shardings, jax.tree.map(lambda x: x.sharding, device_batch)),
            donate_argnums=0,
        )
        while True:
            start = time.perf_counter()
            state, metrics = step(state, frozen, device_batch)
            jax.block_until_ready(state)
            loss = metrics["loss"].value()
            yield time.perf_counter() - start, loss


def trl_trainer(setup: Setup, pairs: list, steps: int, folder: str):
    """`DPOTrainer` on a text dataset whose prepared ids are `pairs`, for `steps` optimizer steps."""
    import torch
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import DPOConfig, DPOTrainer

    vocab = {"<pad>": PAD, "<s>": 1, "</s>": EOS, **{f"w{i}": i for i in range(3, setup.vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", unk_token="<pad>")

    def words(ids):
        return " ".join(f"w{i}" for i in ids)

    dataset = Dataset.from_dict({  # without the final EOS, which DPOTrainer appends itself
        "prompt": [words(p) for p, _, _ in pairs],
        "chosen": [" " + words(c[:-1]) for _, c, _ in pairs],
        "rejected": [" " + words(r[:-1]) for _, _, r in pairs],
    })
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=setup.vocab_size, hidden_size=setup.hidden_size, intermediate_size=setup.intermediate_size,
        num_hidden_layers=setup.num_layers, num_attention_heads=setup.num_heads,
        num_key_value_heads=setup.num_heads, max_position_embeddings=setup.seq_len, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config)
    reference = copy.deepcopy(model)
    args = DPOConfig(
        output_dir=folder, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=setup.batch_size, max_steps=steps, max_length=None, beta=setup.beta,
        loss_type=["sigmoid"], precompute_ref_log_probs=False, learning_rate=1e-4, lr_scheduler_type="constant",
        warmup_steps=0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        logging_strategy="no", save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, seed=0,
    )
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    for row, (prompt, chosen, rejected) in zip(trainer.train_dataset, pairs):
        if (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != (prompt, chosen, rejected):
            raise RuntimeError("TRL's prepared token ids differ from jaxalign's")
    return trainer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per library")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--completion-len", type=int, default=None, help="completion tokens including EOS")
    parser.add_argument("--skip-trl", action="store_true", help="measure jaxalign only")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    changes = {k: v for k, v in (("batch_size", args.batch_size), ("prompt_len", args.prompt_len),
                                 ("completion_len", args.completion_len)) if v is not None}
    setup = dataclasses.replace(CPU, **changes)
    pairs = random_pairs(setup)

    import jax

    results = {
        "setup": dataclasses.asdict(setup),
        "parameters": setup.total_params(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"jax devices: {jax.devices()[0].device_kind} x {jax.device_count()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before": os.getloadavg(),
    }
    jx = results["jaxalign"] = {"step_s_all": [], "losses": []}
    runner = jaxalign_steps(setup, pairs)
    jx["first_step_s"], first_loss = next(runner)
    jx["first_loss"] = round(float(first_loss), 4)

    def jaxalign_step():
        seconds, loss = next(runner)
        jx["step_s_all"].append(round(seconds, 3))
        jx["losses"].append(round(float(loss), 4))

    if args.skip_trl:
        for _ in range(args.steps):
            jaxalign_step()
    else:
        import torch
        import transformers

        th = results["trl"] = {"step_s_all": [], "losses": []}

        class Alternate(transformers.TrainerCallback):
            """Times each TRL step and runs one jaxalign step after each but the last."""

            def __init__(self):
                self.start, self.loss_so_far = 0.0, 0.0

            def on_step_begin(self, args_, state, control, **kwargs):
                self.start = time.perf_counter()

            def on_step_end(self, args_, state, control, **kwargs):
                seconds = time.perf_counter() - self.start
                total = float(trainer._tr_loss)  # the Trainer's running sum of step losses (no logging resets it)
                loss, self.loss_so_far = total - self.loss_so_far, total
                if state.global_step == 1:
                    th["first_step_s"], th["first_loss"] = seconds, round(loss, 4)
                else:
                    th["step_s_all"].append(round(seconds, 3))
                    th["losses"].append(round(loss, 4))
                if state.global_step <= args.steps:
                    jaxalign_step()

        with tempfile.TemporaryDirectory() as folder:
            trainer = trl_trainer(setup, pairs, args.steps + 1, folder)
            trainer.add_callback(Alternate())
            trainer.train()
        th["threads"] = torch.get_num_threads()
        th["optimizer"] = str(trainer.args.optim)
        th["versions"] = f"trl {__import__('trl').__version__}, transformers {transformers.__version__}, " \
                         f"torch {torch.__version__}"

    for name in ("jaxalign", "trl"):
        if name in results:
            side = results[name]
            side["step_s"] = statistics.median(side["step_s_all"])
            side["pairs_per_s"] = setup.batch_size / side["step_s"]
    if "trl" in results:
        results["speedup_vs_trl"] = results["jaxalign"]["pairs_per_s"] / results["trl"]["pairs_per_s"]
    results["load_average_after"] = os.getloadavg()

    print(f"model: {setup.total_params() / 1e6:.1f}M parameters, {setup.batch_size} pairs of {setup.prompt_len} "
          f"prompt + {setup.completion_len} completion tokens, {setup.dtype}; {results['machine']}")
    print(f"jaxalign: {jx['pairs_per_s']:.2f} pairs/s (median {jx['step_s']:.2f} s/step of {jx['step_s_all']}, "
          f"first step {jx['first_step_s']:.1f} s); losses {[jx['first_loss']] + jx['losses']}")
    if "trl" in results:
        th = results["trl"]
        print(f"TRL:      {th['pairs_per_s']:.2f} pairs/s (median {th['step_s']:.2f} s/step of {th['step_s_all']}, "
              f"first step {th['first_step_s']:.1f} s, {th['threads']} threads, {th['optimizer']}; "
              f"{th['versions']}); losses {[th['first_loss']] + th['losses']}")
        print(f"jaxalign / TRL: {results['speedup_vs_trl']:.2f}x")
    print(f"{results['date']}; load average before / after: {results['load_average_before']} / "
          f"{results['load_average_after']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
