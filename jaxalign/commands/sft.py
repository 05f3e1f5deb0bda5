"""`jaxalign sft CONFIG.yaml [key.sub=value ...]`: supervised fine-tuning with the one training loop.

The model starts from a Hugging Face folder or a jaxalign model checkpoint (`model.path`), or from random weights
(`model.config`, e.g. `{preset: tiny}`). Tokens the data config adds (a pad token, LIMA's end-of-turn token) grow
the embeddings with mean-initialised rows. The loss is the mean cross-entropy over the trained tokens of each global
batch; with eval data (`data.eval` or `data.eval_fraction`) every `train.eval_every` steps the run logs `eval_loss`,
`eval_perplexity` and `eval_correct` (next-token accuracy). A finished run is exported to `OUTPUT_DIR/hf/`, a
Hugging Face folder with the tokenizer.
"""

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from jaxalign.config import ModelSection, RunConfig, load_config
from jaxalign.data.config import DataConfig
from jaxalign.errors import JaxalignError


@dataclass(frozen=True)
class SFTConfig(RunConfig):
    """The loop's sections plus `model` (where the weights come from) and `data` (the data pipeline's
    `DataConfig`)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, values parsed as YAML (e.g. train.steps=100 optimizer.lr=1e-5)")


def run(args: argparse.Namespace) -> int:
    from jaxalign import sharding as shd

    config = load_config(SFTConfig, args.config, args.overrides)
    shd.initialize_distributed()
    return train_sft(config)


def train_sft(config: SFTConfig) -> int:
    import jax

    from jaxalign.data import build_loader, load_tokenizer, prepare_tokenizer
    from jaxalign.data.templates import chat_format
    from jaxalign.hf import save_pretrained
    from jaxalign.models.llama import LlamaForCausalLM
    from jaxalign.models.loading import model_source, with_stop_token
    from jaxalign.objectives.sft import make_algorithm
    from jaxalign.train.loop import train

    tokenizer_spec = config.data.tokenizer or config.model.path
    if tokenizer_spec is None:
        raise JaxalignError("config key 'data.tokenizer' is required when model.path is not set (e.g. 'byte')")
    tokenizer = load_tokenizer(tokenizer_spec)
    added = prepare_tokenizer(config.data, tokenizer)

    source = model_source(config.model, tokenizer, mesh=config.mesh, new_tokens=added)
    model_config = source.config
    if config.data.template == "lima":
        model_config = with_stop_token(model_config, tokenizer.convert_tokens_to_ids(config.data.eot_token))
    model = LlamaForCausalLM(model_config)

    loader_args = dict(batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                       process_index=jax.process_index(), process_count=jax.process_count())
    train_loader = build_loader(config.data, tokenizer, split="train", **loader_args)
    eval_data = None
    if config.data.eval is not None or config.data.eval_fraction > 0:
        eval_loader = build_loader(config.data, tokenizer, split="eval", **loader_args)
        eval_data = lambda: eval_loader  # noqa: E731 - the eval loader restarts after each full pass

    if added:
        _say(f"added tokens {added} to the tokenizer; the model's vocabulary has {model_config.vocab_size} rows")
    algorithm = make_algorithm(model, config.optimizer, train_loader, init=source.load, eval_data=eval_data)
    state = train(config, algorithm)

    out = Path(config.output_dir)
    if int(state.step) < config.train.steps:
        _say(f"stopped at step {int(state.step)} of {config.train.steps}; run the same command again to resume")
        return 0
    hf_dir = save_pretrained(model, state.params["model"], out / "hf", tokenizer=tokenizer,
                             chat_format=chat_format(config.data, tokenizer))
    _say(f"finished {config.train.steps} steps. Outputs in {out}/:\n"
         f"  metrics.jsonl, tensorboard/   training and eval curves (PNGs: jaxalign plot {out})\n"
         f"  checkpoints/                  resumable train state\n"
         f"  hf/                           the fine-tuned model with its tokenizer ({hf_dir})")
    return 0


def _say(message: str) -> None:
    import jax

    if jax.process_index() == 0:
        print(f"jaxalign sft: {message}", flush=True)
