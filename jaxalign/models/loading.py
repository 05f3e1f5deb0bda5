"""Where a model comes from: a Hugging Face folder, a jaxalign model checkpoint, or a config for random weights;
with a causal-LM head ("causal_lm", `LlamaForCausalLM`) or a scalar head ("score", `LlamaForScore`).

Training commands describe the model by the run config's `model` section and get its config and a loader that
places the weights straight onto the shardings the training loop chooses:

    source = model_source(config.model, tokenizer, head="score", mesh=config.mesh, seed=config.seed)
    model = source.module()                   # LlamaForScore(source.config)
    params = source.load(shardings)           # source.load is None for random weights

Other commands load a whole model onto one device:

    model, params = load_model(path, dtype="bfloat16")

A causal LM loaded with head "score" keeps its trunk's weights (the LM head is never read) under a freshly
initialised score head; a score model has no LM head, so loading it as "causal_lm" is an error.
"""

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxalign import storage
from jaxalign.config import MeshConfig, ModelSection, from_dict
from jaxalign.errors import JaxalignError
from jaxalign.models.checkpoint import (
    CONFIG_FILE,
    abstract_params,
    is_model_checkpoint,
    read_model_config,
    read_model_head,
    restore_params,
)
from jaxalign.models.heads import HEADS, init_score_head, model_for_head
from jaxalign.models.llama import DTYPES, LlamaConfig, per_layer_params

# LlamaConfig fields that `model.config` may change on top of a pretrained model: numerics and regularisation, not
# the shapes of the weights.
PRETRAINED_OVERRIDES = ("remat", "residual_dropout", "rope_scaling", "max_position_embeddings", "sliding_window",
                        "attention", "attention_block", "logits_chunk_length")

