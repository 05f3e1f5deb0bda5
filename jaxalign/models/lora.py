"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) on the attention and MLP projections.

A targeted projection `W` (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`) computes
`x W + (α / r) · dropout(x) A B` with `A` `[in, r]` (uniform ±1/√in, PEFT's default) and `B` `[r, out]` (zeros),
so a fresh adapter leaves the model's outputs exactly unchanged. The adapter of projection `P` lives next to it as
the parameters `P_lora/lora_a` and `P_lora/lora_b`, stacked over layers like every layer weight, with the logical
axes of the dimensions they adapt (`lora_rank` is replicated): they shard with the mesh like the weights.

`LoraConfig` (in `jaxalign.config`) is the `model.lora` section; `apply_to(config, lora)` gives the `LlamaConfig`
that builds adapters; `split` / `merge` separate the adapter parameters (the trained part) from the base; `merged_params` folds
the adapters into the base weights (`W + (α / r) A B`) for a plain export.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxalign.config import LORA_PROJECTIONS, LoraConfig

PROJECTIONS = LORA_PROJECTIONS

SUFFIX = "_lora"


def apply_to(config, lora: LoraConfig | None):
    """`config` (a `LlamaConfig`) with adapters of `lora` on its targeted projections (None: without adapters)."""
    if lora is None:
        return dataclasses.replace(config, lora_rank=0, lora_alpha=0.0, lora_dropout=0.0, lora_targets=())
    return dataclasses.replace(config, lora_rank=lora.rank, lora_alpha=float(lora.alpha),
                               lora_dropout=float(lora.dropout), lora_targets=lora.projections())


def _keys(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)


def split(params: Mapping, trained_modules: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(base, trained) parts of a parameter tree (plain or boxed leaves): the trained part holds every adapter
    (`*_lora` modules) and the top-level modules named in `trained_modules` (e.g. `("score",)`: a reward model's
    head trains fully); the base part everything else."""
    base, trained = {}, {}
    for key, value in params.items():
        if key.endswith(SUFFIX) or key in trained_modules:
            trained[key] = value
        elif isinstance(value, Mapping):
            inner_base, inner_trained = split(value)
            if inner_base:
                base[key] = inner_base
            if inner_trained:
                trained[key] = inner_trained
        else:
            base[key] = value
    return base, trained


def merge(base: Mapping, trained: Mapping) -> dict:
    """The whole parameter tree from its `split` parts."""
    out = dict(base)
    for key, value in trained.items():
        if key in out and isinstance(value, Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def merged_params(params: Mapping, config) -> dict:
    """The parameters of the model without adapters: each targeted kernel becomes `W + (α / r) A B` (computed in
    float32, stored in the kernel's dtype); the adapters are dropped. `config` is the adapted `LlamaConfig`."""
    scale = config.lora_alpha / config.lora_rank

    def fold(tree):
        out = {}
        for key, value in tree.items():
            if key.endswith(SUFFIX):
                continue
            if isinstance(value, Mapping):
                adapter = tree.get(f"{key}{SUFFIX}")
                value = fold(value)
                if adapter is not None:
                    value = dict(value, kernel=_fold_kernel(value["kernel"], adapter, scale))
                out[key] = value
            else:
                out[key] = value
        return out

    return fold(params)


def _fold_kernel(kernel, adapter, scale):
    a = adapter["lora_a"].astype(jnp.float32)
    b = adapter["lora_b"].astype(jnp.float32)
    rank = a.shape[-1]
    stacked = a.ndim + b.ndim - kernel.ndim - 2  # 1 with a leading layers axis (scanned layers), else 0
    lead = a.shape[:stacked]
    a2 = a.reshape(lead + (-1, rank))
    b2 = b.reshape(lead + (rank, -1))
    delta = jnp.matmul(a2, b2).reshape(kernel.shape)
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def zero_adapters(trained: Mapping) -> Any:
    """`trained` with every adapter's `B` set to zero (the adapters then change nothing)."""
    def zero(path, leaf):
        return jnp.zeros_like(leaf) if _keys(path)[-1] == "lora_b" else leaf

    return jax.tree_util.tree_map_with_path(zero, trained)
