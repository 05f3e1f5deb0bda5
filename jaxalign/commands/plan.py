"""`jaxalign plan CONFIG [key.sub=value ...] [--devices N] [--device-memory 16GiB] [--chip v5p] [--mfu 0.4]`:
per-device memory of a training run on its mesh (parameters, optimiser state, gradients, activations, logits,
frozen models, the sampling KV cache), FLOPs per step, the expected step time, and whether it fits; nothing is
allocated and no weights are read (a model folder needs only its config.json). See `jaxalign.plan` for the model.

The command (sft, rm, dpo, ppo, grpo) is recognised from the config's sections; `--command` names it.
"""

import argparse
import dataclasses
from pathlib import Path

from jaxalign import storage
from jaxalign.errors import JaxalignError
from jaxalign.plan import CHIPS, COMMANDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML run config of a training command")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--devices", type=int, default=None,
                        help="number of devices to plan for (default: the devices this machine has)")
    parser.add_argument("--chip", choices=sorted(CHIPS), default=None,
                        help="accelerator: sets its memory and bf16 peak FLOP/s")
    parser.add_argument("--device-memory", default=None, help="memory per device, e.g. 16GiB (default: the chip's)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the step time (0.4)")
    parser.add_argument("--command", dest="training_command", choices=COMMANDS, default=None,
                        help="the training command (default: recognised from the config's sections)")


def run(args: argparse.Namespace) -> int:
    from jaxalign.config import apply_overrides, load_yaml
    from jaxalign.plan import detect_command, parse_bytes

    if args.devices is not None and args.devices < 1:
        raise JaxalignError(f"--devices: expected a positive number, got {args.devices}")
    if not 0 < args.mfu <= 1:
        raise JaxalignError(f"--mfu: expected a fraction in (0, 1], got {args.mfu}")
    data = apply_overrides(load_yaml(args.config), args.overrides)
    command = args.training_command or detect_command(data)
    peak, memory = CHIPS.get(args.chip, (None, None))
    if args.device_memory is not None:
        memory = parse_bytes(args.device_memory, "--device-memory")
    print(build_plan(command, data, str(args.config), args.devices, memory, peak, args.mfu).report())
    return 0