ParamsLoader = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model's config and head, and `load(shardings) -> params` placing the weights onto `shardings` (a pytree of
    `jax.sharding.Sharding` matching the params of `module()`), or `load=None` for random initialisation."""

    config: LlamaConfig
    head: str = "causal_lm"
    load: ParamsLoader | None = None
    adapter: Path | None = None  # a PEFT adapter folder whose adapters `load` folds into the base weights
    base_load: ParamsLoader | None = None  # with `adapter`: the base weights without it

    def module(self):
        """`LlamaForCausalLM(config)` or `LlamaForScore(config)`, as `head` says."""
        return model_for_head(self.config, self.head)


def model_source(section: ModelSection, tokenizer=None, head: str = "causal_lm", mesh: MeshConfig | None = None,
                 seed: int = 0, new_tokens: Sequence[str] = ()) -> ModelSource:
    """The model that run-config section `model` describes: `model.path` (Hugging Face folder or jaxalign model
    checkpoint; `model.config` may only change `PRETRAINED_OVERRIDES`) or, without a path, random weights from
    `model.config` (`preset: tiny` starts from `LlamaConfig.tiny`). No weights are read until `load` is called.

    With a `tokenizer`, a scratch config takes its vocabulary size and bos / eos / pad ids, and a pretrained model
    takes its pad id and fits its embeddings to it: `new_tokens` (the tokens `prepare_tokenizer` added) and the
    tokenizer's ids past the stored table get mean-initialised rows, also where a table padded past its tokenizer
    already has rows for their ids (see `resize_embeddings`). `mesh` gives the logical-axis rules that place the
    weights before the vocabulary grows; `seed` initialises a score head put on a causal LM. Raises
    `JaxalignError` naming the config key that is wrong.
    """
    if head not in HEADS:
        raise JaxalignError(f"head {head!r}: expected one of {', '.join(HEADS)}")
    if section.path is None:
        return ModelSource(scratch_model_config(section, tokenizer), head)
    base = pretrained_source(section, head, seed)
    if tokenizer is None:
        return base
    new_ids = tuple(tokenizer.convert_tokens_to_ids(list(new_tokens)))
    vocab_size = max(base.config.vocab_size, len(tokenizer))
    config = dataclasses.replace(base.config, vocab_size=vocab_size)
    if tokenizer.pad_token_id is not None:
        config = dataclasses.replace(config, pad_token_id=tokenizer.pad_token_id)
    mesh = mesh or MeshConfig()
    base_load = None
    if base.adapter is not None:
        base_load = params_initializer(dataclasses.replace(base, load=base.base_load), len(tokenizer), new_ids, mesh)
    return ModelSource(config, head, params_initializer(base, len(tokenizer), new_ids, mesh), base.adapter, base_load)


def seeded(source: ModelSource, seed: int) -> ModelSource:
    """`source` with a `load` in every case: random weights (no `model.path`) drawn from `seed`, the same on every
    call (e.g. for a policy and its reference)."""
    if source.load is not None:
        return source
    from jaxalign.train.loop import model_init_fn
    from jaxalign.train.state import init_params

    module = source.module()
    return dataclasses.replace(source, load=lambda shardings: init_params(
        model_init_fn(module), jax.random.PRNGKey(seed), shardings))


def split_preset(section: ModelSection) -> tuple[dict, dict]:
    """(defaults of `model.config.preset`, the other `model.config` values); `preset: tiny` is `LlamaConfig.tiny`,
    whose head_dim is left to derive from the final sizes."""
    values = dict(section.config)
    preset = values.pop("preset", None)
    if preset not in (None, "tiny"):
        raise JaxalignError(f"config key 'model.config.preset': expected 'tiny' or no preset, got {preset!r}")
    defaults = dataclasses.asdict(LlamaConfig.tiny()) if preset == "tiny" else {}
    defaults.pop("head_dim", None)
    return defaults, values


def scratch_model_config(section: ModelSection, tokenizer=None) -> LlamaConfig:
    """`LlamaConfig` for random initialisation from `model.config` (`preset: tiny` starts from `LlamaConfig.tiny`);
    the vocabulary size and bos / eos / pad ids default to the tokenizer's when one is given."""
    defaults, values = split_preset(section)
    defaults.update(dtype=section.dtype, param_dtype=section.param_dtype)
    if tokenizer is not None:
        defaults.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = from_dict(LlamaConfig, {**defaults, **values}, prefix="model.config")
    if tokenizer is not None and config.vocab_size < len(tokenizer):
        raise JaxalignError(
            f"config key 'model.config.vocab_size': {config.vocab_size} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens"
        )
    return config


def pretrained_source(section: ModelSection, head: str = "causal_lm", seed: int = 0) -> ModelSource:
    """The model in `model.path` as stored (config, vocabulary), in `model.param_dtype`, computing in `model.dtype`,
    with `model.config`'s overrides; no weights are read."""
    path = storage.local_folder(section.path, weights=False)
    where = "config key 'model.path': "
    if is_peft_adapter(path):
        adapter = storage.local_folder(section.path)
        base = pretrained_source(dataclasses.replace(section, path=peft_base_path(adapter)), head, seed)
        return dataclasses.replace(base, load=adapter_folder_loader(base.load, base.config, adapter), adapter=adapter,
                                   base_load=base.load)
    if not is_pretrained(path):
        raise JaxalignError(
            f"{where}{section.path} is neither a Hugging Face folder (config.json) nor a jaxalign model checkpoint "
            f"({CONFIG_FILE}); to train from random weights set model.path=null and model.config"
        )
    stored, stored_head = read_stored_model(path)
    changed = sorted(set(section.config) - set(PRETRAINED_OVERRIDES))
    if changed:
        raise JaxalignError(
            f"config key 'model.config.{changed[0]}': cannot change a pretrained model's architecture; with "
            f"model.path set, model.config may only set {', '.join(PRETRAINED_OVERRIDES)}"
        )
    values = {**dataclasses.asdict(stored), **section.config, "dtype": section.dtype,
              "param_dtype": section.param_dtype}
    config = from_dict(LlamaConfig, values, prefix="model.config")
    return ModelSource(config, head, params_loader(section.path, config, stored_head, head, seed, where))


