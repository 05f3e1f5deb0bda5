"""`jaxalign sft CONFIG.yaml [key.sub=value ...]`: supervised fine-tuning with the one training loop.

The model starts from a Hugging Face folder or a jaxalign model checkpoint (`model.path`), or from random weights
(`model.config`, e.g. `{preset: tiny}`). Tokens the data config adds (a pad token, LIMA's end-of-turn token) grow
the embeddings with mean-initialised rows. The loss is the mean cross-entropy over the trained tokens of each global
batch; with eval data (`data.eval` or `data.eval_fraction`) every `train.eval_every` steps the run logs `eval_loss`,
`eval_perplexity` and `eval_correct` (next-token accuracy). A finished run is exported to `OUTPUT_DIR/hf/`, a
Hugging Face folder with the tokenizer; rerunning a finished run says so and exports only if `hf/` is missing.
With `model.lora` only low-rank adapters train (`jaxalign.train.adapters`); `hf/` then holds them folded into the
base and `OUTPUT_DIR/adapter/` is a PEFT adapter folder.

OUTPUT_DIR/config.yaml records the run's config; a rerun into the same OUTPUT_DIR with other training settings is
refused before anything there changes, unless `--allow-config-change` (see `jaxalign.train.run_dir`). SIGTERM and
Ctrl-C save a checkpoint after the current step and exit with status 143 / 130 (at once, when there is nothing to
save yet). All of this is shared by every training command (`jaxalign.train.command`).
"""

import argparse
from dataclasses import dataclass, field

from jaxalign.config import ModelSection, RunConfig
from jaxalign.data.config import DataConfig
from jaxalign.train.command import (add_run_arguments, already_finished, build_loaders, export_adapter,
                                    export_model, lora_module, report_finished, run_tokenizer,
                                    run_training_command, say, with_lora)


@dataclass(frozen=True)
class SFTConfig(RunConfig):
    """The loop's sections plus `model` (where the weights come from) and `data` (the data pipeline's
    `DataConfig`)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "configs/tiny/sft.yaml")


def run(args: argparse.Namespace) -> int:
    return run_training_command(args, SFTConfig, train_sft)


def train_sft(config: SFTConfig, allow_config_change: bool = False) -> int:
    """Trains and exports; 0 when OUTPUT_DIR holds the finished run with its export. Raises `JaxalignError` for bad
    input (a rerun with other settings among them) and `jaxalign.train.stop.TrainingStopped` after a stop signal."""
    if already_finished(config, "sft", allow_config_change):
        return 0
    from jaxalign.data.templates import chat_format
    from jaxalign.hf import save_pretrained
    from jaxalign.models.llama import LlamaForCausalLM
    from jaxalign.models.loading import model_source, with_stop_token
    from jaxalign.objectives.sft import make_algorithm
    from jaxalign.train.loop import train

    tokenizer, added = run_tokenizer(config)
    source = model_source(config.model, tokenizer, mesh=config.mesh, new_tokens=added)
    model_config = source.config
    if config.data.template == "lima":
        model_config = with_stop_token(model_config, tokenizer.convert_tokens_to_ids(config.data.eot_token))
    model = LlamaForCausalLM(model_config)
    train_loader, eval_data = build_loaders(config.data, tokenizer, config.train)
    if added:
        say("sft", f"added tokens {added} to the tokenizer; the model's vocabulary has {model_config.vocab_size} rows")
    algorithm = make_algorithm(lora_module(config, model), config.optimizer, train_loader, init=source.load,
                               eval_data=eval_data)
    algorithm, export_params = with_lora(config, algorithm, source)
    state = train(config, algorithm, allow_config_change=allow_config_change)
    hf_dir = export_model(config, lambda folder: save_pretrained(
        model, export_params(state.params), folder, tokenizer=tokenizer,
        chat_format=chat_format(config.data, tokenizer)))
    export_adapter(config, model, state.params, tokenizer)
    report_finished("sft", config, int(state.step), f"the fine-tuned model with its tokenizer ({hf_dir})")
    return 0
