"""A run directory keeps the resolved config it was trained with, and refuses a rerun that would train differently.

OUTPUT_DIR/config.yaml is the full config (every key, defaults included) of the latest run into OUTPUT_DIR, written
by process 0 once the run has restored its checkpoint (or started fresh). A rerun into the same OUTPUT_DIR resumes
that training, so its config must match except for the keys in `CHANGEABLE_KEYS`: where the output lives and how
often it is logged, evaluated and saved, how long it runs, how the same global batch is laid out on devices, and
what is evaluated. Every other difference (model, data, template, mask, optimiser, learning rate, seed, batch size,
sequence length, ...) is refused with a `JaxalignError` listing each `key: old → new`, before anything in OUTPUT_DIR
changes, unless the caller allows it (`jaxalign sft --allow-config-change`, `train(..., allow_config_change=True)`);
config.yaml then records the new settings.
"""

import dataclasses
import json
import os
from typing import Any

import yaml

from jaxalign import storage
from jaxalign.config import to_dict
from jaxalign.errors import JaxalignError

CONFIG_FILE = "config.yaml"
COMMIT_SUCCESS_FILE = "commit_success.txt"

CHANGEABLE_KEYS = (
    "output_dir",  # the folder may be moved or reached by another path
    "train.steps",  # extend a finished run
    "train.log_every",
    "train.eval_every",
    "train.eval_at_start",
    "train.eval_batches",
    "train.grad_accum",  # the same global batch in more or fewer micro-batches
    "checkpoint",  # how often and how many checkpoints are saved
    "mesh",  # resume on another device layout
    "data.eval",  # what is evaluated, not what is trained
    "rs.rounds",  # extend a finished rejection-sampling run by more rounds
)

_ABSENT = object()


@dataclasses.dataclass(frozen=True)
class Change:
    """One config key whose value differs from the run directory's config.yaml."""

    key: str
    old: Any
    new: Any

    @property
    def changeable(self) -> bool:
        return any(self.key == k or self.key.startswith(k + ".") for k in CHANGEABLE_KEYS)

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} → {_show(self.new)}"


def config_changes(saved: dict, config: Any) -> list[Change]:
    """Differences between `saved` (a config.yaml's data) and the config dataclass `config`, key by key.

    Keys are the dotted paths of the config's fields; a dict-valued field (`model.config`, `mesh.rules`) compares as
    one value. Keys the saved file lacks (added by a newer jaxalign) or only it has are not compared."""
    current = _plain(config)
    changes = []
    for key, path in _leaf_paths(config):
        old, new = _get(saved, path), _get(current, path)
        if old is not _ABSENT and old != new:
            changes.append(Change(key, old, new))
    return changes


def check_config(config: Any, allow_config_change: bool = False) -> list[Change]:
    """Compares `config` with OUTPUT_DIR/config.yaml (if there is one) and returns every change; writes nothing.

    Raises `JaxalignError` listing the changes outside `CHANGEABLE_KEYS` unless `allow_config_change`. A config.yaml
    that is not a YAML mapping is an error too."""
    out = storage.location(config.output_dir)
    path = out / CONFIG_FILE
    changes = []
    if path.exists():
        try:
            saved = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise JaxalignError(f"{path}: not valid YAML ({err}); move it away to start the run over") from None
        if not isinstance(saved, dict):
            raise JaxalignError(f"{path}: expected the run's config as a mapping; move it away to start over")
        changes = config_changes(saved, config)
        refused = [change for change in changes if not change.changeable]
        if refused and not allow_config_change:
            listed = "\n".join(f"  {change}" for change in refused)
            raise JaxalignError(
                f"{out} holds a run trained with other settings ({path}):\n{listed}\n"
                f"Resuming would continue that run with the new settings. Use another output_dir, or pass "
                f"--allow-config-change (train(..., allow_config_change=True) from Python) to continue from its "
                f"checkpoint anyway"
            )
    return changes


def latest_checkpoint_step(output_dir: str | os.PathLike) -> int | None:
    """The newest complete checkpoint step in OUTPUT_DIR/checkpoints, without reading it; None when there is none.

    Orbax names a step's folder by its number only once it is complete, except on `gs://`, where it writes the
    numbered folder directly and marks it complete with a `commit_success.txt` file."""
    folder = storage.location(output_dir) / "checkpoints"
    marked = os.fspath(folder).startswith("gs://")
    steps = [int(p.name) for p in folder.iterdir()
             if p.name.isdigit() and (not marked or (p / COMMIT_SUCCESS_FILE).exists())] if folder.is_dir() else []
    return max(steps, default=None)


def save_config(config: Any) -> os.PathLike:
    """Writes `config` to OUTPUT_DIR/config.yaml from process 0 (replacing the file in one step); returns the path."""
    import jax

    path = storage.location(config.output_dir) / CONFIG_FILE
    if jax.process_index() == 0:
        storage.write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))
    return path


def _plain(config: Any) -> dict:
    """The config as YAML would read it back (tuples as lists)."""
    return yaml.safe_load(yaml.safe_dump(to_dict(config)))


def _leaf_paths(obj: Any, prefix: tuple = ()):
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        path = prefix + (field.name,)
        if dataclasses.is_dataclass(value):
            yield from _leaf_paths(value, path)
        else:
            yield ".".join(path), path


def _get(data: Any, path: tuple) -> Any:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return _ABSENT
        data = data[part]
    return data


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