def build_plan(command: str, data: dict, where: str, devices=None, device_memory=None, peak_flops=None,
               mfu: float = 0.4):
    """The `jaxalign.plan.Plan` of run-config dict `data` for `command` on `devices` devices."""
    from jaxalign.config import from_dict
    from jaxalign.plan import (
        Plan,
        Term,
        activation_terms,
        gathered_bytes,
        kv_cache_bytes,
        mesh_shards,
        step_flops,
        workload,
    )
    from jaxalign.train.loop import state_memory

    config_class, trainables, frozen, extra = _models(command, data, where)
    config = from_dict(config_class, {k: v for k, v in data.items() if k in _sections(config_class)},
                       where=f"{where}: ")
    trainables, frozen, extra = trainables(config), frozen(config), extra(config)
    memory = state_memory(config, trainables, devices, frozen)
    device_count = 1
    for size in memory.mesh_shape.values():
        device_count *= size
    shards = mesh_shards(memory.mesh_shape, memory.rules)
    policy = next(iter(trainables.values())).model.config
    models, rollouts = workload(command, config, policy, extra)
    terms = []
    for name in trainables:
        terms.append(Term(f"{name} parameters", memory.params[name], f"{memory.counts[name]:,} trained"))
        terms.append(Term(f"{name} optimizer state", memory.optimizer[name], config.optimizer.name))
        terms.append(Term(f"{name} gradients", memory.params[name], "as the parameters"))
    for name, size in memory.frozen.items():
        terms.append(Term(f"{name} parameters", size, f"{memory.counts[name]:,} frozen"))
    for model in models:
        terms += activation_terms(model, shards)
        if model.trained:
            terms.append(Term(f"{model.name} gathered weights",
                              gathered_bytes(model.config, memory.mesh_shape, model.lm_head),
                              "embedding, head and one layer, whole (fsdp)"))
    rows = max(1, config.train.batch_size // config.train.grad_accum // shards)
    terms.append(Term("batch", 4 * 10 * rows * config.train.seq_len, f"{rows} rows x {config.train.seq_len} int32"))
    sampling = []
    for rollout in rollouts:
        rows = max(1, rollout // shards)
        sampling.append(Term("KV cache", kv_cache_bytes(policy, rows, config.train.seq_len),
                             f"{rows} rollout rows x {config.train.seq_len}"))
        prefill = dataclasses.replace(models[0], trained=False, rows=rollout, name="sampling")
        sampling += activation_terms(prefill, shards)
    hints = [f"model.config.remat=full (now {policy.remat})"] if policy.remat != "full" else []
    if config.train.batch_size // config.train.grad_accum // shards > 1:
        hints.append(f"train.grad_accum={2 * config.train.grad_accum} (half the rows per pass)")
    hints.append("more devices for mesh.fsdp")
    if config.model.lora is None:
        hints.append("model.lora (train adapters only)")
    mesh = ", ".join(f"{k}={v}" for k, v in memory.mesh_shape.items())
    return Plan(command, mesh, device_count, terms, step_flops(models), device_memory, peak_flops, mfu, sampling,
                hints)


def _sections(config_class) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def _models(command: str, data: dict, where: str):
    """(config class, `config -> trainables`, `config -> frozen`, `config -> {role: LlamaConfig}`) of `command`."""
    from jaxalign.models.loading import model_source
    from jaxalign.train.algorithm import Frozen, Trainable
    from jaxalign.train.command import lora_module

    def policy(config, head="causal_lm"):
        source = model_source(config.model, head=head, mesh=config.mesh)
        return lora_module(config, source.module())

    def trained(config, head="causal_lm", name="model"):
        module = policy(config, head)
        if config.model.lora is None:
            return {name: Trainable(module, config.optimizer)}, {}
        from jaxalign.models import lora

        return ({name: Trainable(module, config.optimizer, part=lambda tree: lora.split(tree)[1])},
                {"base": Frozen(module, None, part=lambda tree: lora.split(tree)[0])})

    if command in ("sft", "rm"):
        from jaxalign.commands.rm import RMConfig
        from jaxalign.commands.sft import SFTConfig

        head = "score" if command == "rm" else "causal_lm"
        return (RMConfig if command == "rm" else SFTConfig, lambda c: trained(c, head)[0],
                lambda c: trained(c, head)[1], lambda c: {})
    if command == "dpo":
        from jaxalign.commands.dpo import DPOConfig
        from jaxalign.objectives.dpo import needs_reference

        def reference(config):
            if config.reference.precompute or not needs_reference(config.loss.type):
                return {}
            section = config.model if config.reference.path is None else dataclasses.replace(
                config.model, path=config.reference.path, lora=None)
            return {"reference": model_source(section, mesh=config.mesh).module()}

        return (DPOConfig, lambda c: trained(c)[0],
                lambda c: {**trained(c)[1], **{n: Frozen(m, None) for n, m in reference(c).items()}},
                lambda c: {n: m.config for n, m in reference(c).items()})
    if command == "ppo":
        from jaxalign.commands.ppo import PPOConfig, critic_source
        from jaxalign.config import ModelSection

        def rewards(config):
            from jaxalign.models.loading import is_pretrained

            paths = {"reward": config.reward.model} if config.reward.model else {
                "reward_helpful": config.reward.helpful, "reward_safety": config.reward.safety}
            for name, path in paths.items():
                if path and not is_pretrained(storage.local_folder(path, weights=False)):
                    key = "reward.model" if name == "reward" else name.replace("_", ".")
                    raise JaxalignError(f"config key '{key}': {path} is neither a Hugging Face folder (config.json) "
                                        "nor a jaxalign model checkpoint")
            return {name: model_source(ModelSection(path=path, dtype=config.value.dtype,
                                                    param_dtype=config.value.param_dtype), head="score").module()
                    for name, path in paths.items() if path}

        def ppo_trainables(config):
            value = critic_source(config, None, ())
            return {**trained(config, name="policy")[0],
                    "value": Trainable(value.module(), config.value_optimizer, optimizer_key="value_optimizer")}

        def ppo_frozen(config):
            reference = model_source(dataclasses.replace(config.model, lora=None), mesh=config.mesh).module()
            return {**trained(config)[1], "reference": Frozen(reference, None),
                    **{n: Frozen(m, None) for n, m in rewards(config).items()}}

        return (PPOConfig, ppo_trainables, ppo_frozen,
                lambda c: {"value": critic_source(c, None, ()).config})
    if command == "grpo":
        from jaxalign.commands.grpo import GRPOConfig

        def grpo_frozen(config):
            if not config.grpo.kl_beta:
                return trained(config)[1]
            reference = model_source(dataclasses.replace(config.model, lora=None), mesh=config.mesh).module()
            return {**trained(config)[1], "reference": Frozen(reference, None)}

        return GRPOConfig, lambda c: trained(c)[0], grpo_frozen, lambda c: {}
    raise JaxalignError(f"--command: expected one of {', '.join(COMMANDS)}, got {command!r}")
