"""Device mesh (`data`, `fsdp`, `tensor`), logical-axis rules, multi-host start-up and global batches.

Model code names axes logically (`embed`, `mlp`, `heads`...); one rule table maps those names to mesh axes, so the
same model runs replicated, fully sharded (FSDP) or tensor-parallel by changing config only.
"""

import glob
import importlib.util
import math
import os
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign.config import MeshConfig
from jaxalign.errors import JaxalignError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES = {
    "batch": BATCH_AXES,
    "length": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "vocab": "tensor",
    "layers": None,
    "lora_rank": None,
}


def mesh_shape(config: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """Resolves -1 and checks that the sizes multiply to `device_count`."""
    sizes = {axis: getattr(config, axis) for axis in MESH_AXES}
    known = math.prod(size for size in sizes.values() if size != -1)
    for axis, size in sizes.items():
        if size == -1:
            if device_count % known:
                raise JaxalignError(
                    f"config key 'mesh.{axis}': -1 cannot fill {device_count} devices when the other axes multiply "
                    f"to {known}"
                )
            sizes[axis] = device_count // known
    if math.prod(sizes.values()) != device_count:
        described = " x ".join(f"mesh.{a}={s}" for a, s in sizes.items())
        raise JaxalignError(f"config keys {described} = {math.prod(sizes.values())} devices, but {device_count} exist")
    return tuple(sizes[axis] for axis in MESH_AXES)


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) over `devices` (default: all devices of all processes).

    Axis types are Auto so that `jax.jit` with shardings and logical constraints drive the partitioning.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(config, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def logical_rules(config: MeshConfig) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The rule table in flax's format: defaults overridden by `mesh.rules`."""
    merged = dict(DEFAULT_RULES)
    for name, axes in config.rules.items():
        merged[name] = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    return tuple(merged.items())


def spec_for(logical: tuple, rules) -> PartitionSpec:
    """Mesh PartitionSpec for a tuple of logical names (or None entries)."""
    return nn.logical_to_mesh_axes(logical, rules)


def logical_shardings(logical_specs, mesh: Mesh, rules):
    """Pytree of logical PartitionSpecs -> pytree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def check_divisible(abstract_tree, shardings, mesh: Mesh, logical_specs=None) -> None:
    """Raises a JaxalignError naming the tensor, its logical axis and the mesh key when a sharded dimension does
    not split evenly (e.g. mesh.tensor not dividing the number of key/value heads)."""
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    flat_logical = (jax.tree.leaves(logical_specs, is_leaf=is_spec) if logical_specs is not None
                    else [None] * len(flat_shardings))
    for (path, leaf), sharding, logical in zip(paths_and_leaves, flat_shardings, flat_logical):
        for index, (dim, axes) in enumerate(zip(leaf.shape, sharding.spec)):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            parts = math.prod(mesh.shape[a] for a in axes)
            if dim % parts:
                keys = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
                name = f" ({logical[index]})" if logical is not None and index < len(logical) else ""
                raise JaxalignError(
                    f"tensor {jax.tree_util.keystr(path)} of shape {tuple(leaf.shape)}: axis {index}{name} has size "
                    f"{dim}, which {keys} does not divide; choose mesh sizes that divide it or change mesh.rules"
                )


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a `[batch, length, ...]` input: batch over the rule for `batch`, the rest replicated."""
    return NamedSharding(mesh, spec_for(("batch",) + (None,) * (ndim - 1), rules))


def batch_axes(mesh: Mesh, rules) -> tuple[tuple[str, ...], int]:
    """(the mesh axes the batch is split over, how many shards that makes)."""
    axes = spec_for(("batch",), rules)[0] or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return axes, int(np.prod([mesh.shape[a] for a in axes]))


def global_batch(local_batch: dict, mesh: Mesh, rules) -> dict:
    """Process-local numpy arrays `[B / process_count, ...]` -> global jax.Arrays `[B, ...]` sharded by batch."""
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, rules, value.ndim)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def add_distributed_arguments(parser) -> None:
    """`--coordinator`, `--num-processes`, `--process-id` for commands that may run on several hosts."""
    group = parser.add_argument_group("multi-host (not needed on TPU VMs, which are detected)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (or JAXALIGN_COORDINATOR)")
    group.add_argument("--num-processes", type=int, help="number of processes (or JAXALIGN_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, help="this process, 0-based (or JAXALIGN_PROCESS_ID)")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Starts `jax.distributed` when several processes take part; returns whether it did.

    Arguments fall back to JAXALIGN_COORDINATOR, JAXALIGN_NUM_PROCESSES and JAXALIGN_PROCESS_ID. On a Cloud TPU VM
    (single host or pod slice) JAX discovers the processes by itself.
    """
    coordinator = coordinator or os.environ.get("JAXALIGN_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _env_int("JAXALIGN_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAXALIGN_PROCESS_ID")
    if coordinator or (num_processes or 1) > 1:
        if not coordinator or num_processes is None or process_id is None:
            raise JaxalignError(
                "multi-process run: give all of --coordinator/--num-processes/--process-id (or JAXALIGN_COORDINATOR, "
                "JAXALIGN_NUM_PROCESSES, JAXALIGN_PROCESS_ID)"
            )
        if not 0 <= process_id < num_processes:
            raise JaxalignError(f"process id {process_id} is outside 0..{num_processes - 1}")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return True
    if _on_cloud_tpu_vm():
        jax.distributed.initialize()
        return True
    return False


def _on_cloud_tpu_vm() -> bool:
    """TPU chips visible and libtpu installed: JAX then finds the slice's hosts from the VM metadata by itself."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    vfio = Path("/dev/vfio")
    return bool(glob.glob("/dev/accel*")) or (vfio.is_dir() and any(p.name.isdigit() for p in vfio.iterdir()))


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise JaxalignError(f"environment variable {name}: expected an integer, got {raw!r}") from None
