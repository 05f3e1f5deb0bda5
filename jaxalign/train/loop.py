"""The one training loop every algorithm uses.

    state = train(config, model, loss_fn, train_data, init_params=None, eval_data=None, eval_fn=None)

- `config`: a `RunConfig` (or subclass): output_dir, seed, train.*, optimizer.*, checkpoint.*, mesh.*.
- `model`: the flax module; `model.init(rng, int32[1, 1])` gives its parameter shapes and logical axis names.
- `loss_fn(params, batch, rng) -> (loss_sum, aux)`: pure; `aux["weight"]` is the denominator (e.g. trained tokens),
  other aux entries are sums. Logged values are sums over the global batch (all devices, all `train.grad_accum`
  micro-batches) divided by the total weight.
- `train_data`: iterable of process-local batches (dicts of numpy arrays, leading dim `train.batch_size /
  process_count`) with `state_dict()` / `load_state_dict(state)`; the position is saved with every checkpoint.
- `init_params(shardings) -> params` (optional): starting weights placed on the given NamedSharding pytree (e.g.
  `lambda sh: load_pretrained(path, shardings=sh)[1]`); default: `model.init` run directly on the shardings.
  Not called when a checkpoint is resumed.
- `eval_data() -> iterable of local batches` (optional, fresh each time) and `eval_fn(params, batch, rng)` (same
  contract as `loss_fn`, default `loss_fn`; called with `rng=None`, i.e. deterministic): every `train.eval_every`
  steps, at most `train.eval_batches` batches (0 = all).
- `eval_derived(line) -> dict` (optional): metrics computed from a finished eval line and added to it (SFT derives
  `eval_perplexity` from `eval_loss`, a quantity that is not a ratio of sums).

Writes OUTPUT_DIR/metrics.jsonl (one JSON object per line with `step`; training lines every `train.log_every` steps
with `loss`, `grad_norm` and the aux means averaged over the steps since the previous line, `lr` and `tokens_per_s`;
eval lines `eval_loss`, `eval_<aux>`) and OUTPUT_DIR/tensorboard. Checkpoints go
to OUTPUT_DIR/checkpoints every `checkpoint.every` steps and at the end; rerunning the same command resumes from the
latest complete one. SIGTERM / Ctrl-C finish the current step, save, and return normally; a NaN or inf loss or
gradient norm raises `JaxalignError` naming the step before anything from that step is saved.

With several processes every process calls `train` with its own share of the data; OUTPUT_DIR must be a folder
all hosts share (NFS, gcsfuse), since each host writes its own shards of a checkpoint there.
"""

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign import sharding as shd
from jaxalign.config import RunConfig
from jaxalign.errors import JaxalignError
from jaxalign.train import state as st
from jaxalign.train.checkpoint import Checkpointer
from jaxalign.train.optim import make_optimizer, make_schedule
from jaxalign.train.step import LossFn, eval_sums, train_step


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything about where the state lives: mesh, rules, optimiser and the state's shardings and shapes."""

    mesh: Mesh
    rules: tuple
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: st.TrainState
    abstract: st.TrainState


def model_init_fn(model) -> Callable[[jax.Array], Any]:
    """`rng -> boxed params` for a model whose `__call__` takes int32 token ids `[batch, length]`."""
    return lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def plan(config: RunConfig, model, devices=None) -> Layout:
    """Builds the mesh and the state's shardings from config, without allocating anything."""
    return _layout(config, model, shd.make_mesh(config.mesh, devices))


