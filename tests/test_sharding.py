"""Mesh from config, logical rules, divisibility errors naming the key, process-local -> global batches, flags."""

import argparse

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxalign import sharding as shd
from jaxalign.config import MeshConfig, RunConfig, TrainConfig
from jaxalign.errors import JaxalignError
from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM
from jaxalign.train.algorithm import Trainable
from jaxalign.train.loop import plan, state_memory


def test_mesh_fills_minus_one_with_remaining_devices():
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert shd.mesh_shape(MeshConfig(data=-1, fsdp=1, tensor=1), 8) == (8, 1, 1)


@pytest.mark.parametrize("mesh, message", [
    (MeshConfig(data=2, fsdp=2, tensor=1), "mesh.data=2 x mesh.fsdp=2 x mesh.tensor=1 = 4 devices, but 8 exist"),
    (MeshConfig(data=3, fsdp=-1, tensor=1), "'mesh.fsdp': -1 cannot fill 8 devices"),
])
def test_mesh_that_does_not_fit_names_the_keys(mesh, message):
    with pytest.raises(JaxalignError, match=message):
        shd.make_mesh(mesh)


def test_mesh_config_rejects_bad_values():
    with pytest.raises(JaxalignError, match="'mesh.tensor'"):
        MeshConfig(tensor=0)
    with pytest.raises(JaxalignError, match="at most one may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(JaxalignError, match="'mesh.rules.mlp': 'model' is not a mesh axis"):
        MeshConfig(rules={"mlp": "model"})


def test_rules_override_defaults():
    rules = dict(shd.logical_rules(MeshConfig(rules={"embed": ["fsdp", "tensor"], "vocab": None})))
    assert rules["embed"] == ("fsdp", "tensor") and rules["vocab"] is None
    assert rules["batch"] == ("data", "fsdp") and rules["mlp"] == "tensor"
    assert shd.spec_for(("batch", "length", "mlp"), tuple(rules.items())) == PartitionSpec(("data", "fsdp"), None, "tensor")


def test_tensor_size_not_dividing_heads_is_an_error_naming_mesh_tensor():
    config = RunConfig(mesh=MeshConfig(data=1, fsdp=1, tensor=8), train=TrainConfig(batch_size=8))
    with pytest.raises(JaxalignError, match=r"axis 2 \(kv_heads\) has size 2, which mesh.tensor=8 does not divide"):
        plan(config, {"model": Trainable(LlamaForCausalLM(LlamaConfig.tiny()), config.optimizer)})


def test_batch_that_does_not_split_over_batch_shards_names_the_key():
    config = RunConfig(mesh=MeshConfig(data=2, fsdp=4, tensor=1), train=TrainConfig(batch_size=16, grad_accum=4))
    with pytest.raises(JaxalignError, match=r"'train.batch_size': 16 rows / train.grad_accum=4 = 4 rows per "
                                            r"micro-batch, not a multiple of the 8 batch shards \(mesh.data=2 x "
                                            r"mesh.fsdp=4\)"):
        plan(config, {"model": Trainable(LlamaForCausalLM(LlamaConfig.tiny()), config.optimizer)})


def test_global_batch_from_process_local_rows():
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    rules = shd.logical_rules(MeshConfig())
    local = {"input_ids": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    batch = shd.global_batch(local, mesh, rules)
    assert batch["input_ids"].shape == (8, 3)
    assert batch["input_ids"].sharding.spec == PartitionSpec(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), local["input_ids"])


def test_state_memory_plans_a_mesh_larger_than_this_machine():
    config = RunConfig(mesh=MeshConfig(data=1, fsdp=-1, tensor=1), train=TrainConfig(batch_size=256))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                                         num_heads=32, num_kv_heads=32))
    memory = state_memory(config, {"model": Trainable(model, config.optimizer)}, device_count=256)
    n_params = 6_738_415_616
    assert memory.mesh_shape == {"data": 1, "fsdp": 256, "tensor": 1} and memory.counts == {"model": n_params}
    assert memory.params["model"] == 4 * n_params // 256
    assert 0 <= memory.optimizer["model"] - 2 * 4 * n_params // 256 < 64  # Adam's moments and its step count


def test_distributed_flags_and_environment(monkeypatch):
    parser = argparse.ArgumentParser()
    shd.add_distributed_arguments(parser)
    args = parser.parse_args(["--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"])
    assert (args.coordinator, args.num_processes, args.process_id) == ("h:1", 2, 1)
    assert shd.initialize_distributed() is False
    monkeypatch.setenv("JAXALIGN_NUM_PROCESSES", "2")
    with pytest.raises(JaxalignError, match="JAXALIGN_COORDINATOR"):
        shd.initialize_distributed()
    monkeypatch.setenv("JAXALIGN_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("JAXALIGN_PROCESS_ID", "two")
    with pytest.raises(JaxalignError, match="JAXALIGN_PROCESS_ID: expected an integer"):
        shd.initialize_distributed()
    monkeypatch.setenv("JAXALIGN_PROCESS_ID", "2")
    with pytest.raises(JaxalignError, match="outside 0..1"):
        shd.initialize_distributed()


def test_state_memory_counts_lora_adapters_apart_from_the_frozen_base():
    from jaxalign.config import LoraConfig
    from jaxalign.models import lora
    from jaxalign.train.algorithm import Frozen

    config = RunConfig(mesh=MeshConfig(data=1, fsdp=-1, tensor=1), train=TrainConfig(batch_size=256))
    base = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                       num_kv_heads=32, param_dtype="bfloat16")
    adapted = LlamaForCausalLM(lora.apply_to(base, LoraConfig(rank=16, alpha=32, targets=("q_proj", "v_proj"))))
    memory = state_memory(config, {"model": Trainable(adapted, config.optimizer, part=lambda t: lora.split(t)[1])},
                          device_count=8, frozen={"base": Frozen(adapted, None, part=lambda t: lora.split(t)[0])})
    n_adapter = 32 * 2 * (4096 * 16 + 16 * 4096)  # q and v in every layer: A [4096, 16] and B [16, 4096]
    assert memory.counts == {"model": n_adapter, "base": 6_738_415_616}
    # float32 A shards its embed axis over fsdp like the kernel (2 MiB per device); B's output axes (heads) follow
    # mesh.tensor, 1 here, so B is whole on every device (16 MiB); Adam's two moments double that
    assert memory.params["model"] == 18 * 2**20 and 0 <= memory.optimizer["model"] - 36 * 2**20 < 64
    assert memory.frozen["base"] == 2 * 6_738_415_616 // 8
