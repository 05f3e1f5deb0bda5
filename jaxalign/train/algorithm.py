"""What an algorithm gives the one training loop (`jaxalign.train.loop.train`), in one place.

The loop owns the mesh and the layout, creates the sharded state, compiles the step with shardings and donation,
logs (metrics.jsonl, TensorBoard, progress), evaluates on schedule, checkpoints with orbax, resumes exactly, stops on
SIGTERM / Ctrl-C / NaN with every process agreeing. An `Algorithm` gives:

- `trainables`: named parameter trees (`{"policy": ..., "value": ...}`), each a `Trainable` with its own model and
  optimiser settings. The train state holds `params[name]` and `opt_state[name]`; only these are checkpointed.
- `frozen`: named `Frozen` models (a reference policy, reward models). Each is loaded once onto the shardings of its
  logical axes, passed to the compiled step as an argument (never a captured constant, never donated) and never
  checkpointed: a resumed run loads it again from where it came from.
- `source`: a `BatchSource`. `next_batch(context)` may read the current state (to generate rollouts) and returns
  the batch (process-local numpy rows, or global `jax.Array`s already on the mesh) plus host-side metrics;
  `can_checkpoint()` says whether the run may be saved now (e.g. only between PPO iterations), and
  `state_dict()` / `load_state_dict()` carry what resume needs (data or prompt position).
- `loss(params, frozen, batch, rng) -> (objective, metrics)`: pure. `objective` is a `Mean`; the gradient is that of
  `objective.total` summed over the global batch (every device, every accumulation micro-batch) divided by the
  summed `objective.count`. `metrics` maps names to `Mean`s, each with its own count, so per-token and
  per-sequence means live side by side. `rng` is None in evaluation (deterministic).
- evaluation, either `eval_batches()` (a fresh iterable of batches; the loss is evaluated over them and every
  metric is pooled by its own count) or `evaluate(context)` (anything computed from the state, e.g.
  generate-and-score for RL), plus optional `eval_derived(line)` for quantities that are not ratios of sums.

Randomness comes from the state (`fold_in(state.rng, step)`), so a resumed run repeats the same draws.
"""

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from jaxalign.config import OptimizerConfig


@flax.struct.dataclass
class Mean:
    """A metric as a sum and the count it is averaged over: `total / count`, exact under any split of the batch.

    Both are float32 scalars inside jitted code; sums of `Mean`s (over micro-batches, devices, steps or eval
    batches) add totals and counts separately. A count of 0 reads as 0 (nothing to average).
    """

    total: Any
    count: Any

    @classmethod
    def of(cls, values: jax.Array, weights: jax.Array | None = None) -> "Mean":
        """The weighted mean of `values` (any shape) with `weights` (same shape; default all ones)."""
        values = jnp.asarray(values, jnp.float32)
        if weights is None:
            return cls(jnp.sum(values), jnp.asarray(values.size, jnp.float32))
        weights = jnp.asarray(weights, jnp.float32)
        return cls(jnp.sum(jnp.where(weights != 0, values * weights, 0.0)), jnp.sum(weights))

    @classmethod
    def scalar(cls, value) -> "Mean":
        """One observation with weight 1 (a step-level value such as a gradient norm or a timing)."""
        return cls(jnp.asarray(value, jnp.float32), jnp.asarray(1.0, jnp.float32))

    def __add__(self, other: "Mean") -> "Mean":
        return Mean(self.total + other.total, self.count + other.count)

    def value(self) -> float:
        """The mean as a Python float (fetches from the device)."""
        total, count = float(self.total), float(self.count)
        return total / count if count else 0.0


def is_mean(x) -> bool:
    return isinstance(x, Mean)


def add_means(a: Mapping[str, Mean], b: Mapping[str, Mean]) -> dict[str, Mean]:
    """Key-wise sum of two metric dicts; keys present in only one are kept."""
    merged = dict(a)
    for key, value in b.items():
        merged[key] = merged[key] + value if key in merged else value
    return merged


LossFn = Callable[[dict, dict, dict, jax.Array | None], tuple[Mean, dict[str, Mean]]]


