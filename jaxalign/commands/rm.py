"""`jaxalign rm CONFIG.yaml [key.sub=value ...]`: a reward model on preference pairs, with the one training loop.

The model is the trunk of `model.path` (an SFT export, a jaxalign model checkpoint or a Hugging Face folder; its LM
head is dropped) under a fresh scalar head, an existing reward model (a jaxalign score checkpoint or a Hugging Face
`*ForSequenceClassification` with one label) to train further, or random weights (`model.config`). Pairs come from
`data.train` in any preference format the data pipeline reads, rendered with `data.template`; chosen and rejected
run in one forward pass and the reward is the score at the last token of each. The loss per pair is
`-log σ(r_c - r_r - m) + c (r_c + r_r)²` (`loss.margin`: LLaMA-2's margins by strength; a record's numeric `margin`
field takes precedence; `loss.center_coefficient`: c). Metrics, train and eval: `loss`, `accuracy`,
`rewards/chosen`, `rewards/rejected`, `rewards/margins`, and per strength bucket `accuracy/<strength>`,
`loss/<strength>`, `rewards/margins/<strength>`. A finished run is exported to `OUTPUT_DIR/hf/` as a Hugging Face
`LlamaForSequenceClassification` with the tokenizer and the chat template of `data.template`. With `model.lora` the
trunk stays frozen under low-rank adapters and the score head trains fully; the export folds the adapters in. Reruns, stop signals
and exit statuses are those of every training command (`jaxalign.train.command`).
"""

import argparse
from dataclasses import dataclass, field
from typing import Literal

from jaxalign.config import ModelSection, RunConfig
from jaxalign.data.config import DataConfig
from jaxalign.errors import JaxalignError
from jaxalign.train.command import (add_run_arguments, already_finished, build_loaders, export_model,
                                    lora_module, report_finished, run_tokenizer, run_training_command, with_lora)


@dataclass(frozen=True)
class RewardLossConfig:
    """`margin`: LLaMA-2's margin by preference strength, `small` (1, 2/3, 1/3, 0) or `large` (3, 2, 1, 0) for
    significantly / better / slightly / negligibly better, or `none`; `center_coefficient`: weight of the
    reward-centering term `(r_c + r_r)²` (0 = off)."""

    margin: Literal["none", "small", "large"] = "none"
    center_coefficient: float = 0.0

    def __post_init__(self):
        if self.center_coefficient < 0:
            raise JaxalignError(f"config key 'loss.center_coefficient': expected >= 0, got {self.center_coefficient}")


@dataclass(frozen=True)
class RMConfig(RunConfig):
    """The loop's sections plus `model`, `data` (preference pairs) and `loss`."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)

    def __post_init__(self):
        if self.data.margin != "none":
            raise JaxalignError("config key 'data.margin': set the reward model's margin with loss.margin")
        if self.data.truncation.overlong != "drop":
            raise JaxalignError(
                f"config key 'data.truncation.overlong': {self.data.truncation.overlong!r} would score a pair longer "
                "than train.seq_len at a cut-off token; a reward model needs 'drop' (such pairs are dropped and "
                "counted)"
            )


def check_pad_token(config: RMConfig, tokenizer) -> None:
    """Refuses a pad token that is also the end-of-turn or eos token: jaxalign reads each reward at the last real
    token whatever the pad id, but the exported transformers sequence classifier reads it at the last token that is
    not `pad_token_id`, so its scores would differ."""
    from jaxalign.data.templates import chat_format

    pad = tokenizer.pad_token
    ends = {chat_format(config.data, tokenizer).end_of_turn, tokenizer.eos_token} - {None}
    if pad in ends:
        raise JaxalignError(
            f"config key 'data.pad_token': the pad token {pad!r} also ends the answers; the exported reward model "
            "(a transformers *ForSequenceClassification) would read its score before it. Add a pad token of its own, "
            "e.g. data.pad_token='[PAD]' (mean-initialised)"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "configs/tiny/rm.yaml")


def run(args: argparse.Namespace) -> int:
    return run_training_command(args, RMConfig, train_rm)


def train_rm(config: RMConfig, allow_config_change: bool = False) -> int:
    """Trains and exports; 0 when OUTPUT_DIR holds the finished run with its export. Raises `JaxalignError` for bad
    input and `jaxalign.train.stop.TrainingStopped` after a stop signal."""
    if already_finished(config, "rm", allow_config_change):
        return 0
    from jaxalign.data.templates import chat_format
    from jaxalign.hf import save_pretrained
    from jaxalign.models.loading import model_source
    from jaxalign.objectives.reward import make_algorithm
    from jaxalign.train.loop import train

    tokenizer, added = run_tokenizer(config)
    check_pad_token(config, tokenizer)
    source = model_source(config.model, tokenizer, head="score", mesh=config.mesh, seed=config.seed,
                          new_tokens=added)
    model = source.module()
    data = config.data.replace(margin=config.loss.margin)
    train_loader, eval_data = build_loaders(data, tokenizer, config.train)
    if train_loader.kind != "preference":
        raise JaxalignError(f"config key 'data.train': a reward model trains on preference pairs (prompt, chosen, "
                            f"rejected), but the data holds {train_loader.kind} examples")
    algorithm = make_algorithm(lora_module(config, model), config.optimizer, train_loader, init=source.load,
                               eval_data=eval_data, center_coefficient=config.loss.center_coefficient)
    algorithm, export_params = with_lora(config, algorithm, source, trained_modules=("score",))
    state = train(config, algorithm, allow_config_change=allow_config_change)
    hf_dir = export_model(config, lambda folder: save_pretrained(
        model, export_params(state.params), folder, tokenizer=tokenizer,
        chat_format=chat_format(config.data, tokenizer)))
    report_finished("rm", config, int(state.step), f"the reward model with its tokenizer ({hf_dir}); score with "
                                                   f"jaxalign reward --model {hf_dir} --data FILE.jsonl")
    return 0