def is_peft_adapter(path: Path) -> bool:
    """Whether `path` is a PEFT adapter folder (adapter_config.json, no model config)."""
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def peft_base_path(path: Path) -> str:
    """The base model folder (local or on an object store) an adapter folder names (`base_model_name_or_path` of
    adapter_config.json)."""
    import json

    config_file = path / "adapter_config.json"
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise JaxalignError(f"{config_file}: cannot read it ({err})") from None
    if not base or not is_pretrained(storage.local_folder(base, weights=False)):
        raise JaxalignError(
            f"{config_file}: 'base_model_name_or_path' is {base!r}, not a model folder; the adapter loads onto "
            "its base model, so point it at the base's Hugging Face folder or jaxalign checkpoint"
        )
    return base


def adapter_folder_loader(base_load: ParamsLoader, config: LlamaConfig, path: Path) -> ParamsLoader:
    """`load(shardings)`: the base weights with the adapters of the PEFT folder `path` folded in (`W + (α/r) A B`),
    each result placed on its sharding."""

    def load(shardings):
        from jaxalign.hf import read_peft_adapter
        from jaxalign.models import lora

        settings, adapters = read_peft_adapter(path, config)
        adapted = lora.apply_to(config, settings)
        fold = jax.jit(lambda base, extra: lora.merged_params(lora.merge(base, extra), adapted),
                       out_shardings=shardings, donate_argnums=0)
        return fold(base_load(shardings), adapters)

    return load


def is_pretrained(path: Path) -> bool:
    """Whether `path` is a Hugging Face model folder (config.json) or a jaxalign model checkpoint."""
    return (path / "config.json").is_file() or is_model_checkpoint(path)


def read_stored_model(path: Path) -> tuple[LlamaConfig, str]:
    """(config, head) of the model stored in `path`, reading no weights: a Hugging Face `*ForCausalLM` is a
    "causal_lm", a `*ForSequenceClassification` with one label a "score" model; the config's dtype is the stored
    parameter dtype (Hugging Face folders compute in float32)."""
    from jaxalign.hf import config_from_hf, hf_head, read_hf_config

    if (path / "config.json").is_file():
        hf = read_hf_config(path)
        where = str(path / "config.json")
        try:
            head = hf_head(hf)
        except JaxalignError as err:
            raise JaxalignError(str(err).replace("config.json", where, 1)) from None
        return config_from_hf(hf, where=where), head
    return read_model_config(path), read_model_head(path)


def params_loader(path: str | os.PathLike, config: LlamaConfig, stored_head: str, head: str, seed: int,
                  where: str = "", allow_pickle: bool = False) -> ParamsLoader:
    """`load(shardings) -> params` of `model_for_head(config, head)` from the weights in `path` (stored with
    `stored_head`), each placed onto its sharding as it is read. A causal LM asked for as "score" keeps its trunk
    (the LM head is not read) and gets a score head initialised from `seed`; a score model asked for as "causal_lm"
    raises `JaxalignError` (its message starts with `where`). `allow_pickle`: see `jaxalign.hf.read_params`."""
    from jaxalign.hf import read_params

    if stored_head == "score" and head == "causal_lm":
        raise JaxalignError(
            f"{where}{path} holds a score model ({CONFIG_FILE} 'head': 'score', a reward or value model), which "
            "has no language-model head; load it with head 'score'"
        )

    def load(shardings):
        folder = storage.local_folder(path)
        from_hf = (folder / "config.json").is_file()
        if head == stored_head:
            if from_hf:
                return read_params(folder, config, shardings, allow_pickle, head=head)
            return restore_params(folder, abstract_params(model_for_head(config, head), shardings))
        trunk_shardings = {"model": shardings["model"]}
        if from_hf:
            trunk = read_params(folder, config, trunk_shardings, allow_pickle, head=None)
        else:
            abstract = abstract_params(model_for_head(config, head), shardings)
            trunk = restore_params(folder, {"model": abstract["model"]})
        score = init_score_head(config, jax.random.PRNGKey(seed), shardings["score"])
        return {"model": trunk["model"], "score": score}

    return load


