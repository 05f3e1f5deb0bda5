"""Any algorithm with LoRA: only the adapters (and named modules such as a reward model's score head) train; the
base weights are a frozen model of the loop.

    model = LlamaForCausalLM(lora.apply_to(config, lora_config))       # the model with adapters
    adapted = adapt(make_algorithm(model, ...), source)
    state = train(config, adapted.algorithm)
    save_pretrained(source.module(), adapted.merged(state.params), ...)

The trainable `model` keeps only its adapters (`jaxalign.models.lora`) trainable, so the optimiser state,
the gradients and the checkpoints hold adapter-shaped arrays only; the base weights are loaded once per run onto
the shardings of their logical axes as the frozen model `base` (in `model.param_dtype`, e.g. bfloat16) and merged
with the adapters inside the compiled step. Losses see the whole parameter tree as before.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from jaxalign.models import lora
from jaxalign.train.algorithm import Algorithm, Frozen, Trainable

BASE = "base"


@dataclasses.dataclass(frozen=True)
class Adapted:
    """`algorithm` training the adapters of `model` (the adapted module); `merged(state.params)` gives the base
    model's parameters with the trained adapters folded in (after `train`, from the base weights it loaded)."""

    algorithm: Algorithm
    model: Any
    merged: Callable[[dict], dict]


def adapt(algorithm: Algorithm, source, *, trained_modules: tuple[str, ...] = (), mesh_config=None,
          seed: int = 0, name: str = "model") -> Adapted:
    """`algorithm`, whose trainable `name` (default `model`) is a module with adapters (`lora.apply_to`) over the weights of
    `source` (a `ModelSource`), training only the adapters and the top-level modules `trained_modules`. The
    adapters start at zero effect (random A from `seed`, zero B), or from the PEFT folder `source.adapter` (training
    it further); the base weights and `trained_modules` come from `source.load` (`source.base_load` under an adapter
    folder; random from `seed` without either). `mesh_config` gives the logical rules that place the base
    weights."""
    from jaxalign import sharding as shd
    from jaxalign.config import MeshConfig
    from jaxalign.train.loop import model_init_fn
    from jaxalign.train.state import init_params, param_shardings

    trainable = algorithm.trainables[name]
    adapted = trainable.model
    if not adapted.config.lora_rank:
        raise ValueError("adapt: the trainable model has no adapters; build it with lora.apply_to")
    base_model = type(adapted)(lora.apply_to(adapted.config, None))
    rules = shd.logical_rules(mesh_config or MeshConfig())
    key = jax.random.PRNGKey(seed)
    loaded: dict[str, Any] = {}

    def trained_part(tree):
        return lora.split(tree, trained_modules)[1]

    def base_part(tree):
        return lora.split(tree, trained_modules)[0]

    def full_base(any_shardings):
        """The whole base model's weights on the shardings of its logical axes, read once per run."""
        if "params" not in loaded:
            mesh = jax.tree.leaves(any_shardings)[0].mesh
            boxed = jax.eval_shape(model_init_fn(base_model), key)
            shardings = param_shardings(boxed, mesh, rules)
            load = source.base_load if source.adapter is not None else source.load
            if load is not None:
                loaded["params"] = load(shardings)
            else:
                loaded["params"] = init_params(model_init_fn(base_model), key, shardings)
        return loaded["params"]

    def load_base(shardings):
        loaded["base"] = jax.device_put(base_part(full_base(shardings)), shardings)
        if not trained_modules:
            del loaded["params"]
        return loaded["base"]

    def init_trained(shardings):
        if source.adapter is not None:
            params = continued_adapters(source.adapter, adapted.config, shardings)
        else:
            params = init_params(model_init_fn(adapted, trained_part), key, shardings)
        if trained_modules:
            modules = {name: full_base(shardings)[name] for name in trained_modules}
            params = lora.merge(params, jax.device_put(modules, {name: shardings[name] for name in modules}))
            del loaded["params"]
        return params

    def with_base(inner):
        def loss(params, frozen, batch, rng):
            return inner({**params, name: whole_params(params, frozen, name)}, frozen, batch, rng)

        return loss

    def merged(state_params):
        """The trained adapters (`state.params`) folded into the base weights this run loaded: the parameters of
        `source.module()`, for a plain export."""
        return lora.merged_params(lora.merge(loaded["base"], state_params[name]), adapted.config)

    adapted_algorithm = dataclasses.replace(
        algorithm,
        trainables={**algorithm.trainables, name: Trainable(adapted, trainable.optimizer, init_trained,
                                                                 trainable.optimizer_key, trained_part)},
        frozen={**algorithm.frozen, BASE: Frozen(adapted, load_base, base_part)},
        loss=with_base(algorithm.loss),
        eval_loss=with_base(algorithm.eval_loss) if algorithm.eval_loss is not None else None,
    )
    return Adapted(adapted_algorithm, adapted, merged)


def continued_adapters(folder, config, shardings) -> dict:
    """The adapters of the PEFT folder `folder` (`model.path`) to train on, placed on the part of `shardings` they
    fill; raises JaxalignError when `model.lora` (in `config`, the adapted model's config) differs from the folder's
    settings."""
    from jaxalign.errors import JaxalignError
    from jaxalign.hf import read_peft_adapter

    settings, adapters = read_peft_adapter(folder, config)
    stored = (settings.rank, float(settings.alpha), settings.projections())
    wanted = (config.lora_rank, config.lora_alpha, config.lora_targets)
    if stored != wanted:
        raise JaxalignError(
            f"config key 'model.lora': the adapter in {folder} has rank {stored[0]}, alpha {stored[1]:g} on "
            f"{', '.join(stored[2])}; model.lora asks for rank {wanted[0]}, alpha {wanted[1]:g} on "
            f"{', '.join(wanted[2])}. Set model.lora to the adapter's settings to train it further"
        )
    return jax.device_put(adapters, {key: shardings[key] for key in adapters})


def whole_params(state_params, frozen, name: str = "model") -> dict:
    """The adapted model's whole parameter tree from the trained part of trainable `name` (in `state.params`) and
    the frozen base."""
    return lora.merge(frozen[BASE], state_params[name])
