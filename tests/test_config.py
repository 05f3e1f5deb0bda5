"""Run config: YAML + `key.sub=value` overrides into validated frozen sections; errors name the key."""

import dataclasses

import pytest

from jaxalign.config import (CheckpointConfig, MeshConfig, ModelSection, OptimizerConfig, RunConfig, TrainConfig,
                             apply_overrides, load_config, to_dict)
from jaxalign.data.config import DataConfig
from jaxalign.errors import JaxalignError


@dataclasses.dataclass(frozen=True)
class CommandConfig(RunConfig):
    """A command's config: the loop's sections plus its own."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "output_dir: runs/x\n"
        "seed: 3\n"
        "model: {path: /models/llama, dtype: bfloat16}\n"
        "train: {steps: 100, batch_size: 32, seq_len: 2048}\n"
        "optimizer: {name: adafactor, lr: 2e-3, warmup_steps: 1000, factored: false}\n"
        "mesh: {data: 1, fsdp: -1, tensor: 1, rules: {embed: [fsdp, tensor]}}\n"
        "data: {train: demo:instructions}\n"
    )
    config = load_config(CommandConfig, path, ["train.steps=5", "checkpoint.every=2", "mesh.tensor=2",
                                               "optimizer.lr=1e-4"])
    assert config.output_dir == "runs/x" and config.seed == 3
    assert config.model.path == "/models/llama" and config.model.dtype == "bfloat16"
    assert config.train == TrainConfig(steps=5, batch_size=32, seq_len=2048)
    assert config.optimizer.name == "adafactor" and config.optimizer.lr == 1e-4 and config.optimizer.warmup_steps == 1000
    assert config.checkpoint == CheckpointConfig(every=2)
    assert config.mesh == MeshConfig(data=1, fsdp=-1, tensor=2, rules={"embed": ["fsdp", "tensor"]})
    assert config.data.train == "demo:instructions"
    assert load_config(CommandConfig, None, []) == CommandConfig()
    assert to_dict(config)["train"]["steps"] == 5


def test_override_values_parse_as_yaml_and_empty_is_empty_string():
    data = apply_overrides({"data": {"eval": "x.jsonl"}}, ["data.system_message=", "data.eval=null", "train.steps=10"])
    assert data == {"data": {"system_message": "", "eval": None}, "train": {"steps": 10}}
    with pytest.raises(JaxalignError, match="expected key.sub=value"):
        apply_overrides({}, ["train.steps"])


@pytest.mark.parametrize("overrides, message", [
    (["train.steps=0"], "'train.steps': expected a positive integer"),
    (["train.batch_size=8", "train.grad_accum=3"], "'train.grad_accum': 3 must divide train.batch_size=8"),
    (["optimizer.name=lion"], "'optimizer.name': expected one of 'adamw', 'adafactor', 'sgd'"),
    (["optimizer.schedule=step"], "'optimizer.schedule'"),
    (["optimizer.b1=null"], "'optimizer.b1': adamw needs a number"),
    (["checkpoint.keep=0"], "'checkpoint.keep'"),
    (["mesh.fsdp=0"], "'mesh.fsdp'"),
    (["train.stepz=3"], "unknown config key 'train.stepz'"),
    (["model.dtype=float64"], "'model.dtype'"),
    (["optimizer.warmup=0.03"], "'optimizer.warmup' was replaced: use optimizer.warmup_steps .* or "
                                "optimizer.warmup_ratio"),
    (["optimizer.warmup_steps=10", "optimizer.warmup_ratio=0.1"], "set one of them"),
    (["optimizer.warmup_ratio=3"], "'optimizer.warmup_ratio': expected a fraction in \\[0, 1\\]"),
])
def test_bad_values_name_the_key(tmp_path, overrides, message):
    with pytest.raises(JaxalignError, match=message):
        load_config(CommandConfig, None, overrides)


def test_sections_are_frozen_and_subclassable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().seed = 1

    @dataclasses.dataclass(frozen=True)
    class WithExtra(RunConfig):
        beta: float = 0.1

    config = load_config(WithExtra, None, ["beta=0.5", "optimizer.clip=0"])
    assert config.beta == 0.5 and config.optimizer == OptimizerConfig(clip=0.0)
