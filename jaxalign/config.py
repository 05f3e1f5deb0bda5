"""Config is data: frozen dataclasses read from YAML, overridden by `key.sub=value`, validated up front.

`from_dict(cls, data)` builds any dataclass from plain data and checks every key against the field types
(int, float, str, bool, Literal choices, Optional, tuples, lists, dicts and nested dataclasses); errors name
the full key and what was expected.
"""

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from jaxalign.errors import JaxalignError


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise JaxalignError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise JaxalignError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JaxalignError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Returns a copy of `data` with each `a.b.c=value` applied; values are parsed as YAML (`1e-5`, `true`, `[1, 2]`,
    `null`), and `a.b=` with nothing after `=` sets the empty string."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise JaxalignError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise JaxalignError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(cls: type, path: str | Path | None, overrides: list[str] = ()) -> Any:
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    where = f"{path}: " if path is not None else ""
    return from_dict(cls, data, where=where)


def from_dict(cls: type, data: Any, where: str = "", prefix: str = "") -> Any:
    """Builds dataclass `cls` from `data`, rejecting unknown keys and values of the wrong type."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JaxalignError(f"{where}config key '{prefix or '<top>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    renamed = getattr(cls, "RENAMED_KEYS", {})
    for name in unknown:
        if name in renamed:
            raise JaxalignError(f"{where}config key '{_join(prefix, name)}' was replaced: {renamed[name]}")
    if unknown:
        key = _join(prefix, unknown[0])
        raise JaxalignError(f"{where}unknown config key '{key}'; known keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, where, _join(prefix, name))
    try:
        obj = cls(**kwargs)
    except JaxalignError as err:
        raise JaxalignError(f"{where}{err}") from None
    missing = [n for n, f in fields.items() if _is_missing(f) and n not in kwargs]
    if missing:
        raise JaxalignError(f"{where}config key '{_join(prefix, missing[0])}' is required")
    return obj


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config dataclass, suitable for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _is_missing(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str, key: str) -> Any:
    def fail() -> JaxalignError:
        return JaxalignError(f"{where}config key '{key}': expected {_describe(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        alternatives = [arg for arg in args if arg is not type(None)]
        if len(alternatives) == 1:  # Optional[X]: X's own error says what is wrong
            return _convert(alternatives[0], value, where, key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where, key)
            except JaxalignError:
                continue
        raise fail()
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise fail()
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise fail()
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise fail()
            items = [_convert(a, v, where, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_type = args[0] if args else Any
            items = [_convert(item_type, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail()
        args = typing.get_args(tp)
        if args:
            return {k: _convert(args[1], v, where, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_ALL_LINEAR = "all-linear"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`model.lora`: `rank` r, `alpha` α (the update is scaled by α / r), `dropout` on the adapter's input, and
    `targets`: projection names (`q_proj` ... `down_proj`), regular expressions matched against them (`.*_proj`),
    or `all-linear` for all seven."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        if self.rank < 1:
            raise JaxalignError(f"config key 'model.lora.rank': expected a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise JaxalignError(f"config key 'model.lora.alpha': expected > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise JaxalignError(f"config key 'model.lora.dropout': expected 0 <= p < 1, got {self.dropout}")
        object.__setattr__(self, "targets", tuple(self.targets))
        self.projections()

    def projections(self) -> tuple[str, ...]:
        """The projection names the targets select, in model order; raises JaxalignError for a target that selects
        none."""
        chosen = set()
        for target in self.targets:
            if target == LORA_ALL_LINEAR:
                chosen.update(LORA_PROJECTIONS)
                continue
            try:
                matched = {p for p in LORA_PROJECTIONS if re.fullmatch(target, p)}
            except re.error as err:
                raise JaxalignError(f"config key 'model.lora.targets': {target!r} is not a valid regex ({err})") from None
            if not matched:
                raise JaxalignError(f"config key 'model.lora.targets': {target!r} matches no projection; expected "
                                    f"names or regexes over {', '.join(LORA_PROJECTIONS)}, or {LORA_ALL_LINEAR!r}")
            chosen.update(matched)
        if not chosen:
            raise JaxalignError("config key 'model.lora.targets': no projection selected")
        return tuple(p for p in LORA_PROJECTIONS if p in chosen)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Where the weights come from: `path` (a Hugging Face folder or a jaxalign model checkpoint) or, without a
    path, random weights from `config` (LlamaConfig fields; `preset: tiny` gives `LlamaConfig.tiny`); `lora`:
    train low-rank adapters on the frozen weights instead of the weights themselves."""

    path: str | None = None
    config: dict = dataclasses.field(default_factory=dict)
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    lora: LoraConfig | None = None  # low-rank adapters: only they (and a score head) train


