"""The train state (params, optimiser state, step, rng), its shardings, creation already sharded, memory sizes."""

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign import sharding as shd


@flax.struct.dataclass
class TrainState:
    """`params` and `opt_state` map each trainable's name to its tree; `rng` is a raw uint32 key and the step's
    randomness is `fold_in(rng, step)`, so resuming needs nothing else."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def param_shardings(abstract_boxed_params, mesh: Mesh, rules):
    """NamedShardings for parameters from their logical axis names (flax `with_logical_partitioning` boxes);
    parameters without names are replicated."""
    logical = nn.get_partition_spec(abstract_boxed_params)
    shardings = shd.logical_shardings(logical, mesh, rules)
    shd.check_divisible(shapes_of(abstract_boxed_params), shardings, mesh, logical)
    return shardings


def shapes_of(abstract_boxed_params):
    """The abstract values inside flax's axis-metadata boxes. Unlike `nn.meta.unbox` this adds no sharding
    constraint, so it also works inside `jax.set_mesh` and logical-axis rules (where the loop builds its state)."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731

    def value(x):
        if isinstance(x, nn.Partitioned):
            return x.value
        return x.unbox() if is_box(x) else x

    return jax.tree.map(value, abstract_boxed_params, is_leaf=is_box)


def opt_state_shardings(abstract_opt_state, abstract_params, params_shardings, mesh: Mesh):
    """An optimiser-state leaf whose tree path ends with a parameter's path and has its shape gets that parameter's
    sharding (Adam moments, momentum); anything else (counts, factored Adafactor rows/columns) is replicated."""
    by_path = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                      jax.tree.leaves(params_shardings,
                                                      is_leaf=lambda x: isinstance(x, NamedSharding))):
        by_path[_path_names(path)] = (leaf.shape, sharding)
    replicated = NamedSharding(mesh, PartitionSpec())

    def choose(path, leaf):
        names = _path_names(path)
        for start in range(len(names)):
            found = by_path.get(names[start:])
            if found is not None and found[0] == leaf.shape:
                return found[1]
        return replicated

    return jax.tree_util.tree_map_with_path(choose, abstract_opt_state)


def state_shardings(abstract_params: dict, params_shardings: dict, txs: dict, mesh: Mesh) -> TrainState:
    """Shardings of the whole state; `abstract_params`, `params_shardings` and `txs` are keyed by trainable name."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = {
        name: opt_state_shardings(jax.eval_shape(tx.init, abstract_params[name]), abstract_params[name],
                                  params_shardings[name], mesh)
        for name, tx in txs.items()
    }
    return TrainState(step=replicated, params=params_shardings, opt_state=opt_state, rng=replicated)


def abstract_state(abstract_params: dict, txs: dict, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings for the whole state (the restore target for checkpoints)."""
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=abstract_params,
        opt_state={name: jax.eval_shape(tx.init, abstract_params[name]) for name, tx in txs.items()},
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_params(init_fn: Callable[[jax.Array], Any], rng: jax.Array, shardings) -> Any:
    """Random parameters from `init_fn(rng) -> boxed params`, created directly on their shardings (never whole on
    one device)."""

    def init(rng):
        # Without rules: out_shardings place the result, and flax's DenseGeneral reshapes boxed kernels during init,
        # which breaks logical constraints on multi-dimensional features.
        with nn.logical_axis_rules(()):
            return nn.meta.unbox(init_fn(rng))

    return jax.jit(init, out_shardings=shardings)(rng)


def param_rngs(seed: int, names) -> tuple[dict, jax.Array]:
    """(a parameter-initialisation key per trainable name, the state's rng) from the run's seed. With one trainable
    its key is the first half of `split(PRNGKey(seed))`; with several, that key split once more per name."""
    params_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    names = list(names)
    keys = [params_rng] if len(names) == 1 else list(jax.random.split(params_rng, len(names)))
    return dict(zip(names, keys)), state_rng


def state_from_params(params: dict, txs: dict, state_rng: jax.Array, shardings: TrainState) -> TrainState:
    """A fresh state (step 0, new optimiser state) around parameters already placed on `shardings.params`."""

    def build(params, rng):
        opt_state = {name: tx.init(params[name]) for name, tx in txs.items()}
        return TrainState(jnp.zeros((), jnp.int32), params, opt_state, rng)

    return jax.jit(build, in_shardings=(shardings.params, shardings.rng), out_shardings=shardings,
                   donate_argnums=0)(params, state_rng)


def predicted_bytes_per_device(abstract_tree, shardings) -> int:
    """Bytes one device holds for `abstract_tree` laid out with `shardings` (even splits, as `check_divisible`
    guarantees; works with an AbstractMesh, so a pod can be planned on a laptop)."""
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return sum(int(np.prod(sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
               for leaf, sharding in zip(jax.tree.leaves(abstract_tree), flat_shardings))


def measured_bytes_per_device(tree) -> int:
    """Bytes of the addressable shards of the arrays in `tree`, the largest over devices."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


def _path_names(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