def memory_report(config: RunConfig, model, device_count: int | None = None) -> str:
    """Predicted per-device bytes of params + optimiser state for `config.mesh` over `device_count` devices
    (default: the devices present). Nothing is allocated, so any device count can be planned from one CPU:

        print(memory_report(config, LlamaForCausalLM(LlamaConfig(...)), device_count=256))
    """
    shape = shd.mesh_shape(config.mesh, jax.device_count() if device_count is None else device_count)
    mesh = jax.sharding.AbstractMesh(shape, shd.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    layout = _layout(config, model, mesh)
    sizes = ", ".join(f"{k}={v}" for k, v in zip(shd.MESH_AXES, shape))
    return f"mesh {sizes} ({int(np.prod(shape))} devices)\n" + st.memory_report(layout.abstract, layout.shardings)


def _layout(config: RunConfig, model, mesh) -> Layout:
    rules = shd.logical_rules(config.mesh)
    _check_batch_fits(config, mesh, rules)
    tx = make_optimizer(config.optimizer, config.train.steps)
    schedule = make_schedule(config.optimizer, config.train.steps)
    boxed = jax.eval_shape(model_init_fn(model), jax.random.PRNGKey(0))
    params_shardings = st.param_shardings(boxed, mesh, rules)
    abstract_params = nn.meta.unbox(boxed)
    shardings = st.state_shardings(abstract_params, params_shardings, tx, mesh)
    return Layout(mesh, rules, tx, schedule, shardings, st.abstract_state(abstract_params, tx, shardings))


def _check_batch_fits(config: RunConfig, mesh, rules) -> None:
    axes = shd.spec_for(("batch",), rules)[0] or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    shards = int(np.prod([mesh.shape[a] for a in axes]))
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


def train(config: RunConfig, model, loss_fn: LossFn, train_data, *,
          init_params: Callable[[Any], Any] | None = None,
          eval_data: Callable[[], Iterable[dict]] | None = None,
          eval_fn: LossFn | None = None,
          eval_derived: Callable[[dict], dict] | None = None) -> st.TrainState:
    """Trains until `config.train.steps` (or a stop signal) and returns the final state; see the module docstring."""
    layout = plan(config, model)
    out = Path(config.output_dir)
    primary = jax.process_index() == 0
    if primary:
        out.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(out / "checkpoints", config.checkpoint.keep, config.checkpoint.async_save)
    with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        try:
            return _run(config, layout, model, loss_fn, train_data, init_params, eval_data, eval_fn or loss_fn,
                        eval_derived, checkpointer, out, primary)
        finally:
            checkpointer.close()


def _run(config, layout: Layout, model, loss_fn, train_data, init_params, eval_data, eval_fn, eval_derived,
         checkpointer, out: Path, primary: bool) -> st.TrainState:
    restored = checkpointer.restore_latest(layout.abstract)
    if restored is not None:
        start, state, data_state = restored
        train_data.load_state_dict(data_state)
        _say(f"resumed from {checkpointer.directory / str(start)} at step {start}")
    else:
        start = 0
        if init_params is not None:
            state = st.state_from_params(init_params(layout.shardings.params), layout.tx, config.seed,
                                         layout.shardings)
        else:
            state = st.init_state(model_init_fn(model), layout.tx, config.seed, layout.shardings)
    logger = _MetricsLogger(out, start, primary)
    stop = _StopRequest()
    total = config.train.steps
    step_fn = None
    last_saved = start
    try:
        batches = iter(train_data)
        progress = _progress(primary, start, total)
        step = start
        window = _Window(time.perf_counter())
        while step < total:
            try:
                local = next(batches)
            except StopIteration:
                raise JaxalignError(f"the training data ran out after step {step} of train.steps={total}") from None
            batch = shd.global_batch(local, layout.mesh, layout.rules)
            if step_fn is None:
                step_fn = _compile_step(config, layout, loss_fn, batch)
            state, metrics = step_fn(state, batch)
            step += 1
            window.add(step, metrics, _token_count(batch))
            progress.update(1)
            checkpoint_due = config.checkpoint.every and step % config.checkpoint.every == 0
            stopping = stop.requested()
            if step % config.train.log_every == 0 or step == total or stopping:
                window.check_finite()  # waits for the window's steps, so the clock below includes their device time
                line = window.line(time.perf_counter())
                logger.write(line)
                progress.set_postfix(loss=f"{line['loss']:.4f}")
                window = _Window(time.perf_counter())
            elif checkpoint_due:
                window.check_finite()
            if config.train.eval_every and eval_data is not None and step % config.train.eval_every == 0:
                eval_line = _evaluate(config, layout, eval_fn, state, eval_data, step)
                logger.write({**eval_line, **eval_derived(eval_line)} if eval_derived else eval_line)
            if checkpoint_due or step == total or stopping:
                checkpointer.save(step, state, train_data.state_dict())
                last_saved = step
            if stopping:
                checkpointer.wait()
                _say(f"stopped by {stop.signal_name} after step {step}; checkpoint saved in "
                     f"{checkpointer.directory / str(step)}; run the same command again to resume")
                break
        progress.close()
        if last_saved != step:
            checkpointer.save(step, state, train_data.state_dict())
        return state
    finally:
        stop.restore()
        logger.close()


def _compile_step(config: RunConfig, layout: Layout, loss_fn, batch: dict):
    batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
    replicated = NamedSharding(layout.mesh, PartitionSpec())
    batch_spec = shd.spec_for(("batch",), layout.rules)

    def step(state, batch):
        return train_step(state, batch, loss_fn=loss_fn, tx=layout.tx, schedule=layout.schedule,
                          grad_accum=config.train.grad_accum, batch_spec=batch_spec)

    return jax.jit(step, in_shardings=(layout.shardings, batch_shardings),
                   out_shardings=(layout.shardings, replicated), donate_argnums=0)


def _evaluate(config: RunConfig, layout: Layout, eval_fn, state, eval_data, step: int) -> dict:
    replicated = NamedSharding(layout.mesh, PartitionSpec())
    compiled = None
    totals = None
    for index, local in enumerate(eval_data()):
        if config.train.eval_batches and index >= config.train.eval_batches:
            break
        batch = shd.global_batch(local, layout.mesh, layout.rules)
        if compiled is None:
            compiled = jax.jit(lambda p, b: eval_sums(eval_fn, p, b, None),
                               in_shardings=(layout.shardings.params, jax.tree.map(lambda x: x.sharding, batch)),
                               out_shardings=replicated)
        sums = compiled(state.params, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise JaxalignError("the evaluation data yielded no batches")
    totals = jax.device_get(totals)
    weight = max(float(totals.pop("weight")), 1.0)
    return {"step": step, **{f"eval_{k}": float(v) / weight for k, v in totals.items()}}


def _token_count(batch: dict) -> int:
    ids = batch.get("input_ids")
    if ids is None:
        ids = next(iter(batch.values()))
    return int(np.prod(ids.shape))


class _Window:
    """Per-step metrics since the last log line, kept on device until a check or a log line needs them (no host
    sync every step)."""

    def __init__(self, started: float):
        self.started = started
        self.steps: list[int] = []
        self.pending: list[dict] = []
        self.fetched: list[dict] = []
        self.tokens = 0

    def add(self, step: int, metrics: dict, tokens: int) -> None:
        self.steps.append(step)
        self.pending.append(metrics)
        self.tokens += tokens

    def check_finite(self) -> None:
        """Raises naming the first step whose loss or gradient norm is NaN or inf."""
        values = jax.device_get(self.pending)
        first = len(self.fetched)
        self.fetched.extend(values)
        self.pending = []
        for step, metrics in zip(self.steps[first:], values):
            for key in ("loss", "grad_norm"):
                if not math.isfinite(float(metrics[key])):
                    raise JaxalignError(
                        f"step {step}: {key} is {float(metrics[key])}; stopping without saving this state (the last "
                        f"good checkpoint is kept). Lower optimizer.lr, check the data, or enable optimizer.clip"
                    )

    def line(self, now: float) -> dict:
        """The log line: means over the window (`lr` of the last step) and the token throughput."""
        self.check_finite()
        line = {"step": self.steps[-1]}
        for key in self.fetched[-1]:
            if key == "lr":
                line[key] = float(self.fetched[-1][key])
            else:
                line[key] = float(np.mean([float(m[key]) for m in self.fetched]))
        line["tokens_per_s"] = self.tokens / max(now - self.started, 1e-9)
        return line


class _MetricsLogger:
    """metrics.jsonl + TensorBoard from process 0. On resume, lines of steps after the restored one (a run that
    went on past its last checkpoint before dying) are dropped so the file reads as one run."""

    def __init__(self, out: Path, start: int, primary: bool):
        self.primary = primary
        self.path = out / "metrics.jsonl"
        self.tensorboard = None
        if not primary:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start]
            self.path.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)

    def write(self, line: dict) -> None:
        if not self.primary:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        for key, value in line.items():
            if key != "step":
                group = "eval" if key.startswith("eval_") else "train"
                self.tensorboard.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, line["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves after the current step. A second Ctrl-C interrupts at once.
    With several processes the flag is shared, so every process stops after the same step."""

    def __init__(self):
        self.signal_name = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def requested(self) -> bool:
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        flags = multihost_utils.process_allgather(np.array([local], np.int32))
        if np.any(flags) and self.signal_name is None:
            self.signal_name = "a stop signal on another process"
        return bool(np.any(flags))

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _PlainProgress:
    """Progress without a terminal (logs, CI, batch jobs): one line per logged step on process 0."""

    def __init__(self, primary: bool, start: int, total: int):
        self.primary, self.step, self.total = primary, start, total

    def update(self, n):
        self.step += n

    def set_postfix(self, **values):
        if self.primary:
            shown = " ".join(f"{k} {v}" for k, v in values.items())
            print(f"jaxalign: step {self.step}/{self.total} {shown}", file=sys.stderr, flush=True)

    def close(self):
        pass


def _progress(primary: bool, start: int, total: int):
    if not (primary and sys.stderr.isatty()):
        return _PlainProgress(primary, start, total)
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(f"jaxalign: {message}", file=sys.stderr, flush=True)
