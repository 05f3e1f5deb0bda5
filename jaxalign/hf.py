"""Hugging Face model folders in and out: config mapping, weight name mapping, tensor-by-tensor loading, export.

Import reads `config.json` (transformers 5 `rope_parameters` or the older `rope_theta` + `rope_scaling`) and the
safetensors file(s) one tensor at a time; each parameter kind of the scanned layer stack is filled layer by layer,
cast, placed (optionally straight onto a target sharding) and its host copy dropped, so the model is never held
twice in host memory. Export writes safetensors shards plus a `config.json` that
`transformers.AutoModelForCausalLM.from_pretrained` loads with identical weights.

LoRA adapters (`jaxalign.models.lora`) go out and come in as PEFT adapter folders (`adapter_config.json` +
`adapter_model.safetensors`, what `peft.PeftModel.from_pretrained` loads onto the transformers base model):
`save_peft_adapter` and `read_peft_adapter`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxalign.config import LORA_ALL_LINEAR, LORA_PROJECTIONS, LoraConfig
from jaxalign.errors import JaxalignError
from jaxalign.models import lora
from jaxalign.models.heads import LlamaForScore
from jaxalign.models.llama import DTYPES, ROPE_TYPES, LlamaConfig, LlamaForCausalLM

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# transformers' class per model type for a score model (num_labels 1): a reward or value model.
_SCORE_ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
                        "qwen2": "Qwen2ForSequenceClassification"}
# transformers' defaults for keys that hub files sometimes omit, per model type.
_HF_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {
        "max_position_embeddings": 131072,
        "num_key_value_heads": 8,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "qwen2": {
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
        "bos_token_id": None,
        "eos_token_id": None,
    },
}
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)
_TORCH_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


# ---------------------------------------------------------------------------------------------- config mapping


def config_from_hf(hf: dict, where: str = "config.json", dtype: str | None = None) -> LlamaConfig:
    """`LlamaConfig` from a Hugging Face `config.json` dict; unsupported features are errors naming the key."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise JaxalignError(
            f"{where}: model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    for key in _REQUIRED_KEYS:
        if hf.get(key) is None:
            raise JaxalignError(f"{where}: missing required key {key!r}")
    values = {**_HF_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or k == "sliding_window"}}

    if values.get("hidden_act", "silu") != "silu":
        raise JaxalignError(f"{where}: hidden_act={values['hidden_act']!r} is not supported; expected 'silu'")
    if values.get("mlp_bias"):
        raise JaxalignError(f"{where}: mlp_bias=true is not supported")
    if model_type == "llama" and values.get("attention_bias"):
        raise JaxalignError(f"{where}: attention_bias=true for llama (bias on o_proj too) is not supported")

    rope_theta, rope_scaling = _rope_from_hf(values, where)
    num_layers = values["num_hidden_layers"]
    sliding_window = None
    if model_type == "mistral":
        sliding_window = values.get("sliding_window")
    elif model_type == "qwen2" and values.get("use_sliding_window"):
        layer_types = values.get("layer_types") or [
            "sliding_attention" if i >= values["max_window_layers"] else "full_attention" for i in range(num_layers)
        ]
        if len(set(layer_types)) > 1:
            raise JaxalignError(
                f"{where}: layers mixing full and sliding-window attention (use_sliding_window with "
                f"max_window_layers={values.get('max_window_layers')}) are not supported"
            )
        sliding_window = values["sliding_window"] if layer_types[0] == "sliding_attention" else None
    if values.get("layer_types") and model_type != "qwen2" and len(set(values["layer_types"])) > 1:
        raise JaxalignError(f"{where}: per-layer layer_types are not supported for {model_type}")

    param_dtype = dtype or _checkpoint_dtype(values)
    eos = values.get("eos_token_id")
    return LlamaConfig(
        vocab_size=values["vocab_size"],
        hidden_size=values["hidden_size"],
        intermediate_size=values["intermediate_size"],
        num_layers=num_layers,
        num_heads=values["num_attention_heads"],
        num_kv_heads=values.get("num_key_value_heads") or values["num_attention_heads"],
        head_dim=values.get("head_dim"),
        max_position_embeddings=values["max_position_embeddings"],
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(values.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(values["tie_word_embeddings"]),
        attention_bias=model_type == "qwen2",
        sliding_window=sliding_window,
        bos_token_id=values.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=values.get("pad_token_id"),
        dtype=dtype or "float32",
        param_dtype=param_dtype,
    )


def _rope_from_hf(values: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = values.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" not in params and set(params) <= {"full_attention"}:
        params = params.get("full_attention")
    if isinstance(params, dict):
        theta = params.get("rope_theta", values.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = values.get("rope_theta", 10000.0)
        scaling = dict(values.get("rope_scaling") or {})
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    scaling.pop("type", None)
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise JaxalignError(f"{where}: rope_type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
    if float(scaling.get("partial_rotary_factor", values.get("partial_rotary_factor", 1.0))) != 1.0:
        raise JaxalignError(f"{where}: partial_rotary_factor != 1 is not supported")
    scaling.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return theta, None
    if "factor" not in scaling:
        raise JaxalignError(f"{where}: rope scaling of type {rope_type!r} needs a 'factor'")
    return theta, scaling


def _checkpoint_dtype(values: dict) -> str:
    name = str(values.get("dtype") or values.get("torch_dtype") or "float32").removeprefix("torch.")
    return _TORCH_DTYPE_NAMES.get(name, "float32")


def hf_model_type(config: LlamaConfig) -> str:
    """The transformers architecture that computes what `config` computes (q/k/v bias -> qwen2, sliding -> mistral)."""
    if config.attention_bias:
        return "qwen2"
    if config.sliding_window is not None:
        return "mistral"
    return "llama"


def hf_head(hf: dict) -> str:
    """The head a Hugging Face `config.json` dict describes: "score" for a `*ForSequenceClassification` with one
    label (a reward model), else "causal_lm"."""
    architectures = hf.get("architectures") or []
    if any(str(a).endswith("ForSequenceClassification") for a in architectures):
        labels = hf.get("num_labels", len(hf.get("id2label") or {}) or 2)
        if labels != 1:
            raise JaxalignError(f"config.json: a sequence classifier with {labels} labels is not a reward model; "
                                "expected num_labels 1")
        return "score"
    return "causal_lm"


def config_to_hf(config: LlamaConfig, head: str = "causal_lm") -> dict:
    """A `config.json` dict for `config` with `head` ("causal_lm", or "score": `*ForSequenceClassification` with one
    label): rope in transformers 5 `rope_parameters`, repeated as the older `rope_theta` / `rope_scaling` keys so
    readers built on earlier transformers get the same frequencies."""
    model_type = hf_model_type(config)
    rope_parameters = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.rope_scaling:
        rope_parameters.update(config.rope_scaling)
    hf = {
        "architectures": [(_SCORE_ARCHITECTURES if head == "score" else _ARCHITECTURES)[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": rope_parameters,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "dtype": config.param_dtype,
    }
    if model_type == "llama":
        hf["attention_bias"] = False
        hf["mlp_bias"] = False
    elif model_type == "mistral":
        hf["sliding_window"] = config.sliding_window
    else:
        hf["use_sliding_window"] = config.sliding_window is not None
        hf["sliding_window"] = config.sliding_window
        hf["max_window_layers"] = 0 if config.sliding_window is not None else config.num_layers
        kind = "sliding_attention" if config.sliding_window is not None else "full_attention"
        hf["layer_types"] = [kind] * config.num_layers
    if head == "score":
        hf["num_labels"] = 1
        hf["id2label"] = {"0": "LABEL_0"}
        hf["label2id"] = {"LABEL_0": 0}
    return hf


# ---------------------------------------------------------------------------------------------- weight mapping


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One jaxalign parameter kind: where it lives, the HF tensor name per layer, and how shapes map."""

    path: tuple[str, ...]
    hf_name: str  # "{i}" is the layer index for per-layer tensors
    per_layer: bool
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]  # one layer's jaxalign shape
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    in_dims: int = 1  # a kernel's leading jaxalign axes that are its input (o_proj: heads, head_dim)


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def param_specs(config: LlamaConfig, head: str | None = "causal_lm") -> list[ParamSpec]:
    """The full name/shape mapping between HF tensors and jaxalign params, in file order, for the trunk plus `head`:
    "causal_lm" (`lm_head.weight`, absent with tied embeddings), "score" (`score.weight [1, embed]` of a
    `*ForSequenceClassification`) or None (the trunk alone).

    HF linear weights are `[out, in]`; jaxalign kernels are `[in, out...]` with the head axes split out
    (`q_proj` `[embed, heads, head_dim]`, `o_proj` `[heads, head_dim, embed]`).
    """
    e, v, m = config.hidden_size, config.vocab_size, config.intermediate_size
    h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
    layer = "model.layers.{i}."
    specs = [ParamSpec(("model", "embed_tokens", "embedding"), "model.embed_tokens.weight", False, (v, e), (v, e),
                       _same, _same)]
    for name, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
        specs.append(ParamSpec(
            ("self_attn", name, "kernel"), f"{layer}self_attn.{name}.weight", True, (heads * d, e), (e, heads, d),
            to_jax=lambda w, heads=heads: w.T.reshape(e, heads, d),
            to_hf=lambda k, heads=heads: k.reshape(e, heads * d).T,
        ))
        if config.attention_bias:
            specs.append(ParamSpec(
                ("self_attn", name, "bias"), f"{layer}self_attn.{name}.bias", True, (heads * d,), (heads, d),
                to_jax=lambda b, heads=heads: b.reshape(heads, d),
                to_hf=lambda b, heads=heads: b.reshape(heads * d),
            ))
    specs.append(ParamSpec(
        ("self_attn", "o_proj", "kernel"), f"{layer}self_attn.o_proj.weight", True, (e, h * d), (h, d, e),
        to_jax=lambda w: w.T.reshape(h, d, e),
        to_hf=lambda k: k.reshape(h * d, e).T,
        in_dims=2,
    ))
    for name, hf_shape in (("gate_proj", (m, e)), ("up_proj", (m, e)), ("down_proj", (e, m))):
        specs.append(ParamSpec(("mlp", name, "kernel"), f"{layer}mlp.{name}.weight", True, hf_shape, hf_shape[::-1],
                               _transpose, _transpose))
    for name in ("input_layernorm", "post_attention_layernorm"):
        specs.append(ParamSpec((name, "scale"), f"{layer}{name}.weight", True, (e,), (e,), _same, _same))
    specs.append(ParamSpec(("model", "norm", "scale"), "model.norm.weight", False, (e,), (e,), _same, _same))
    if head == "causal_lm" and not config.tie_word_embeddings:
        specs.append(ParamSpec(("lm_head", "kernel"), "lm_head.weight", False, (v, e), (e, v), _transpose, _transpose))
    elif head == "score":
        specs.append(ParamSpec(("score", "kernel"), "score.weight", False, (1, e), (e,), to_jax=lambda w: w[0],
                               to_hf=lambda k: k[None, :]))
    return specs


def _layer_paths(config: LlamaConfig, spec: ParamSpec) -> list[tuple[tuple[str, ...], int | None]]:
    """Where a spec's tensors go: one stacked leaf (scan) or one leaf per layer."""
    if not spec.per_layer:
        return [(spec.path, None)]
    if config.scan_layers:
        return [(("model", "layers", *spec.path), None)]
    return [(("model", f"layers_{i}", *spec.path), i) for i in range(config.num_layers)]


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...], where: str = "params") -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            raise JaxalignError(f"{where}: missing entry {'/'.join(path)}")
        tree = tree[key]
    return tree


# ---------------------------------------------------------------------------------------------- reading


class _TensorReader:
    """Opens the safetensors files of a folder (or only its file `only`) lazily and reads one named tensor at a
    time."""

    def __init__(self, folder: Path, allow_pickle: bool, only: str | None = None):
        self.folder = folder
        self.files: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._pickled: dict[str, np.ndarray] | None = None
        self._source = folder if only is None else folder / only
        if only is not None:
            self._open_safetensors([self._source])
            return
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise JaxalignError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from None
            for name, filename in weight_map.items():
                path = folder / filename
                if not path.is_file():
                    raise JaxalignError(f"{index}: tensor {name!r} is mapped to {filename}, which does not exist")
                self.files[name] = path
            return
        shards = sorted(folder.glob("*.safetensors"))
        if shards:
            self._open_safetensors(shards)
            return
        bins = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
        if not bins:
            raise JaxalignError(f"{folder}: no weights found (expected model.safetensors or sharded *.safetensors)")
        if not allow_pickle:
            raise JaxalignError(
                f"{folder}: only pickle weights ({', '.join(p.name for p in bins)}); pickle files can run arbitrary "
                "code when loaded, so they are refused. Convert them to safetensors, or pass allow_pickle=True "
                "(--allow-pickle) if you trust the source"
            )
        self._load_pickled(bins)

    def _open_safetensors(self, paths: list[Path]) -> None:
        from safetensors import SafetensorError, safe_open

        for path in paths:
            if not path.is_file():
                raise JaxalignError(f"{path}: missing")
            try:
                with safe_open(path, framework="numpy") as handle:
                    for name in handle.keys():
                        self.files[name] = path
            except SafetensorError as err:
                raise JaxalignError(f"{path}: not a readable safetensors file ({err})") from None

    def _load_pickled(self, bins: list[Path]) -> None:
        try:
            import torch
        except ImportError:
            raise JaxalignError(f"{self.folder}: reading .bin weights needs PyTorch, which is not installed") from None
        self._pickled = {}
        for path in bins:
            for name, tensor in torch.load(path, map_location="cpu", weights_only=True).items():
                self._pickled[name] = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
                self.files[name] = path

    def _handle(self, path: Path):
        if path not in self._handles:
            from safetensors import safe_open

            self._handles[path] = safe_open(path, framework="numpy")
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        if self._pickled is not None:
            return self._pickled.pop(name)
        return self._handle(self.files[name]).get_tensor(name)

    def where(self, name: str) -> str:
        return str(self.files.get(name, self._source))

    def close(self) -> None:
        self._handles.clear()


def read_hf_config(path: str | Path) -> dict:
    folder = Path(path)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise JaxalignError(f"{folder}: not a directory (expected a Hugging Face model folder)")
    if not config_path.is_file():
        hint = ""
        if (folder / "jaxalign_model.json").is_file():
            hint = " (this is a jaxalign model checkpoint: use jaxalign.models.checkpoint.load_model_checkpoint)"
        raise JaxalignError(f"{config_path}: missing; a Hugging Face model folder needs config.json{hint}")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise JaxalignError(f"{config_path}: not valid JSON: {err}") from None


def load_pretrained(
    path: str | Path,
    dtype: str | None = None,
    shardings: Any = None,
    allow_pickle: bool = False,
    scan_layers: bool = True,
) -> tuple[LlamaForCausalLM, dict]:
    """`(model, params)` from a Hugging Face folder (config.json + safetensors).

    `dtype` ("float32" | "bfloat16") sets both parameter and compute dtype; None keeps the checkpoint's parameter
    dtype and computes in float32. `shardings` is an optional pytree of `jax.sharding.Sharding` matching the params:
    each tensor is then placed straight onto its sharding as it is read.
    """
    if dtype is not None and dtype not in DTYPES:
        raise JaxalignError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    folder = Path(path)
    config = config_from_hf(read_hf_config(folder), where=str(folder / "config.json"), dtype=dtype)
    config = dataclasses.replace(config, scan_layers=scan_layers)
    return LlamaForCausalLM(config), read_params(folder, config, shardings, allow_pickle)


def read_params(
    path: str | Path, config: LlamaConfig, shardings: Any = None, allow_pickle: bool = False,
    head: str | None = "causal_lm",
) -> dict:
    """The params of the model with `head` (see `param_specs`; `config` as `config_from_hf` reads it from the
    folder, in `config.param_dtype`) from the weights of Hugging Face folder `path`, each tensor placed onto its
    sharding in `shardings` as it is read. `head=None` leaves the folder's head out, unread: `{"model": trunk}`, for
    a model that puts another head on the trunk."""
    reader = _TensorReader(Path(path), allow_pickle)
    try:
        return _read_params(config, reader, shardings, head)
    finally:
        reader.close()


def _read_params(config: LlamaConfig, reader: _TensorReader, shardings: Any, head: str | None) -> dict:
    specs = param_specs(config, head)
    ignorable = {"lm_head.weight", "score.weight"} if head is None else set()
    if config.tie_word_embeddings:
        ignorable.add("lm_head.weight")
    expected = _hf_names(config, specs)
    unknown = sorted(
        n for n in reader.files if n not in expected and n not in ignorable and not n.endswith(_IGNORED_TENSOR_SUFFIXES)
    )
    if unknown:
        raise JaxalignError(
            f"{reader.where(unknown[0])}: unexpected tensor(s) {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''} for a {hf_model_type(config)} model with this config.json"
        )
    return _read_specs(config, specs, reader, shardings, "config.json")


def _hf_names(config: LlamaConfig, specs: list[ParamSpec]) -> set[str]:
    return {spec.hf_name.format(i=i) for spec in specs for i in range(config.num_layers if spec.per_layer else 1)}


def _read_specs(config: LlamaConfig, specs: list[ParamSpec], reader: _TensorReader, shardings: Any,
                shapes_from: str) -> dict:
    """The params `specs` describe, read tensor by tensor from `reader` in `config.param_dtype` and placed onto
    their shardings; a missing tensor or one whose shape differs from what `shapes_from` implies is an error."""
    target_dtype = DTYPES[config.param_dtype]
    params: dict = {}
    for spec in specs:
        for path, layer in _layer_paths(config, spec):
            stacked = spec.per_layer and layer is None
            layers = range(config.num_layers) if stacked else [layer]
            host = np.empty((len(layers), *spec.shape), target_dtype)
            for slot, i in enumerate(layers):
                name = spec.hf_name.format(i=i)
                if name not in reader.files:
                    raise JaxalignError(f"{reader.where(name)}: missing tensor {name!r}")
                got = reader.shape(name)
                if got != spec.hf_shape:
                    raise JaxalignError(
                        f"{reader.where(name)}: tensor {name!r} has shape {list(got)}, expected "
                        f"{list(spec.hf_shape)} from {shapes_from}"
                    )
                host[slot] = spec.to_jax(reader.read(name)).astype(target_dtype)
            host = host if stacked else host[0]
            _set(params, path, _place(host, None if shardings is None else _get(shardings, path, "shardings")))
            del host
    return params


def _place(host: np.ndarray, sharding: Any) -> jax.Array:
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# ---------------------------------------------------------------------------------------------- writing


def hf_tensors(config: LlamaConfig, params: dict, head: str = "causal_lm") -> Iterator[tuple[str, np.ndarray]]:
    """`(hf_name, numpy array)` for every HF tensor of a model with `head`, one at a time, gathered to the host."""
    return _spec_tensors(config, params, param_specs(config, head))


def _spec_tensors(config: LlamaConfig, params: dict, specs: list[ParamSpec],
                  where: str = "params") -> Iterator[tuple[str, np.ndarray]]:
    for spec in specs:
        for path, layer in _layer_paths(config, spec):
            value = _to_host(_get(params, path, where))
            if spec.per_layer and layer is None:
                for i in range(config.num_layers):
                    yield spec.hf_name.format(i=i), np.ascontiguousarray(spec.to_hf(value[i]))
            else:
                yield spec.hf_name.format(i=layer), np.ascontiguousarray(spec.to_hf(value))


def _to_host(value: Any) -> np.ndarray:
    value = getattr(value, "unbox", lambda: value)()
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def save_pretrained(
    model: LlamaForCausalLM,
    params: dict,
    out_dir: str | Path,
    tokenizer: Any = None,
    max_shard_bytes: int = 4 * 1024**3,
    chat_format: Any = None,
) -> Path:
    """Write a Hugging Face folder: `config.json`, safetensors (sharded with an index above `max_shard_bytes`),
    `generation_config.json`, and the tokenizer files when a tokenizer is given. Only process 0 writes. A
    `LlamaForScore` (reward or value model) is written as `*ForSequenceClassification` with one label, whose
    transformers class reads the score at the last token that is not `pad_token_id`: set a pad id that differs from
    the end-of-turn token.

    `chat_format` (`jaxalign.data.templates.ChatFormat`, needs `tokenizer`): the format the model was trained in.
    Its Jinja template becomes the saved tokenizer's chat template (`chat_template.jinja`) and its end-of-turn token
    joins the eos ids of `config.json` and `generation_config.json`, so transformers and inference servers prompt
    the model as it was trained and stop where it learned to stop. Raises `JaxalignError` without a tokenizer or
    when the tokenizer lacks the end-of-turn token.
    """
    from safetensors.numpy import save_file

    config = model.config
    out = Path(out_dir)
    writer = jax.process_index() == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, np.ndarray] = {}
    written: list[tuple[str, list[str], int]] = []

    def flush() -> None:
        name = f"shard-{len(written):05d}.safetensors"
        if writer:
            save_file(shard, str(out / name), metadata={"format": "pt"})
        written.append((name, list(shard), sum(a.nbytes for a in shard.values())))
        shard.clear()

    head = "score" if isinstance(model, LlamaForScore) else "causal_lm"
    for name, array in hf_tensors(config, params, head):
        if shard and sum(a.nbytes for a in shard.values()) + array.nbytes > max_shard_bytes:
            flush()
        shard[name] = array
    flush()
    if writer:
        _finish_shards(out, written)
        hf_config = config_to_hf(config, head)
        if chat_format is not None:
            hf_config["eos_token_id"] = _with_end_of_turn(hf_config["eos_token_id"], tokenizer, chat_format)
        (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": hf_config["eos_token_id"]}
        if config.pad_token_id is not None:
            generation["pad_token_id"] = config.pad_token_id
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, out, None if chat_format is None else chat_format.template)
    return out


def _with_end_of_turn(eos: int | list[int] | None, tokenizer: Any, chat_format: Any) -> int | list[int] | None:
    """`eos` (a config's eos id or ids) with the id of the chat format's end-of-turn token appended if missing."""
    if tokenizer is None:
        raise JaxalignError("save_pretrained: a chat_format needs the tokenizer, to look up its end-of-turn token")
    token_id = tokenizer.get_vocab().get(chat_format.end_of_turn)
    if token_id is None:
        raise JaxalignError(f"save_pretrained: end-of-turn token {chat_format.end_of_turn!r} is not in the tokenizer")
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if token_id in ids:
        return eos
    ids.append(token_id)
    return ids[0] if len(ids) == 1 else ids


def _save_tokenizer(tokenizer: Any, out: Path, chat_template: str | None) -> None:
    """The tokenizer's files in `out`, with `chat_template` as their chat template when given (the tokenizer object
    itself is left as it was)."""
    if chat_template is None:
        tokenizer.save_pretrained(str(out))
        return
    own = tokenizer.chat_template
    tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(str(out))
    finally:
        tokenizer.chat_template = own


def _finish_shards(out: Path, written: list[tuple[str, list[str], int]]) -> None:
    """Rename shards to the transformers convention and write the index when there is more than one."""
    if len(written) == 1:
        (out / written[0][0]).rename(out / "model.safetensors")
        return
    weight_map = {}
    for number, (tmp_name, names, _) in enumerate(written, start=1):
        final = f"model-{number:05d}-of-{len(written):05d}.safetensors"
        (out / tmp_name).rename(out / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": sum(size for _, _, size in written)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a model folder, loaded with transformers."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise JaxalignError(f"{folder}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise JaxalignError(f"{folder}: could not load the tokenizer: {err}") from None


# ---------------------------------------------------------------------------------------------- PEFT adapters

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # PeftModel -> the transformers model's own module names
# adapter_config.json settings that change what an adapter computes beyond x W + (alpha / r) x A B; any value but
# unset / false / empty / "none" is refused.
_PEFT_UNSUPPORTED = {
    "use_rslora": "rank-stabilised scaling alpha / sqrt(r)",
    "use_dora": "DoRA, weight-decomposed adapters",
    "bias": "trained biases",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "modules trained in full and saved with the adapter",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "layers_to_transform": "adapters on some layers only",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "exclude_modules": "modules excluded from the targets",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trained token embeddings",
    "target_parameters": "adapters on parameters",
    "use_qalora": "QA-LoRA, pooled adapter inputs",
}


def lora_specs(config: LlamaConfig) -> list[ParamSpec]:
    """The name/shape mapping between PEFT's adapter tensors and the adapters of `config` (adapted with
    `lora.apply_to`), in model order: for each targeted projection `P` with HF module `M`, `P_lora/lora_a`
    `[*in, r]` <-> `base_model.model.M.lora_A.weight [r, in_features]` and `P_lora/lora_b` `[r, *out]` <->
    `base_model.model.M.lora_B.weight [out_features, r]`."""
    r = config.lora_rank
    specs = []
    for spec in param_specs(config, head=None):
        *group, name, leaf = spec.path
        if leaf != "kernel" or name not in config.lora_targets:
            continue
        module = _PEFT_PREFIX + spec.hf_name.removesuffix(".weight")
        in_shape, out_shape = spec.shape[:spec.in_dims], spec.shape[spec.in_dims:]
        out_features, in_features = spec.hf_shape
        adapter = (*group, f"{name}{lora.SUFFIX}")
        specs.append(ParamSpec(
            (*adapter, "lora_a"), f"{module}.lora_A.weight", True, (r, in_features), (*in_shape, r),
            to_jax=lambda w, s=in_shape: w.T.reshape(*s, r),
            to_hf=lambda a, n=in_features: a.reshape(n, r).T,
        ))
        specs.append(ParamSpec(
            (*adapter, "lora_b"), f"{module}.lora_B.weight", True, (out_features, r), (r, *out_shape),
            to_jax=lambda w, s=out_shape: w.T.reshape(r, *s),
            to_hf=lambda b, n=out_features: b.reshape(r, n).T,
        ))
    return specs


def save_peft_adapter(config: LlamaConfig, adapter_params: dict, out_dir: str | Path,
                      base_model_name_or_path: str | Path | None = None) -> Path:
    """Write the adapters of `config` (the adapted `LlamaConfig`, see `lora.apply_to`) as a PEFT adapter folder
    that `peft.PeftModel.from_pretrained(base, out_dir)` loads onto the transformers base model:
    `adapter_config.json` (LoRA, causal LM, r, lora_alpha, lora_dropout, target_modules) and
    `adapter_model.safetensors` in the adapters' dtype. `adapter_params`: the whole adapted parameter tree or only
    its adapters (`lora.split(params)[1]`, the `model` entry of an adapter run's `state.params`).
    `base_model_name_or_path` is recorded for loaders that fetch the base model themselves. Only process 0
    writes."""
    from safetensors.numpy import save_file

    if not config.lora_rank:
        raise JaxalignError("save_peft_adapter: the config has no adapters (build it with lora.apply_to)")
    adapters = lora.split(adapter_params)[1]
    tensors = dict(_spec_tensors(config, adapters, lora_specs(config), "adapter_params"))
    out = Path(out_dir)
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    alpha = config.lora_alpha
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "revision": None,
        "r": config.lora_rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": list(config.lora_targets),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (out / PEFT_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out


def read_peft_adapter(path: str | Path, config: LlamaConfig, shardings: Any = None) -> tuple[LoraConfig, dict]:
    """`(settings, adapters)` from the PEFT LoRA adapter folder `path` for the base model of `config` (its own
    adapter fields are ignored): `settings` is the `LoraConfig` of `adapter_config.json`
    (`lora.apply_to(config, settings)` builds the model the adapters fit), `adapters` the tree of the `*_lora`
    modules (`lora.merge(base_params, adapters)` gives the adapted model's parameters) in float32 (as adapters train),
    each tensor placed onto its sharding in `shardings` (a tree like `adapters`) as it is read. Settings jaxalign
    does not compute (rsLoRA, DoRA, biases, modules_to_save, per-module ranks ...), targets other than the seven
    projections or not the same on every layer, and missing, unexpected or misshapen tensors are errors naming the
    file and the key."""
    folder = Path(path)
    if not folder.is_dir():
        raise JaxalignError(f"{folder}: not a directory (expected a PEFT adapter folder)")
    config_path = folder / PEFT_CONFIG
    if not config_path.is_file():
        hint = " (this is a model folder, not an adapter folder)" if (folder / "config.json").is_file() else ""
        raise JaxalignError(f"{config_path}: missing; a PEFT adapter folder needs {PEFT_CONFIG}{hint}")
    try:
        peft_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise JaxalignError(f"{config_path}: not valid JSON: {err}") from None
    if not isinstance(peft_config, dict):
        raise JaxalignError(f"{config_path}: expected a JSON object")
    settings = _lora_from_peft(peft_config, config, str(config_path))
    adapted = lora.apply_to(config, settings)
    weights = folder / PEFT_WEIGHTS
    if not weights.is_file():
        hint = ""
        if (folder / "adapter_model.bin").is_file():
            hint = " (adapter_model.bin holds pickle weights, which are not read: save the adapter as safetensors)"
        raise JaxalignError(f"{weights}: missing; a PEFT adapter folder needs {PEFT_WEIGHTS}{hint}")
    specs = lora_specs(adapted)
    reader = _TensorReader(folder, allow_pickle=False, only=PEFT_WEIGHTS)
    try:
        unknown = sorted(set(reader.files) - _hf_names(adapted, specs))
        if unknown:
            raise JaxalignError(
                f"{weights}: unexpected tensor(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; "
                f"{PEFT_CONFIG} targets {', '.join(settings.targets)} on {config.num_layers} layers"
            )
        adapters = _read_specs(dataclasses.replace(adapted, param_dtype="float32"), specs, reader, shardings,
                               f"{PEFT_CONFIG} and the model config")
    finally:
        reader.close()
    return settings, adapters


def _lora_from_peft(peft_config: dict, config: LlamaConfig, where: str) -> LoraConfig:
    """The `LoraConfig` of a PEFT `adapter_config.json` dict; settings jaxalign does not compute are errors."""
    peft_type = peft_config.get("peft_type")
    if peft_type != "LORA":
        raise JaxalignError(f"{where}: peft_type {peft_type!r} is not supported; only LoRA adapters (peft_type "
                            "\"LORA\") are read")
    for key, feature in _PEFT_UNSUPPORTED.items():
        value = peft_config.get(key)
        if value and value != "none":
            raise JaxalignError(f"{where}: {key}={json.dumps(value)} ({feature}) is not supported")
    rank, alpha = peft_config.get("r", 8), peft_config.get("lora_alpha", 8)  # PEFT's defaults
    dropout = peft_config.get("lora_dropout", 0.0) or 0.0
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise JaxalignError(f"{where}: r={rank!r}: expected a positive integer")
    for key, value in (("lora_alpha", alpha), ("lora_dropout", dropout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise JaxalignError(f"{where}: {key}={value!r}: expected a number")
    if not alpha > 0 or not 0.0 <= dropout < 1.0:
        raise JaxalignError(f"{where}: lora_alpha={alpha!r}, lora_dropout={dropout!r}: expected alpha > 0 and "
                            "0 <= dropout < 1")
    targets = _peft_targets(peft_config.get("target_modules"), config, where)
    return LoraConfig(rank=rank, alpha=float(alpha), dropout=float(dropout), targets=targets)


def _peft_targets(targets: Any, config: LlamaConfig, where: str) -> tuple[str, ...]:
    """The projections PEFT's `target_modules` selects (a list of module names or name suffixes, a regular
    expression matched against whole module names, or "all-linear"), in model order. Every selected module must be
    one of the projections and each layer must have the same ones."""
    modules = {}  # the transformers name of every linear module -> (layer, projection); the LM head has no layer
    for spec in param_specs(config, head=None):
        if spec.per_layer and spec.path[-1] == "kernel":
            for i in range(config.num_layers):
                modules[spec.hf_name.format(i=i).removesuffix(".weight")] = (i, spec.path[-2])
    modules["lm_head"] = (None, "lm_head")
    if targets == LORA_ALL_LINEAR:  # PEFT leaves the output layer out
        return LORA_PROJECTIONS
    if isinstance(targets, str):
        try:
            entries = [(targets, {n for n in modules if re.fullmatch(targets, n)})]
        except re.error as err:
            raise JaxalignError(
                f"{where}: target_modules {targets!r} is not a valid regular expression ({err})"
            ) from None
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        entries = [(t, {n for n in modules if n == t or n.endswith(f".{t}")}) for t in targets]
    else:
        raise JaxalignError(f"{where}: target_modules={json.dumps(targets)}: expected a list of module names or a "
                            "regular expression")
    for target, matched in entries:
        if not matched or any(modules[n][0] is None for n in matched):
            raise JaxalignError(
                f"{where}: target module {target!r} is not supported; jaxalign adapts the projections "
                f"{', '.join(LORA_PROJECTIONS)} of layers 0-{config.num_layers - 1} "
                "(model.layers.{i}.self_attn.q_proj ...)"
            )
    chosen = [modules[n] for _, matched in entries for n in matched]
    per_layer = [{p for layer, p in chosen if layer == i} for i in range(config.num_layers)]
    if any(layer != per_layer[0] for layer in per_layer):
        raise JaxalignError(
            f"{where}: target_modules={json.dumps(targets)} adapts different projections on different layers "
            "(adapters on some layers only), which is not supported"
        )
    return tuple(p for p in LORA_PROJECTIONS if p in per_layer[0])
