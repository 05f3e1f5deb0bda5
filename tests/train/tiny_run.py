"""Test driver: trains the tiny Llama on synthetic tokens with the one training loop.

    python tests/train/tiny_run.py OUTPUT_DIR [key.sub=value ...] [--algorithm sft|toy] [--step-delay S]
        [--nan-at STEP] [--allow-config-change] [--coordinator HOST:PORT --num-processes N --process-id I]

`sft` (default) trains on synthetic tokens; `toy` is `tests/train/toy_algorithm.py` (two trainables, a frozen
reference, batches generated from the current policy).

Exits like the CLI: 0 after training, 2 on a JaxalignError, 143 / 130 when SIGTERM / SIGINT stopped it.
"""

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

TINY_OVERRIDES = [
    "train.steps=8", "train.batch_size=8", "train.seq_len=16", "train.log_every=1",
    "optimizer.name=adamw", "optimizer.lr=1e-2", "optimizer.schedule=constant", "optimizer.weight_decay=0.1",
    "checkpoint.every=2", "checkpoint.keep=3", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1",
]


class SyntheticTokens:
    """Deterministic LM batches: global batch i comes from seed (seed, i); each process yields its own rows."""

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0, step_delay: float = 0.0,
                 nan_at: int | None = None, process_index: int = 0, process_count: int = 1):
        self.batch_size, self.seq_len, self.vocab_size, self.seed = batch_size, seq_len, vocab_size, seed
        self.step_delay, self.nan_at = step_delay, nan_at
        self.process_index, self.process_count = process_index, process_count
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        time.sleep(self.step_delay)
        rng = np.random.default_rng([self.seed, self.position])
        tokens = rng.integers(3, self.vocab_size, (self.batch_size, self.seq_len + 1), dtype=np.int32)
        mask = (rng.random((self.batch_size, self.seq_len)) < 0.8).astype(np.int32)
        self.position += 1
        rows = slice(self.process_index * self.batch_size // self.process_count,
                     (self.process_index + 1) * self.batch_size // self.process_count)
        batch = {
            "input_ids": tokens[rows, :-1],
            "targets": tokens[rows, 1:],
            "loss_mask": mask[rows],
            "segment_ids": np.ones_like(mask[rows]),
            "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), mask[rows].shape).copy(),
        }
        if self.nan_at is not None:
            batch["poison"] = np.full_like(mask[rows], int(self.position == self.nan_at))
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def tiny_model():
    from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig.tiny(scan_layers=True))


def poisonable(loss_fn):
    """`loss_fn` whose loss turns NaN on a batch that carries a non-zero `poison` entry."""
    import jax.numpy as jnp

    def wrapped(params, frozen, batch, rng):
        objective, metrics = loss_fn(params, frozen, batch, rng)
        if "poison" in batch:
            objective = objective.replace(total=jnp.where(jnp.any(batch["poison"] > 0), jnp.nan, objective.total))
        return objective, metrics

    return wrapped


class Delayed:
    """A batch source that waits `delay` seconds before each batch (so a test can signal a run mid-way)."""

    def __init__(self, source, delay: float):
        self.source, self.delay = source, delay

    def next_batch(self, context):
        time.sleep(self.delay)
        return self.source.next_batch(context)

    def can_checkpoint(self) -> bool:
        return self.source.can_checkpoint()

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--algorithm", choices=("sft", "toy"), default="sft")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--nan-at", type=int, default=None)
    parser.add_argument("--allow-config-change", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_intermixed_args(argv)

    from jaxalign.train import stop

    stop.install()
    from jaxalign import sharding
    from jaxalign.config import RunConfig, apply_overrides, from_dict
    from jaxalign.errors import JaxalignError

    try:
        sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        stop.install()
        import jax

        from jaxalign.objectives.sft import make_algorithm
        from jaxalign.train.loop import train

        data = apply_overrides({"output_dir": args.output_dir}, TINY_OVERRIDES + args.overrides)
        config = from_dict(RunConfig, data)
        if args.algorithm == "toy":
            from tests.train.toy_algorithm import make_toy_algorithm

            algorithm = make_toy_algorithm(config.optimizer, config.train.batch_size, jax.process_index(),
                                           jax.process_count())
            algorithm = dataclasses.replace(algorithm, source=Delayed(algorithm.source, args.step_delay))
        else:
            model = tiny_model()
            tokens = SyntheticTokens(config.train.batch_size, config.train.seq_len, model.config.vocab_size,
                                     seed=config.seed, step_delay=args.step_delay, nan_at=args.nan_at,
                                     process_index=jax.process_index(), process_count=jax.process_count())
            algorithm = make_algorithm(model, config.optimizer, tokens)
            algorithm = dataclasses.replace(algorithm, loss=poisonable(algorithm.loss))
        state = train(config, algorithm, allow_config_change=args.allow_config_change)
        print(f"finished at step {int(state.step)}", flush=True)
    except JaxalignError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except stop.TrainingStopped as stopped:
        return stopped.code
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Nothing here needs torch; blocking it keeps tensorboardX from importing it (seconds per subprocess).
    sys.modules["torch"] = None
    sys.exit(main())