@dataclasses.dataclass(frozen=True)
class RewardSection:
    """How RL commands score responses: exactly one of `model` (a reward model folder), `helpful` + `safety`
    (LLaMA-2's pair, combined as in `jaxalign.rewards.Llama2Reward`; `safety_threshold`) or `function`
    (`module:function`). `template`: how the reward models render prompt + response (default: `data.template`);
    `max_length`: their longest input (default: their context)."""

    model: str | None = None
    helpful: str | None = None
    safety: str | None = None
    safety_threshold: float = 0.15
    function: str | None = None
    template: str | None = None
    max_length: int | None = None

    def check(self):
        chosen = [bool(self.model), bool(self.helpful or self.safety), bool(self.function)]
        if sum(chosen) != 1:
            raise JaxalignError("config section 'reward': set exactly one of reward.model, reward.helpful + "
                                "reward.safety, or reward.function")
        if bool(self.helpful) != bool(self.safety):
            raise JaxalignError("config keys 'reward.helpful' and 'reward.safety': LLaMA-2's combination needs both")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 2048
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 0
    eval_at_start: bool = False  # also evaluate before the first step (a baseline eval line at step 0)

    def __post_init__(self):
        for key in ("steps", "batch_size", "seq_len", "grad_accum", "log_every"):
            if getattr(self, key) < 1:
                raise JaxalignError(f"config key 'train.{key}': expected a positive integer, got {getattr(self, key)}")
        for key in ("eval_every", "eval_batches"):
            if getattr(self, key) < 0:
                raise JaxalignError(f"config key 'train.{key}': expected 0 (off) or a positive integer")
        if self.batch_size % self.grad_accum:
            raise JaxalignError(
                f"config key 'train.grad_accum': {self.grad_accum} must divide train.batch_size={self.batch_size}"
            )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The warmup is `warmup_steps` optimiser steps or `warmup_ratio` of `train.steps` (set at most one); a warmup
    longer than the run is cut to the run with a warning. `min_lr_ratio` is the floor of the linear / cosine decay as
    a fraction of `lr`. `clip` is the global gradient-norm limit (0 = off).
    Adafactor: `b1` is its momentum (null = none), `decay` its fixed second-moment decay, `factored: false` with
    `parameter_scale: true` is the "AdamW with updates scaled by parameter magnitude" recipe."""

    name: Literal["adamw", "adafactor", "sgd"] = "adamw"
    lr: float = 1e-5
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    b1: float | None = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_embeddings: bool = False
    clip: float = 1.0
    decay: float = 0.95
    factored: bool = True
    parameter_scale: bool = True
    update_clip: float | None = 1.0

    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "warmup": "use optimizer.warmup_steps (a number of steps) or optimizer.warmup_ratio (a fraction of train.steps)",
    }

    def __post_init__(self):
        if self.lr <= 0:
            raise JaxalignError(f"config key 'optimizer.lr': expected a positive learning rate, got {self.lr}")
        if self.warmup_steps < 0:
            raise JaxalignError(f"config key 'optimizer.warmup_steps': expected >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise JaxalignError(f"config key 'optimizer.warmup_ratio': expected a fraction in [0, 1], got "
                                f"{self.warmup_ratio}")
        if self.warmup_steps and self.warmup_ratio:
            raise JaxalignError("config keys 'optimizer.warmup_steps' and 'optimizer.warmup_ratio': set one of them")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise JaxalignError(f"config key 'optimizer.min_lr_ratio': expected a value in [0, 1], got {self.min_lr_ratio}")
        if self.clip < 0:
            raise JaxalignError(f"config key 'optimizer.clip': expected >= 0 (0 = off), got {self.clip}")
        if self.name == "adamw" and self.b1 is None:
            raise JaxalignError("config key 'optimizer.b1': adamw needs a number")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under OUTPUT_DIR/checkpoints every `every` steps (0 = only at the end and on SIGTERM)."""

    every: int = 500
    keep: int = 2
    async_save: bool = True

    def __post_init__(self):
        if self.every < 0:
            raise JaxalignError(f"config key 'checkpoint.every': expected >= 0, got {self.every}")
        if self.keep < 1:
            raise JaxalignError(f"config key 'checkpoint.keep': expected >= 1, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (one may be -1 = all remaining devices) and the logical-axis -> mesh-axes rules.

    `rules` maps each logical name the model uses to a mesh axis, a list of mesh axes, or null (replicated);
    names missing here take the defaults in `jaxalign.sharding.DEFAULT_RULES`."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for key, size in sizes.items():
            if size == 0 or size < -1:
                raise JaxalignError(f"config key 'mesh.{key}': expected a positive size or -1, got {size}")
        if list(sizes.values()).count(-1) > 1:
            raise JaxalignError("config keys 'mesh.data/fsdp/tensor': at most one may be -1")
        for name, axes in self.rules.items():
            items = axes if isinstance(axes, (list, tuple)) else [axes]
            for axis in items:
                if axis is not None and axis not in sizes:
                    raise JaxalignError(
                        f"config key 'mesh.rules.{name}': {axis!r} is not a mesh axis; use data, fsdp, tensor or null"
                    )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The training loop's settings, the section type every training command's config builds on (a command's config
    subclasses it and adds its own sections, e.g. `model` and `data`)."""

    output_dir: str = "runs/default"
    seed: int = 0
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
