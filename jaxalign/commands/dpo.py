"""`jaxalign dpo CONFIG.yaml [key.sub=value ...]`: direct preference optimisation and its relatives, with the one
training loop.

The policy starts from `model.path` (an SFT export, a jaxalign model checkpoint or a Hugging Face folder; random
weights from `model.config` only for tests). The reference is the starting policy, or the model in
`reference.path`; it is either live (a frozen copy on the mesh, one extra forward pass per step) or, with
`reference.precompute: true`, run once over the train and eval examples before training, its log-probs stored in
`OUTPUT_DIR/reference_logps.npz` (reused on resume) so that no reference weights are in memory while training.
With `model.lora` the reference is the base model under the adapters, with no second copy. SimPO and ORPO use no
reference.

`loss.type`: `sigmoid` (DPO; `loss.label_smoothing` > 0 gives cDPO), `robust`, `hinge`, `ipo`, `simpo`
(`loss.simpo_gamma`), `orpo` or `kto` (unpaired examples with a desirable / undesirable label; `loss.desirable_weight`,
`loss.undesirable_weight`); `loss.beta` defaults to the type's published value (`DEFAULT_BETA`). Formulas:
`jaxalign.objectives.dpo`. Data: preference pairs (`prompt`, `chosen`, `rejected` in any format the pipeline reads)
or, for KTO, unpaired examples (`messages` + `label`, or `prompt`, `completion`, `label`); the prompt and the
response are tokenized as separate segments. Metrics, train and eval: `loss`, `rewards/chosen`, `rewards/rejected`,
`rewards/margins`, `rewards/accuracies`, `logps/chosen`, `logps/rejected` (KTO: `kl` instead of margins and
accuracies). A finished run is exported to `OUTPUT_DIR/hf/` with the tokenizer; reruns, stop signals and exit statuses
are those of every training command (`jaxalign.train.command`).
"""

import argparse
from dataclasses import dataclass, field
from typing import Literal, Optional

from jaxalign import storage
from jaxalign.config import ModelSection, RunConfig
from jaxalign.data.config import DataConfig
from jaxalign.errors import JaxalignError
from jaxalign.train.command import (add_run_arguments, already_finished, build_loaders, export_adapter,
                                    export_model, lora_module, report_finished, run_tokenizer,
                                    run_training_command, say, with_lora)

REFERENCE_FILE = "reference_logps.npz"


@dataclass(frozen=True)
class PreferenceLossConfig:
    """`type` and its settings; `beta` null takes the type's published default (`DEFAULT_BETA`: 0.1, SimPO 2.0;
    for ORPO it is the odds-ratio weight λ)."""

    type: Literal["sigmoid", "robust", "hinge", "ipo", "simpo", "orpo", "kto"] = "sigmoid"
    beta: Optional[float] = None
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self):
        if self.beta is not None and not self.beta > 0:
            raise JaxalignError(f"config key 'loss.beta': expected > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise JaxalignError(
                f"config key 'loss.label_smoothing': expected 0 <= ε < 0.5, got {self.label_smoothing}")
        if self.label_smoothing and self.type not in ("sigmoid", "robust"):
            raise JaxalignError(f"config key 'loss.label_smoothing': only loss types 'sigmoid' (cDPO) and 'robust' "
                                f"use it, not {self.type!r}")
        for key in ("desirable_weight", "undesirable_weight"):
            if getattr(self, key) < 0:
                raise JaxalignError(f"config key 'loss.{key}': expected >= 0, got {getattr(self, key)}")

    def settings(self):
        from jaxalign.objectives.dpo import DEFAULT_BETA, LossSettings

        beta = DEFAULT_BETA[self.type] if self.beta is None else self.beta
        return LossSettings(self.type, beta, self.label_smoothing, self.simpo_gamma, self.desirable_weight,
                            self.undesirable_weight)


@dataclass(frozen=True)
class ReferenceConfig:
    """`path`: the reference model (null: the starting policy); `precompute`: compute its log-probs once before
    training instead of holding it in memory."""

    path: Optional[str] = None
    precompute: bool = False


