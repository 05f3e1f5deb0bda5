"""`jaxalign memory CONFIG [key.sub=value ...] [--devices N]`: predicted per-device memory of parameters and
optimiser state for the config's model, optimiser and mesh, on any number of devices, without allocating them.
With `model.lora` the trained adapters (with their optimiser state) and the frozen base are counted apart.

Reads only the run-config sections the prediction needs (`model`, `train`, `optimizer`, `mesh`); other sections of
a command's config are ignored, so the same YAML file works for every training command.
"""

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from jaxalign.config import ModelSection, RunConfig
from jaxalign.errors import JaxalignError

USED_SECTIONS = ("model", "train", "optimizer", "mesh")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML run config")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--devices", type=int, default=None,
                        help="number of devices to plan for (default: the devices this machine has)")


@dataclass(frozen=True)
class MemoryConfig(RunConfig):
    """The sections the prediction reads: the loop's and `model`."""

    model: ModelSection = field(default_factory=ModelSection)


def run(args: argparse.Namespace) -> int:
    from jaxalign.config import apply_overrides, from_dict, load_yaml
    from jaxalign.models import lora
    from jaxalign.models.loading import model_source
    from jaxalign.train.algorithm import Frozen, Trainable
    from jaxalign.train.loop import memory_report

    if args.devices is not None and args.devices < 1:
        raise JaxalignError(f"--devices: expected a positive number, got {args.devices}")
    data = apply_overrides(load_yaml(args.config), args.overrides)
    config = from_dict(MemoryConfig, {k: v for k, v in data.items() if k in USED_SECTIONS}, where=f"{args.config}: ")
    model = model_source(config.model).module()
    if config.model.lora is None:
        print(memory_report(config, {"model": Trainable(model, config.optimizer)}, device_count=args.devices))
        return 0
    adapted = type(model)(lora.apply_to(model.config, config.model.lora))
    trainable = Trainable(adapted, config.optimizer, part=lambda tree: lora.split(tree)[1])
    base = Frozen(adapted, load=None, part=lambda tree: lora.split(tree)[0])
    print(memory_report(config, {"model": trainable}, device_count=args.devices, frozen={"base": base}))
    return 0
