"""Checkpointer: newest restorable step wins, damaged newer steps are set aside, a mismatch moves nothing."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxalign.errors import JaxalignError
from jaxalign.train.checkpoint import Checkpointer


def make_state(value: float, mesh):
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    return {"w": jax.device_put(jnp.full((8, 2), value), sharding), "step": jnp.asarray(int(value), jnp.int32)}


def abstract(mesh, shape=(8, 2)):
    return {"w": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, PartitionSpec())),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))}


@pytest.fixture
def mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


def test_restores_newest_and_onto_another_layout(tmp_path, mesh):
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, make_state(float(step), mesh), {"position": step * 10})
    checkpointer.wait()
    assert checkpointer.steps() == [2, 3]
    step, state, data = checkpointer.restore_latest(abstract(mesh))
    checkpointer.close()
    assert (step, data) == (3, {"position": 30})
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((8, 2), 3.0))
    assert state["w"].sharding.spec == PartitionSpec()


def test_damaged_newest_is_set_aside_with_a_warning(tmp_path, mesh, caplog):
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=3)
    for step in (1, 2):
        checkpointer.save(step, make_state(float(step), mesh), {"position": step})
    checkpointer.wait()
    for path in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if path.is_file():
            path.unlink()
    with caplog.at_level(logging.WARNING):
        step, state, data = checkpointer.restore_latest(abstract(mesh))
    checkpointer.close()
    assert step == 1 and data == {"position": 1}
    assert "checkpoint step 2" in caplog.text and "cannot be restored" in caplog.text
    assert (tmp_path / "corrupt_checkpoints" / "2").is_dir()
    assert Checkpointer(tmp_path / "checkpoints", keep=3).steps() == [1]


def test_checkpoint_of_other_shapes_raises_naming_the_array_and_moves_nothing(tmp_path, mesh):
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=3)
    checkpointer.save(1, make_state(1.0, mesh), {"position": 1})
    checkpointer.wait()
    with pytest.raises(JaxalignError, match=r"checkpoint step 1 in .* does not fit this config: w: checkpoint \(8, 2\), "
                                            r"this config \(4, 2\)\. .*use a new output_dir"):
        checkpointer.restore_latest(abstract(mesh, shape=(4, 2)))
    checkpointer.close()
    assert (tmp_path / "checkpoints" / "1").is_dir()
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_empty_directory_restores_nothing(tmp_path, mesh):
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=1)
    assert checkpointer.restore_latest(abstract(mesh)) is None
    checkpointer.close()
