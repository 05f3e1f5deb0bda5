"""`jaxalign sft CONFIG.yaml [key.sub=value ...]`: supervised fine-tuning with the one training loop.

The model starts from a Hugging Face folder or a jaxalign model checkpoint (`model.path`), or from random weights
(`model.config`, e.g. `{preset: tiny}`). Tokens the data config adds (a pad token, LIMA's end-of-turn token) grow
the embeddings with mean-initialised rows. The loss is the mean cross-entropy over the trained tokens of each global
batch; with eval data (`data.eval` or `data.eval_fraction`) every `train.eval_every` steps the run logs `eval_loss`,
`eval_perplexity` and `eval_correct` (next-token accuracy). A finished run is exported to `OUTPUT_DIR/hf/`, a
Hugging Face folder with the tokenizer; rerunning a finished run says so and exports only if `hf/` is missing.

OUTPUT_DIR/config.yaml records the run's config; a rerun into the same OUTPUT_DIR with other training settings is
refused before anything there changes, unless `--allow-config-change` (see `jaxalign.train.run_dir`). SIGTERM and
Ctrl-C save a checkpoint after the current step and exit with status 143 / 130 (at once, when there is nothing to
save yet).
"""

import argparse
import shutil
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
    parser.add_argument("--allow-config-change", action="store_true",
                        help="continue a run in output_dir although its training settings (model, data, optimizer, "
                             "...) differ from the ones it was started with")


def run(args: argparse.Namespace) -> int:
    from jaxalign.train import stop

    stop.install()
    from jaxalign import sharding as shd

    config = load_config(SFTConfig, args.config, args.overrides)
    shd.initialize_distributed()
    try:
        return train_sft(config, allow_config_change=args.allow_config_change)
    except stop.TrainingStopped as stopped:
        return stopped.code


def train_sft(config: SFTConfig, allow_config_change: bool = False) -> int:
    """Trains and exports; 0 when OUTPUT_DIR holds the finished run with its export. Raises `JaxalignError` for bad
    input (a rerun with other settings among them) and `jaxalign.train.stop.TrainingStopped` after a stop signal."""
    import jax

    from jaxalign.train import run_dir

    out = Path(config.output_dir)
    hf_out = out / "hf"
    run_dir.check_config(config, allow_config_change)
    finished = run_dir.latest_checkpoint_step(out)
    if finished is not None and finished >= config.train.steps and hf_out.is_dir():
        _say(f"{out} already finished at step {finished} (train.steps={config.train.steps}); the model is in "
             f"{hf_out} (raise train.steps to train on)")
        return 0

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
    state = train(config, algorithm, allow_config_change=allow_config_change)

    partial = out / "hf.partial"
    if jax.process_index() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    save_pretrained(model, state.params["model"], partial, tokenizer=tokenizer,
                    chat_format=chat_format(config.data, tokenizer))
    if jax.process_index() == 0:
        shutil.rmtree(hf_out, ignore_errors=True)
        partial.rename(hf_out)
    _say(f"finished {int(state.step)} steps. Outputs in {out}/:\n"
         f"  metrics.jsonl, tensorboard/   training and eval curves (PNGs: jaxalign plot {out})\n"
         f"  checkpoints/                  resumable train state\n"
         f"  hf/                           the fine-tuned model with its tokenizer ({hf_out})")
    return 0


def _say(message: str) -> None:
    import jax

    if jax.process_index() == 0:
        print(f"jaxalign sft: {message}", flush=True)
