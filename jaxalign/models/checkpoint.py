"""A jaxalign model checkpoint folder: `jaxalign_model.json` (the model config) + `params/` (orbax).

This is what `jaxalign convert HF_FOLDER DST` writes and what trainers can start from; tokenizer files, when
present, sit next to them. There is deliberately no `config.json`, so a folder is never mistaken for a Hugging Face
one.
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
from jaxalign.models.llama import DTYPES, LlamaConfig, LlamaForCausalLM

CONFIG_FILE = "jaxalign_model.json"
FORMAT = "jaxalign-model"


def is_model_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def save_model_checkpoint(directory: str | Path, config: LlamaConfig, params: Any) -> Path:
    """Write `params` (possibly sharded, any mesh) and `config` under `directory` (created; must not hold params)."""
    import orbax.checkpoint as ocp

    out = Path(directory).absolute()
    if (out / "params").exists():
        raise JaxalignError(f"{out / 'params'}: already exists; choose an empty output folder")
    out.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / "params", nn.meta.unbox(params))
    checkpointer.wait_until_finished()
    checkpointer.close()
    if jax.process_index() == 0:
        meta = {"format": FORMAT, "version": 1, "config": to_dict(config)}
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_model_config(directory: str | Path) -> LlamaConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise JaxalignError(f"{path}: missing; not a jaxalign model checkpoint (convert an HF folder first)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise JaxalignError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise JaxalignError(f"{path}: 'format' should be {FORMAT!r}")
    return from_dict(LlamaConfig, meta.get("config"), where=f"{path}: ", prefix="config")


def load_model_checkpoint(
    directory: str | Path, shardings: Any = None, dtype: str | None = None
) -> tuple[LlamaForCausalLM, Any]:
    """`(model, params)`; `shardings` (a pytree matching params) places each array as it is restored; `dtype`
    ("float32" | "bfloat16") casts parameters and compute."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    config = read_model_config(directory)
    model = LlamaForCausalLM(config)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))))
    shapes = shapes["params"]
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, shapes)
    abstract = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    checkpointer = ocp.StandardCheckpointer()
    try:
        params = checkpointer.restore(directory / "params", abstract)
    except (FileNotFoundError, ValueError) as err:
        raise JaxalignError(f"{directory / 'params'}: cannot restore the parameters: {err}") from None
    finally:
        checkpointer.close()
    if dtype is not None:
        if dtype not in DTYPES:
            raise JaxalignError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
        config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
        params = jax.tree_util.tree_map(lambda p: p.astype(DTYPES[dtype]), params)
        model = LlamaForCausalLM(config)
    return model, params