def params_initializer(base: ModelSource, num_tokens: int, new_ids: Sequence[int], mesh: MeshConfig) -> ParamsLoader:
    """`init_params(shardings)` for the training loop: `base.load` on the shardings `mesh`'s rules give the stored
    vocabulary, then the embeddings fit a tokenizer of `num_tokens` tokens whose added tokens have ids `new_ids`
    (mean-initialised rows, see `resize_embeddings`)."""
    if not new_ids and num_tokens <= base.config.vocab_size:
        return base.load

    def init_params(shardings):
        import warnings

        from jaxalign import sharding as shd
        from jaxalign.objectives.sft import resize_embeddings
        from jaxalign.train.state import param_shardings

        mesh_axes = jax.tree.leaves(shardings)[0].mesh
        module = base.module()
        boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
        params = base.load(param_shardings(boxed, mesh_axes, shd.logical_rules(mesh)))
        # Donation lets every unchanged weight keep its buffer; only the embedding tables are new.
        grow = jax.jit(lambda p: resize_embeddings(p, base.config, num_tokens, new_ids)[0], out_shardings=shardings,
                       donate_argnums=0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            return grow(params)

    return init_params


def with_stop_token(config: LlamaConfig, token_id: int) -> LlamaConfig:
    """`config` whose eos ids also include `token_id`, so generation stops at LIMA's end-of-turn token."""
    eos = config.eos_token_id
    eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    if token_id in eos:
        return config
    return dataclasses.replace(config, eos_token_id=(*eos, token_id))


def load_model(path: str | Path, dtype: str | None = None, head: str | None = None, seed: int = 0,
               allow_pickle: bool = False, scan_layers: bool = True) -> tuple[Any, Any]:
    """`(model, params)` on the first local device from a Hugging Face folder (config.json), a jaxalign model
    checkpoint (`jaxalign_model.json`) or a PEFT adapter folder (its adapters folded into the base model that
    `base_model_name_or_path` names).

    `dtype` ("float32" | "bfloat16") sets parameter and compute dtype; None keeps the stored parameter dtype.
    `head` ("causal_lm" | "score"; None: as stored) picks `LlamaForCausalLM` or `LlamaForScore`; a causal LM loaded
    as "score" gets a score head initialised from `seed`. `allow_pickle` reads .bin weights of a Hugging Face folder
    that has no safetensors (trusted files only). Raises `JaxalignError` for a path that holds neither, and for a
    score model asked for as "causal_lm".
    """
    path = storage.local_folder(path)
    if not path.is_dir():
        raise JaxalignError(f"model folder {path} does not exist")
    if is_peft_adapter(path):
        model, base = load_model(peft_base_path(path), dtype, head, seed, allow_pickle)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        load = adapter_folder_loader(lambda shardings: base, model.config, path)
        return _layout(model, load(jax.tree.map(lambda _: device, base)), scan_layers)
    if not is_pretrained(path):
        raise JaxalignError(
            f"{path} is neither a Hugging Face model folder (config.json) nor a jaxalign model checkpoint "
            f"({CONFIG_FILE})"
        )
    if dtype is not None and dtype not in DTYPES:
        raise JaxalignError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if head is not None and head not in HEADS:
        raise JaxalignError(f"head {head!r}: expected one of {', '.join(HEADS)}")
    config, stored_head = read_stored_model(path)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
    head = head or stored_head
    load = params_loader(path, config, stored_head, head, seed, allow_pickle=allow_pickle)
    model = model_for_head(config, head)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return _layout(model, load(jax.tree.map(lambda _: device, abstract_params(model))), scan_layers)


def _layout(model, params, scan_layers: bool) -> tuple[Any, Any]:
    """`(model, params)` as loaded (layers stacked), or with a module per layer for `scan_layers=False`."""
    if scan_layers:
        return model, params
    return model.clone(config=dataclasses.replace(model.config, scan_layers=False)), per_layer_params(params)