@dataclass(frozen=True)
class DPOConfig(RunConfig):
    """The loop's sections plus `model` (the starting policy), `data`, `loss` and `reference`."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    loss: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)

    def __post_init__(self):
        from jaxalign.objectives.dpo import needs_reference

        if self.data.margin != "none":
            raise JaxalignError(
                "config key 'data.margin': preference margins are a reward-model setting; DPO uses none")
        if not needs_reference(self.loss.type) and self.reference.path is not None:
            raise JaxalignError(f"config key 'reference.path': loss type {self.loss.type!r} uses no reference model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "configs/tiny/dpo.yaml")


def run(args: argparse.Namespace) -> int:
    return run_training_command(args, DPOConfig, train_dpo)


def train_dpo(config: DPOConfig, allow_config_change: bool = False) -> int:
    """Trains and exports; 0 when OUTPUT_DIR holds the finished run with its export. Raises `JaxalignError` for bad
    input and `jaxalign.train.stop.TrainingStopped` after a stop signal."""
    if already_finished(config, "dpo", allow_config_change):
        return 0
    from jaxalign.data.templates import chat_format
    from jaxalign.hf import save_pretrained
    from jaxalign.objectives.dpo import make_algorithm
    from jaxalign.train.loop import train

    tokenizer, added = run_tokenizer(config)
    policy, reference = policy_and_reference(config, tokenizer, added)
    train_loader, eval_data = build_loaders(config.data, tokenizer, config.train)
    kind = train_loader.kind
    expected = "unpaired" if config.loss.type == "kto" else "preference"
    if kind != expected:
        what = ("unpaired examples (a prompt, a completion and a desirable / undesirable label)"
                if expected == "unpaired" else "preference pairs (prompt, chosen, rejected)")
        raise JaxalignError(f"config key 'data.train': loss type {config.loss.type!r} trains on {what}, but the data "
                            f"holds {kind} examples")
    source = train_loader
    if reference is not None and config.reference.precompute:
        source, eval_data = precomputed_sources(config, reference, train_loader, eval_data, kind)
        reference = None
    model = policy.module()
    base_reference = None
    if reference is not None and config.model.lora is not None and config.reference.path is None:
        reference, base_reference = None, model  # the base under the adapters: no second copy
    algorithm = make_algorithm(lora_module(config, model), config.optimizer, source, config.loss.settings(), kind=kind,
                               init=policy.load, reference=reference, base_reference=base_reference,
                               eval_data=eval_data)
    algorithm, export_params = with_lora(config, algorithm, policy)
    state = train(config, algorithm, allow_config_change=allow_config_change)
    hf_dir = export_model(config, lambda folder: save_pretrained(
        model, export_params(state.params), folder, tokenizer=tokenizer,
        chat_format=chat_format(config.data, tokenizer)))
    export_adapter(config, model, state.params, tokenizer)
    report_finished("dpo", config, int(state.step), f"the aligned policy with its tokenizer ({hf_dir})")
    return 0


def policy_and_reference(config: DPOConfig, tokenizer, added):
    """(the policy's `ModelSource` with a `load`, the reference as a `Frozen` or None for reference-free losses).
    Random weights (no `model.path`) are drawn from `seed`, the same for the policy and its reference."""
    import dataclasses

    from jaxalign.models.loading import model_source, seeded
    from jaxalign.objectives.dpo import needs_reference
    from jaxalign.train.algorithm import Frozen

    policy = seeded(model_source(config.model, tokenizer, mesh=config.mesh, new_tokens=added), config.seed)
    if not needs_reference(config.loss.type):
        return policy, None
    if config.reference.path is None:
        return policy, Frozen(policy.module(), policy.load)
    section = dataclasses.replace(config.model, path=config.reference.path, config={})
    reference = model_source(section, tokenizer, mesh=config.mesh, new_tokens=added)
    if reference.config.vocab_size != policy.config.vocab_size:
        raise JaxalignError(f"config key 'reference.path': {config.reference.path} has a vocabulary of "
                            f"{reference.config.vocab_size} tokens, the policy {policy.config.vocab_size}; the "
                            "reference must share the policy's tokenizer")
    return policy, Frozen(reference.module(), reference.load)


def precomputed_sources(config: DPOConfig, reference, train_loader, eval_data, kind):
    """(the train batch source, `eval_data()`) with the reference log-probs of every example attached, computed
    once and stored in OUTPUT_DIR (reused when already there)."""
    from jaxalign.objectives.dpo import ReferenceSource, precompute_reference, stored_reference, with_reference

    path = storage.location(config.output_dir) / REFERENCE_FILE
    splits = {"train": lambda: precompute_reference(config, reference, train_loader, kind)}
    sizes = {"train": len(train_loader.examples)}
    if eval_data is not None:
        eval_loader = eval_data()
        splits["eval"] = lambda: precompute_reference(config, reference, eval_loader, kind)
        sizes["eval"] = len(eval_loader.examples)
    if not path.is_file():
        say("dpo", f"computing the reference log-probs of {sum(sizes.values())} examples once, into {path}")
    tables = stored_reference(path, splits, sizes)
    source = ReferenceSource(train_loader, tables["train"], str(path))
    if eval_data is None:
        return source, None

    def eval_with_reference():
        return (with_reference(batch, tables["eval"], str(path)) for batch in eval_data())

    return source, eval_with_reference
