"""Random parameters for test models, from the models' own initializers."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def init_params(model: nn.Module, rng: jax.Array, inputs: jax.Array | None = None) -> dict:
    """`nn.meta.unbox(model.init(rng, inputs)["params"])` (inputs: int32 `[1, 4]` zeros by default), compiled at
    XLA's optimisation level 0: it runs once, and a tiny model's init then compiles in about a second, where the
    default level takes about three and eager (op by op) init three to six."""
    inputs = jnp.zeros((1, 4), jnp.int32) if inputs is None else inputs
    init = jax.jit(lambda key, ids: nn.meta.unbox(model.init(key, ids)["params"]))
    compiled = init.lower(rng, inputs).compile(compiler_options={"xla_backend_optimization_level": 0})
    return compiled(rng, inputs)
