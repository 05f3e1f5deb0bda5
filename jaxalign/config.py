"""Config is data: frozen dataclasses read from YAML, overridden by `key.sub=value`, validated up front.

`from_dict(cls, data)` builds any dataclass from plain data and checks every key against the field types
(int, float, str, bool, Literal choices, Optional, tuples, lists, dicts and nested dataclasses); errors name
the full key and what was expected.
"""

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

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
    """Returns a copy of `data` with each `a.b.c=value` applied; values are parsed as YAML (`1e-5`, `true`, `[1, 2]`)."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise JaxalignError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
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