@dataclasses.dataclass(frozen=True)
class Trainable:
    """A trained parameter tree: `model.init(rng, int32[1, 1])` gives its shapes and logical axes, `part(tree)` (if
    given) the subtree that is trained (e.g. LoRA adapters, `jaxalign.models.lora.split`); `init(shardings)`
    returns starting weights placed on those shardings (default: random, from `model.init`); `optimizer` its own
    optimiser and schedule, read from the config section `optimizer_key` (named in messages)."""

    model: nn.Module
    optimizer: OptimizerConfig
    init: Callable[[Any], Any] | None = None
    optimizer_key: str = "optimizer"
    part: Callable[[Any], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Frozen:
    """A model that is read but not trained: `load(shardings)` places its weights on the shardings of the model's
    logical axes (called once per run, also on resume); `part(tree)` (if given) selects the subtree it holds of
    `model`'s parameters (e.g. the base under LoRA adapters)."""

    model: nn.Module
    load: Callable[[Any], Any]
    part: Callable[[Any], Any] | None = None


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a batch source or an evaluation may read: the optimiser steps done, the current state (`state.params`
    by trainable name), the frozen params by name, and the mesh and logical rules they live on."""

    step: int
    state: Any
    frozen: Mapping[str, Any]
    mesh: Mesh
    rules: tuple


class BatchSource(Protocol):
    def next_batch(self, context: StepContext) -> tuple[dict, dict]:
        """(batch, host metrics): the batch as process-local numpy arrays `[B / process_count, ...]` or global
        `jax.Array`s on `context.mesh`; host metrics map names to floats or `Mean`s. Raises StopIteration when
        the data is exhausted."""

    def can_checkpoint(self) -> bool:
        """Whether the run is at a consistent point (a checkpoint due now waits until it is)."""

    def state_dict(self) -> dict:
        """JSON-able position, saved with every checkpoint."""

    def load_state_dict(self, state: dict) -> None:
        """Restores a position from `state_dict()`."""


class DataSource:
    """A `BatchSource` over a data iterable that does not depend on the model (SFT, reward and DPO data): the
    iterable yields process-local batches and has `state_dict()` / `load_state_dict()`. When it keeps running
    `stats` with `examples` (used) and `dropped` counts, as `jaxalign.data.DataLoader` does, the host metric
    `data/dropped` is the share of this process's examples dropped (too long, nothing to train) since the last batch."""

    def __init__(self, data: Iterable[dict]):
        self.data = data
        self._iterator: Iterator[dict] | None = None
        self._counted = self._counts()

    def next_batch(self, context: StepContext) -> tuple[dict, dict]:
        if self._iterator is None:
            self._iterator = iter(self.data)
        batch = next(self._iterator)
        counts = self._counts()
        if counts is None or self._counted is None:
            return batch, {}
        used, dropped = (now - before for now, before in zip(counts, self._counted))
        self._counted = counts
        return batch, {"data/dropped": Mean(float(dropped), float(used + dropped))}

    def _counts(self) -> tuple[int, int] | None:
        stats = getattr(self.data, "stats", None)
        if not isinstance(stats, dict) or "examples" not in stats or "dropped" not in stats:
            return None
        return int(stats["examples"]), int(stats["dropped"])

    def can_checkpoint(self) -> bool:
        return True

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state)
        self._iterator = None
        self._counted = self._counts()


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One training method as the loop runs it; see the module docstring for each field's contract."""

    trainables: Mapping[str, Trainable]
    loss: LossFn
    source: BatchSource
    frozen: Mapping[str, Frozen] = dataclasses.field(default_factory=dict)
    eval_batches: Callable[[], Iterable[dict]] | None = None
    eval_loss: LossFn | None = None
    evaluate: Callable[[StepContext], dict[str, float]] | None = None
    eval_derived: Callable[[dict], dict] | None = None

    def __post_init__(self):
        if not self.trainables:
            raise ValueError("an algorithm needs at least one trainable parameter tree")
        if self.eval_batches is not None and self.evaluate is not None:
            raise ValueError("give eval_batches (loss over eval data) or evaluate (a function of the state), not both")
