"""The one training loop every algorithm uses.

    state = train(config, algorithm)

- `config`: a `RunConfig` (or a command's config built on it): output_dir, seed, train.*, optimizer.*,
  checkpoint.*, mesh.*.
- `algorithm`: a `jaxalign.train.algorithm.Algorithm`: trainable parameter trees with their optimisers, frozen
  models, a batch source, a pure loss and an evaluation; its module docstring is the contract.

Writes OUTPUT_DIR/metrics.jsonl (one JSON object per line with `step`; training lines every `train.log_every` steps
with every metric pooled over the steps since the previous line by its own count (`loss`, the loss's metrics,
`grad_norm`, host metrics of the batch source; a metric with a zero count in the window is left out), `lr` of the last step, and `tokens_per_s`, the real (non-padding)
tokens of the global batches per second of wall time; eval lines `eval_<metric>`) and OUTPUT_DIR/tensorboard.
Checkpoints go to OUTPUT_DIR/checkpoints every `checkpoint.every` steps (or at the next step where the batch source
can checkpoint) and at the end (always; extending a run whose end fell inside a source iteration warns that the
longer run is not identical to an uninterrupted one); rerunning the same command resumes from the latest complete one with identical
metrics. OUTPUT_DIR/config.yaml keeps the run's config; a rerun whose training settings differ is refused before
anything changes (`jaxalign.train.run_dir`). The console shows the loss of each logged step and every eval line.
SIGTERM / Ctrl-C finish the current step, save if the batch source is at a consistent point, and raise
`jaxalign.train.stop.TrainingStopped` (exit status 143 / 130); a NaN or inf loss or gradient norm raises
`JaxalignError` naming the step before anything from that step is saved.

With several processes every process calls `train` with its own share of the data; OUTPUT_DIR must be a folder
all hosts share (NFS, gcsfuse), since each host writes its own shards of a checkpoint there.
"""

import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign import sharding as shd
from jaxalign import storage
from jaxalign.config import RunConfig
from jaxalign.errors import JaxalignError
from jaxalign.train import run_dir
from jaxalign.train import state as st
from jaxalign.train import stop
from jaxalign.train.algorithm import Algorithm, Frozen, Mean, StepContext, Trainable, add_means
from jaxalign.train.checkpoint import Checkpointer
from jaxalign.train.optim import make_optimizer, make_schedule
from jaxalign.train.step import eval_sums, train_step


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything about where the state lives: mesh, rules, each trainable's optimiser and schedule, the state's
    shardings and shapes, and the shardings of the frozen models' params."""

    mesh: Mesh
    rules: tuple
    txs: dict[str, optax.GradientTransformation]
    schedules: dict[str, optax.Schedule]
    shardings: st.TrainState
    abstract: st.TrainState
    frozen_shardings: dict[str, Any]


def model_init_fn(model, part: Callable[[Any], Any] | None = None) -> Callable[[jax.Array], Any]:
    """`rng -> boxed params` for a model whose `__call__` takes int32 token ids `[batch, length]`; with `part`, only
    the subtree `part(params)`."""
    select = part or (lambda tree: tree)
    return lambda rng: select(model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])


def plan(config: RunConfig, trainables: Mapping[str, Trainable], frozen: Mapping[str, Frozen] | None = None,
         devices=None) -> Layout:
    """Builds the mesh and the shardings of the state and the frozen models from config, allocating nothing."""
    return _layout(config, trainables, frozen or {}, shd.make_mesh(config.mesh, devices))


@contextlib.contextmanager
def inference(config: RunConfig, models: Mapping[str, Frozen]):
    """For work on the training mesh outside training (rejection sampling's generation and scoring): yields a
    `StepContext` (step 0, no train state) whose `frozen` holds each of `models` loaded onto the mesh of
    `config.mesh` with its logical-axis shardings, under that mesh and its rules. The weights are released when the
    block ends (unless the caller keeps them).

        with inference(config, {"policy": Frozen(model, source.load)}) as context:
            tokens = sampler(context.frozen["policy"], prompts, rng, context.mesh, context.rules)
    """
    layout = plan(config, {}, models)
    with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        params = {name: model.load(layout.frozen_shardings[name]) for name, model in models.items()}
        yield StepContext(0, None, params, layout.mesh, layout.rules)


