"""Orbax checkpoints of the train state plus every process's data-iterator position, saved asynchronously.

Layout: OUTPUT_DIR/checkpoints/<step>/{state, data} — `state` holds the sharded TrainState, `data` a JSON object
with one loader state per process. Orbax writes each step into a temporary folder and renames it when complete,
so an interrupted save never looks finished; a step whose files were damaged afterwards fails to restore and is
skipped (moved to OUTPUT_DIR/corrupt_checkpoints/) in favour of the previous one that restores. Before reading any
array, a step's recorded shapes are compared with the state the config builds, so a checkpoint of another model or
optimiser is reported by parameter path, without the storage libraries' own errors.
"""

import contextlib
import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxalign import storage
from jaxalign.errors import JaxalignError

logger = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, keep: int, async_save: bool = True):
        self.directory = storage.location(directory)
        if not storage.is_remote(self.directory):
            self.directory = self.directory.absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict) -> None:
        """Starts saving `state` and this process's `data_state` (JSON-able); returns once the arrays are copied."""
        everyone = _gather_json(data_state)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({f"process_{i}": s for i, s in enumerate(everyone)}),
        ), force=True)

    def restore_latest(self, abstract_state):
        """(step, state, data_state) from the newest checkpoint that restores; None when there is none.

        `abstract_state` carries the target shardings, so a checkpoint saved on one mesh loads onto another. Steps
        newer than the restored one that failed are set aside with a warning. When the newest step's arrays do not
        fit `abstract_state` (another model or optimiser) or no step restores, nothing is moved and a JaxalignError
        says so.
        """
        failed = []
        for step in reversed(self.steps()):
            mismatch = None
            try:
                with _quiet_storage_logs():
                    mismatch = _shape_mismatch(self.manager.item_metadata(step)["state"], abstract_state)
                    if mismatch is None:
                        restored = self.manager.restore(step, args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract_state),
                            data=ocp.args.JsonRestore(),
                        ))
            except Exception as err:  # noqa: BLE001 - any failure to read a step means: try the previous one
                self._warn_unreadable(step, err, failed)
                continue
            if mismatch is not None:
                raise JaxalignError(
                    f"checkpoint step {step} in {self.directory} does not fit this config: {mismatch}. If the "
                    f"model or optimizer changed, use a new output_dir"
                )
            data = restored["data"]
            key = f"process_{jax.process_index()}"
            if len(data) != jax.process_count() or key not in data:
                self._warn_unreadable(step, ValueError(f"it holds data positions of {len(data)} processes, this run "
                                                       f"has {jax.process_count()}"), failed)
                continue
            for bad_step, _ in failed:
                self._set_aside(bad_step)
            return step, restored["state"], data[key]
        if failed:
            step, reason = failed[0]
            raise JaxalignError(
                f"no checkpoint in {self.directory} can be restored (newest, step {step}: {reason}). If the model, "
                f"optimizer or number of processes changed, use a new output_dir"
            )
        return None

    def _warn_unreadable(self, step: int, err: Exception, failed: list) -> None:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        logger.warning("checkpoint step %d in %s cannot be restored (%s); trying the previous one",
                       step, self.directory, reason)
        failed.append((step, reason))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _set_aside(self, step: int) -> None:
        multihost_utils.sync_global_devices(f"jaxalign-checkpoint-set-aside-{step}")
        if jax.process_index() == 0:
            target = self.directory.parent / "corrupt_checkpoints" / str(step)
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.replace_folder(self.directory / str(step), target)
        multihost_utils.sync_global_devices(f"jaxalign-checkpoint-set-aside-done-{step}")
        self.manager.reload()


def _gather_json(value: dict) -> list:
    """Every process's JSON-able `value`, in process order (a single-process run just wraps it)."""
    if jax.process_count() == 1:
        return [value]
    encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
    longest = int(np.max(multihost_utils.process_allgather(np.array([encoded.size]))))
    padded = np.zeros(longest, np.uint8)
    padded[: encoded.size] = encoded
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), longest)
    return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in rows]


def _shape_mismatch(saved_metadata, abstract_state) -> str | None:
    """The first differences between the arrays a checkpoint holds and those of `abstract_state` (paths as
    `params/model/embed_tokens/embedding`), or None when every path and shape agrees. A checkpoint that lists no
    arrays at all is damaged, not different: ValueError."""
    saved = {_path(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(saved_metadata)}
    if not saved:
        raise ValueError("its state lists no arrays")
    wanted = {_path(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)}
    problems = [f"{path}: checkpoint {saved[path]}, this config {wanted[path]}"
                for path in wanted if path in saved and saved[path] != wanted[path]]
    problems += [f"{path}: not in the checkpoint" for path in wanted if path not in saved]
    problems += [f"{path}: only in the checkpoint" for path in saved if path not in wanted]
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def _path(key_path) -> str:
    parts = []
    for key in key_path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
    return "/".join(parts)


@contextlib.contextmanager
def _quiet_storage_logs():
    """Orbax reports through absl at WARNING and below while it restores; our own lines say what matters."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)
