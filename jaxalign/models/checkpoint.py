"""A jaxalign model checkpoint folder: `jaxalign_model.json` (the model config and head) + `params/` (orbax).

This is what `jaxalign convert HF_FOLDER DST` writes and what trainers can start from; tokenizer files, when
present, sit next to them. There is deliberately no `config.json`, so a folder is never mistaken for a Hugging Face
one. The head is "causal_lm" (`LlamaForCausalLM`) or "score" (`LlamaForScore`: a reward or value model); files
written before heads were recorded hold causal LMs.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign.config import from_dict, to_dict
from jaxalign.errors import JaxalignError
from jaxalign.models.heads import HEADS, model_for_head
from jaxalign.models.llama import DTYPES, LlamaConfig

CONFIG_FILE = "jaxalign_model.json"
FORMAT = "jaxalign-model"


def is_model_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def save_model_checkpoint(directory: str | Path, config: LlamaConfig, params: Any, head: str = "causal_lm") -> Path:
    """Write `params` (possibly sharded, any mesh), `config` and `head` ("causal_lm" | "score") under `directory`
    (created; must not hold params). Raises `JaxalignError` when `params` lack (or have) the `score` head."""
    import orbax.checkpoint as ocp

    if head not in HEADS:
        raise JaxalignError(f"head {head!r}: expected one of {', '.join(HEADS)}")
    if ("score" in params) != (head == "score"):
        raise JaxalignError(f"head {head!r}: the params {'lack' if head == 'score' else 'have'} a 'score' head")
    out = Path(directory).absolute()
    if (out / "params").exists():
        raise JaxalignError(f"{out / 'params'}: already exists; choose an empty output folder")
    out.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / "params", nn.meta.unbox(params))
    checkpointer.wait_until_finished()
    checkpointer.close()
    if jax.process_index() == 0:
        meta = {"format": FORMAT, "version": 1, "head": head, "config": to_dict(config)}
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _read_meta(directory: str | Path) -> tuple[Path, dict]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise JaxalignError(f"{path}: missing; not a jaxalign model checkpoint (convert an HF folder first)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise JaxalignError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise JaxalignError(f"{path}: 'format' should be {FORMAT!r}")
    return path, meta


def read_model_config(directory: str | Path) -> LlamaConfig:
    path, meta = _read_meta(directory)
    return from_dict(LlamaConfig, meta.get("config"), where=f"{path}: ", prefix="config")


def read_model_head(directory: str | Path) -> str:
    """The checkpoint's head, "causal_lm" or "score" ("causal_lm" when the file does not record one)."""
    path, meta = _read_meta(directory)
    head = meta.get("head", "causal_lm")
    if head not in HEADS:
        raise JaxalignError(f"{path}: 'head' should be one of {', '.join(HEADS)}, got {head!r}")
    return head


def abstract_params(model: nn.Module, shardings: Any = None) -> Any:
    """`jax.ShapeDtypeStruct` params of `model` placed on `shardings` (a matching pytree of shardings; default: the
    first local device)."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))))
    shapes = shapes["params"]
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, shapes)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def restore_params(directory: str | Path, abstract: Any) -> Any:
    """The params of checkpoint `directory` with the shapes, dtypes (cast as they are read) and shardings of
    `abstract` (`jax.ShapeDtypeStruct` leaves). `abstract` may hold a part of the stored tree, e.g. `{"model": ...}`
    for the trunk alone: the other stored params are never read. Raises `JaxalignError` when a leaf is not stored or
    has another shape."""
    import orbax.checkpoint as ocp

    folder = Path(directory).absolute() / "params"
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        params = checkpointer.restore(
            folder, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
        )
    except (FileNotFoundError, ValueError) as err:
        raise JaxalignError(f"{folder}: cannot restore the parameters: {err}") from None
    finally:
        checkpointer.close()
    missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        raise JaxalignError(f"{folder}: cannot restore the parameters: {', '.join(missing[:5])} not stored")
    return params


def load_model_checkpoint(directory: str | Path, shardings: Any = None, dtype: str | None = None) -> tuple[Any, Any]:
    """`(model, params)`: a `LlamaForCausalLM`, or a `LlamaForScore` for a "score" checkpoint. `shardings` (a pytree
    matching params) places each array as it is restored; `dtype` ("float32" | "bfloat16") casts parameters and
    compute."""
    directory = Path(directory).absolute()
    config = read_model_config(directory)
    head = read_model_head(directory)
    if dtype is not None:
        if dtype not in DTYPES:
            raise JaxalignError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
        config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
    model = model_for_head(config, head)
    return model, restore_params(directory, abstract_params(model, shardings))