@dataclasses.dataclass(frozen=True)
class StateMemory:
    """Per-device bytes of each trainable's params and optimiser state and of each frozen model's params on a mesh
    of `mesh_shape` with logical `rules`, and the parameter counts (whole models)."""

    mesh_shape: dict[str, int]
    rules: tuple
    params: dict[str, int]
    optimizer: dict[str, int]
    frozen: dict[str, int]
    counts: dict[str, int]


def state_memory(config: RunConfig, trainables: Mapping[str, Trainable], device_count: int | None = None,
                 frozen: Mapping[str, Frozen] | None = None) -> StateMemory:
    """What the loop would place per device for `config.mesh` over `device_count` devices (default: the devices
    present), from shapes and shardings only: nothing is allocated, so a pod is planned on a laptop."""
    shape = shd.mesh_shape(config.mesh, jax.device_count() if device_count is None else device_count)
    mesh = jax.sharding.AbstractMesh(shape, shd.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    frozen = frozen or {}
    layout = _layout(config, trainables, frozen, mesh)
    frozen_layouts = {name: _model_layout(f.model, mesh, layout.rules, f.part) for name, f in frozen.items()}
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    return StateMemory(
        dict(zip(shd.MESH_AXES, shape)),
        tuple(layout.rules),
        {name: st.predicted_bytes_per_device(layout.abstract.params[name], layout.shardings.params[name])
         for name in trainables},
        {name: st.predicted_bytes_per_device(layout.abstract.opt_state[name], layout.shardings.opt_state[name])
         for name in trainables},
        {name: st.predicted_bytes_per_device(abstract, shardings)
         for name, (shardings, abstract) in frozen_layouts.items()},
        {**{name: count(layout.abstract.params[name]) for name in trainables},
         **{name: count(abstract) for name, (_, abstract) in frozen_layouts.items()}},
    )


def _layout(config: RunConfig, trainables: Mapping[str, Trainable], frozen: Mapping[str, Frozen], mesh) -> Layout:
    rules = shd.logical_rules(config.mesh)
    _check_batch_fits(config, mesh, rules)
    txs = {name: make_optimizer(t.optimizer, config.train.steps) for name, t in trainables.items()}
    schedules = {name: make_schedule(t.optimizer, config.train.steps) for name, t in trainables.items()}
    params_shardings, abstract_params = {}, {}
    for name, trainable in trainables.items():
        params_shardings[name], abstract_params[name] = _model_layout(trainable.model, mesh, rules, trainable.part)
    frozen_shardings = {name: _model_layout(f.model, mesh, rules, f.part)[0] for name, f in frozen.items()}
    shardings = st.state_shardings(abstract_params, params_shardings, txs, mesh)
    return Layout(mesh, rules, txs, schedules, shardings, st.abstract_state(abstract_params, txs, shardings),
                  frozen_shardings)


def fresh_state(layout: Layout, trainables: Mapping[str, Trainable], seed: int) -> st.TrainState:
    """Step 0: each trainable's `init(shardings)` (or random weights from `seed`) and a new optimiser state, all
    created on the layout's shardings. Call under `jax.set_mesh(layout.mesh)` and the layout's logical rules."""
    keys, state_rng = st.param_rngs(seed, trainables)
    params = {}
    for name, trainable in trainables.items():
        shardings = layout.shardings.params[name]
        if trainable.init is not None:
            params[name] = trainable.init(shardings)
        else:
            params[name] = st.init_params(model_init_fn(trainable.model, trainable.part), keys[name], shardings)
    return st.state_from_params(params, layout.txs, state_rng, layout.shardings)


def _model_layout(model, mesh, rules, part=None):
    boxed = jax.eval_shape(model_init_fn(model, part), jax.random.PRNGKey(0))
    return st.param_shardings(boxed, mesh, rules), nn.meta.unbox(boxed)


def _check_batch_fits(config: RunConfig, mesh, rules) -> None:
    axes, shards = shd.batch_axes(mesh, rules)
    micro = config.train.batch_size // config.train.grad_accum
    if micro % shards:
        names = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
        raise JaxalignError(
            f"config key 'train.batch_size': {config.train.batch_size} rows / train.grad_accum="
            f"{config.train.grad_accum} = {micro} rows per micro-batch, not a multiple of the {shards} batch shards "
            f"({names})"
        )
    if config.train.batch_size % jax.process_count():
        raise JaxalignError(
            f"config key 'train.batch_size': {config.train.batch_size} rows do not split over "
            f"{jax.process_count()} processes"
        )


def train(config: RunConfig, algorithm: Algorithm, *, allow_config_change: bool = False) -> st.TrainState:
    """Trains until `config.train.steps` and returns the final state; see the module docstring.

    Raises `JaxalignError` when OUTPUT_DIR holds a run with other training settings (unless `allow_config_change`),
    and `jaxalign.train.stop.TrainingStopped` after saving when SIGTERM / SIGINT stopped the run."""
    layout = plan(config, algorithm.trainables, algorithm.frozen)
    for trainable in algorithm.trainables.values():
        if trainable.optimizer.warmup_steps > config.train.steps:
            _say(f"warning: config key '{trainable.optimizer_key}.warmup_steps': {trainable.optimizer.warmup_steps} "
                 f"warmup steps exceed train.steps={config.train.steps}; the learning rate warms up over the whole "
                 "run and never reaches its peak")
    out = storage.location(config.output_dir)
    changes = run_dir.check_config(config, allow_config_change)
    training_changes = [str(change) for change in changes if not change.changeable]
    if training_changes:
        _say(f"warning: continuing {out} with changed settings: {'; '.join(training_changes)}")
    previous_steps = next((c.old for c in changes if c.key == "train.steps"), None)
    checkpointer = Checkpointer(out / "checkpoints", config.checkpoint.keep, config.checkpoint.async_save)
    with stop.deferred() as stop_request, jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        try:
            return _Run(config, layout, algorithm, checkpointer, out, previous_steps).run(stop_request)
        finally:
            checkpointer.close()


class _Run:
    def __init__(self, config: RunConfig, layout: Layout, algorithm: Algorithm, checkpointer: Checkpointer,
                 out: os.PathLike, previous_steps: int | None):
        self.config, self.layout, self.algorithm = config, layout, algorithm
        self.checkpointer, self.out, self.previous_steps = checkpointer, out, previous_steps
        self.source = algorithm.source
        self.frozen = {name: f.load(layout.frozen_shardings[name]) for name, f in algorithm.frozen.items()}
        self.step_fn = None
        self.eval_fn = None

    def context(self, step: int, state) -> StepContext:
        return StepContext(step, state, self.frozen, self.layout.mesh, self.layout.rules)

    def initial_state(self) -> tuple[int, st.TrainState]:
        layout = self.layout
        restored = self.checkpointer.restore_latest(layout.abstract)
        if restored is not None:
            start, state, data_state = restored
            self.source.load_state_dict(data_state["source"])
            if not data_state["consistent"] and start < self.config.train.steps:
                _say(f"warning: checkpoint step {start} was saved at the end of a run, inside an iteration of the "
                     "batch source; training on restarts that iteration, so the result differs from one longer run "
                     "(choose train.steps at the source's iteration boundaries to extend runs exactly)")
            if start >= self.config.train.steps:
                _say(f"{self.out} already finished at step {start} (train.steps={self.config.train.steps}); nothing "
                     "to train (raise train.steps to train on)")
            else:
                _say(f"resumed from {self.checkpointer.directory / str(start)} at step {start}")
                self.warn_if_schedule_moved(start)
            return start, state
        return 0, fresh_state(layout, self.algorithm.trainables, self.config.seed)

    def warn_if_schedule_moved(self, start: int) -> None:
        """A changed train.steps stretches step-dependent schedules (decay, warmup_ratio): say where the rate jumps."""
        if self.previous_steps is None or self.previous_steps == self.config.train.steps:
            return
        for name, trainable in self.algorithm.trainables.items():
            before = float(make_schedule(trainable.optimizer, self.previous_steps)(start))
            now = float(self.layout.schedules[name](start))
            if not math.isclose(before, now, rel_tol=1e-6):
                _say(f"warning: train.steps changed {self.previous_steps} → {self.config.train.steps}: the learning "
                     f"rate of '{name}' at step {start} moves from {before:.4g} to {now:.4g}")

    def run(self, stop_request: stop.StopRequest) -> st.TrainState:
        config, checkpointer = self.config, self.checkpointer
        start, state = self.initial_state()
        run_dir.save_config(config)
        logger = _MetricsLogger(self.out, start, jax.process_index() == 0)
        signals = _SharedStop(stop_request)
        total = config.train.steps
        last_saved = start
        checkpoint_pending = False
        try:
            progress = _progress(jax.process_index() == 0, start, total)
            step = start
            if config.train.eval_at_start and start == 0:
                self.log_evaluation(state, 0, logger, progress)
            window = _Window(time.perf_counter())
            while step < total:
                try:
                    batch, host_metrics = self.source.next_batch(self.context(step, state))
                except StopIteration:
                    raise JaxalignError(
                        f"the training data ran out after step {step} of train.steps={total}") from None
                batch = self.global_batch(batch)
                if self.step_fn is None:
                    self.step_fn = self.compile_step(batch)
                state, metrics, real_tokens = self.step_fn(state, self.frozen, batch)
                step += 1
                stop_request.arm()
                window.add(step, metrics, host_metrics, real_tokens)
                progress.update(1)
                due = bool(config.checkpoint.every) and step % config.checkpoint.every == 0
                checkpoint_pending = checkpoint_pending or due
                stopping = signals.requested()
                if step % config.train.log_every == 0 or step == total or stopping:
                    window.check_finite()  # waits for the window's steps, so the clock includes their device time
                    line = window.line(time.perf_counter())
                    logger.write(line)
                    progress.set_postfix(loss=f"{line['loss']:.4f}")
                    window = _Window(time.perf_counter())
                elif checkpoint_pending:
                    window.check_finite()
                if config.train.eval_every and step % config.train.eval_every == 0:
                    self.log_evaluation(state, step, logger, progress)
                consistent = self.source.can_checkpoint()
                if (checkpoint_pending or stopping) and consistent or step == total:
                    checkpointer.save(step, state, {"source": self.source.state_dict(), "consistent": consistent})
                    last_saved, checkpoint_pending = step, False
                if stopping:
                    progress.close()
                    checkpointer.wait()
                    if last_saved == step:
                        where = f"checkpoint saved in {checkpointer.directory / str(step)}"
                    else:
                        where = (f"not at a point the run can be saved; the last checkpoint is step {last_saved}"
                                 if last_saved else "no checkpoint was saved yet")
                    message = (f"stopped by {signals.signal_name} after step {step}; {where}; run the same command "
                               "again to resume")
                    _say(message)
                    raise stop.TrainingStopped(signals.signal_number, message)
            progress.close()
            return state
        finally:
            logger.close()

    def log_evaluation(self, state, step: int, logger, progress) -> None:
        """Evaluates at `step`, writes the eval line to metrics.jsonl / TensorBoard and prints it."""
        eval_line = self.evaluate(state, step)
        if eval_line is None:
            return
        logger.write(eval_line)
        keys = sorted((k for k in eval_line if k != "step"), key=lambda k: (k != "eval_loss", k))
        shown = " ".join(f"{k} {eval_line[k]:.4f}" for k in keys)
        progress.write(f"jaxalign: step {step}/{self.config.train.steps} {shown}")

    def global_batch(self, batch: dict) -> dict:
        """Process-local numpy rows become global arrays on the mesh; arrays already global pass through."""
        local = {k: v for k, v in batch.items() if not isinstance(v, jax.Array)}
        if not local:
            return batch
        return {**batch, **shd.global_batch(local, self.layout.mesh, self.layout.rules)}

    def compile_step(self, batch: dict):
        layout = self.layout
        batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
        replicated = NamedSharding(layout.mesh, PartitionSpec())
        batch_spec = shd.spec_for(("batch",), layout.rules)

        def step(state, frozen, batch):
            state, metrics = train_step(state, frozen, batch, loss=self.algorithm.loss, txs=layout.txs,
                                        schedules=layout.schedules, grad_accum=self.config.train.grad_accum,
                                        batch_spec=batch_spec)
            return state, metrics, real_token_count(batch)

        return jax.jit(step, in_shardings=(layout.shardings, layout.frozen_shardings, batch_shardings),
                       out_shardings=(layout.shardings, replicated, replicated), donate_argnums=0)

    def evaluate(self, state, step: int) -> dict | None:
        algorithm = self.algorithm
        if algorithm.evaluate is not None:
            values = algorithm.evaluate(self.context(step, state))
            line = {"step": step, **{f"eval_{k}": float(v) for k, v in values.items()}}
        elif algorithm.eval_batches is not None:
            line = self.eval_loss_line(state, step)
        else:
            return None
        return {**line, **algorithm.eval_derived(line)} if algorithm.eval_derived else line

    def eval_loss_line(self, state, step: int) -> dict:
        layout = self.layout
        loss = self.algorithm.eval_loss or self.algorithm.loss
        replicated = NamedSharding(layout.mesh, PartitionSpec())
        limit = self.config.train.eval_batches or None
        totals = None
        for batch in itertools.islice(self.algorithm.eval_batches(), limit):
            batch = self.global_batch(batch)
            if self.eval_fn is None:  # compiled once per run; jit keeps one program per batch shape
                self.eval_fn = jax.jit(lambda p, f, b: eval_sums(loss, p, f, b),
                                       in_shardings=(layout.shardings.params, layout.frozen_shardings,
                                                     jax.tree.map(lambda x: x.sharding, batch)),
                                       out_shardings=replicated)
            sums = jax.device_get(self.eval_fn(state.params, self.frozen, batch))  # summed on the host
            totals = sums if totals is None else add_means(totals, sums)
        if totals is None:
            raise JaxalignError("the evaluation data yielded no batches")
        return {"step": step, **{f"eval_{k}": m.value() for k, m in totals.items() if k == "loss" or m.count}}


def real_token_count(batch: dict) -> jax.Array:
    """Non-padding tokens of a batch: `!= 0` summed over every `*segment_ids` array (padding is segment 0; a
    preference batch has `chosen_segment_ids` and `rejected_segment_ids`), otherwise every position of the first
    array's `[batch, length]`."""
    segments = [value for key, value in batch.items() if key.endswith("segment_ids")]
    if segments:
        return sum(jnp.sum(value != 0, dtype=jnp.int32) for value in segments)
    first = jax.tree.leaves(batch)[0]
    return jnp.asarray(math.prod(first.shape[:2]), jnp.int32)


class _Window:
    """Per-step metrics since the last log line, kept on device until a check or a log line needs them (no host
    sync every step)."""

    def __init__(self, started: float):
        self.started = started
        self.steps: list[int] = []
        self.pending: list[tuple[dict, Any]] = []
        self.fetched: list[dict] = []
        self.host: dict[str, Mean] = {}
        self.tokens = 0

    def add(self, step: int, metrics: dict, host_metrics: dict, real_tokens) -> None:
        self.steps.append(step)
        self.pending.append((metrics, real_tokens))
        host = {k: v if isinstance(v, Mean) else Mean(float(v), 1.0) for k, v in host_metrics.items()}
        self.host = add_means(self.host, host)

    def check_finite(self) -> None:
        """Raises naming the first step whose loss or gradient norm is NaN or inf."""
        values = jax.device_get(self.pending)
        first = len(self.fetched)
        self.pending = []
        for step, (metrics, real_tokens) in zip(self.steps[first:], values):
            self.fetched.append(metrics)
            self.tokens += int(real_tokens)
            for key in ("loss", "grad_norm"):
                value = metrics[key].value()
                if not math.isfinite(value):
                    raise JaxalignError(
                        f"step {step}: {key} is {value}; stopping without saving this state (the last good "
                        f"checkpoint is kept). Lower optimizer.lr, check the data, or enable optimizer.clip"
                    )

    def line(self, now: float) -> dict:
        """The log line: each metric pooled over the window by its own count, `lr` of the last step, and the
        real-token throughput."""
        self.check_finite()
        line = {"step": self.steps[-1]}
        pooled: dict[str, Mean] = {}
        for metrics in self.fetched:
            pooled = add_means(pooled, metrics)
        for key, mean in {**pooled, **self.host}.items():
            if not mean.count and key != "loss":
                continue  # nothing to average in this window (e.g. no pair of some strength)
            line[key] = float(self.fetched[-1][key].value()) if key.split("/")[0] == "lr" else mean.value()
        line["tokens_per_s"] = self.tokens / max(now - self.started, 1e-9)
        return line


class _MetricsLogger:
    """metrics.jsonl + TensorBoard from process 0. On resume, lines of steps after the restored one (a run that
    went on past its last checkpoint before dying) are dropped so the file reads as one run."""

    def __init__(self, out: os.PathLike, start: int, primary: bool):
        self.primary = primary
        self.path = out / "metrics.jsonl"
        self.tensorboard = None
        if not primary:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _logged_step(line, start)]
            storage.write_text(self.path, "".join(line + "\n" for line in kept))
        self.tensorboard = storage.tensorboard_writer(out / "tensorboard", purge_step=start + 1 if start else None)

    def write(self, line: dict) -> None:
        if not self.primary:
            return
        storage.append_lines(self.path, [json.dumps(line)])
        for key, value in line.items():
            if key != "step":
                group = "eval" if key.startswith("eval_") else "train"
                self.tensorboard.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, line["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class _SharedStop:
    """The loop's view of a stop request: with several processes every process learns of a signal any of them got,
    so all stop after the same step."""

    def __init__(self, request: stop.StopRequest):
        self.request = request
        self.signal_number = None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name

    def requested(self) -> bool:
        local = self.request.signal_number or 0
        if jax.process_count() > 1:
            local = int(np.max(multihost_utils.process_allgather(np.array([local], np.int32))))
        self.signal_number = local or None
        return self.signal_number is not None


class _PlainProgress:
    """Progress without a terminal (logs, CI, batch jobs): one line per logged step on process 0, and each line
    given to `write`."""

    def __init__(self, primary: bool, start: int, total: int):
        self.primary, self.step, self.total = primary, start, total

    def update(self, n):
        self.step += n

    def set_postfix(self, **values):
        if self.primary:
            shown = " ".join(f"{k} {v}" for k, v in values.items())
            self.write(f"jaxalign: step {self.step}/{self.total} {shown}")

    def write(self, line: str):
        if self.primary:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        pass


def _progress(primary: bool, start: int, total: int):
    """A tqdm bar on a terminal with a width (a terminal of 0 columns, as some containers give, shows no bar);
    otherwise plain lines. Both show the loss of each logged step and print the lines given to `write`."""
    if not (primary and sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns > 0):
        return _PlainProgress(primary, start, total)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
    bar.write = lambda line: tqdm.write(line, file=sys.stderr)
    return bar


def _logged_step(line: str, start: int) -> bool:
    """Whether a metrics.jsonl line is kept on resume from `start`: a complete line of a step up to `start` (a line
    cut short by a killed process is dropped)."""
    try:
        return bool(line.strip()) and json.loads(line).get("step", 0) <= start
    except json.JSONDecodeError:
        return False


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(f"jaxalign: {message}", file=sys.stderr, flush=True)
