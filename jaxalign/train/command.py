"""What every training command (`jaxalign sft`, `jaxalign rm`, ...) does around its algorithm, in one place.

    def run(args):
        return run_training_command(args, SFTConfig, train_sft)

    def train_sft(config, allow_config_change=False):
        if already_finished(config, "sft"):
            return 0
        tokenizer, added = run_tokenizer(config)
        train_loader, eval_data = build_loaders(config.data, tokenizer, config.train)
        state = train(config, algorithm, allow_config_change=allow_config_change)
        export_model(config, lambda folder: save_pretrained(model, state.params["model"], folder, ...))

A stop signal makes the command return 143 / 130 once the checkpoint is safe; a rerun with other training settings
is refused before anything in OUTPUT_DIR changes (`jaxalign.train.run_dir`); a finished run is not retrained and
its export is written only when missing, into a temporary folder that replaces OUTPUT_DIR/hf in one step.
"""

import argparse
import os
from pathlib import Path
from typing import Any, Callable

from jaxalign import storage
from jaxalign.errors import JaxalignError


def add_run_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """The arguments every training command takes: the config, overrides, `--allow-config-change`."""
    parser.add_argument("config", type=Path, help=f"YAML run config (e.g. {example})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, values parsed as YAML (e.g. train.steps=100 optimizer.lr=1e-5)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="continue a run in output_dir although its training settings (model, data, optimizer, "
                             "...) differ from the ones it was started with")


def run_training_command(args: argparse.Namespace, config_class: type, train_fn: Callable[..., int]) -> int:
    """Installs the stop-signal handling before JAX loads, reads the config, starts the distributed runtime and
    calls `train_fn(config, allow_config_change=...)`; a stop signal returns its exit status (143 / 130)."""
    from jaxalign.train import stop

    stop.install()
    from jaxalign import sharding as shd
    from jaxalign.config import load_config

    config = load_config(config_class, args.config, args.overrides)
    shd.initialize_distributed()
    stop.install()  # the distributed runtime puts its own SIGTERM handler in place; take the signal back
    try:
        return train_fn(config, allow_config_change=args.allow_config_change)
    except stop.TrainingStopped as stopped:
        return stopped.code


def already_finished(config, command: str, allow_config_change: bool = False) -> bool:
    """Checks OUTPUT_DIR against the config (refusing other training settings, see `run_dir.check_config`) and
    says so when it already holds the finished run with its export."""
    from jaxalign.train import run_dir

    run_dir.check_config(config, allow_config_change)
    out = storage.location(config.output_dir)
    finished = run_dir.latest_checkpoint_step(out)
    if finished is not None and finished >= config.train.steps and (out / "hf").is_dir():
        say(command, f"{out} already finished at step {finished} (train.steps={config.train.steps}); the model is "
                     f"in {out / 'hf'} (raise train.steps to train on)")
        return True
    return False


def run_tokenizer(config) -> tuple[Any, list[str]]:
    """(tokenizer of `data.tokenizer` or else `model.path`, the tokens `data` adds to it)."""
    from jaxalign.data import load_tokenizer, prepare_tokenizer

    spec = config.data.tokenizer or config.model.path
    if spec is None:
        raise JaxalignError("config key 'data.tokenizer' is required when model.path is not set (e.g. 'byte')")
    tokenizer = load_tokenizer(spec)
    return tokenizer, prepare_tokenizer(config.data, tokenizer)


def build_loaders(data_config, tokenizer, train_config) -> tuple[Any, Callable[[], Any] | None]:
    """(this process's train loader, `eval_data()` giving the eval loader, or None without eval data)."""
    import jax

    from jaxalign.data import build_loader

    loader_args = dict(batch_size=train_config.batch_size, seq_len=train_config.seq_len,
                       process_index=jax.process_index(), process_count=jax.process_count())
    train_loader = build_loader(data_config, tokenizer, split="train", **loader_args)
    if data_config.eval is None and data_config.eval_fraction == 0:
        return train_loader, None
    eval_loader = build_loader(data_config, tokenizer, split="eval", **loader_args)

    def eval_data():
        """The eval split from its first batch (an evaluation may stop early at `train.eval_batches`)."""
        eval_loader.load_state_dict({"epoch": 0, "position": 0})
        return eval_loader

    return train_loader, eval_data


def lora_module(config, module):
    """`module` with the adapters of `model.lora` (unchanged without)."""
    if config.model.lora is None:
        return module
    from jaxalign.models.lora import apply_to

    return type(module)(apply_to(module.config, config.model.lora))


def with_lora(config, algorithm, source, trained_modules: tuple[str, ...] = (), name: str = "model"):
    """(the algorithm to train, `export_params(state.params)` giving the parameters of the model without adapters
    to export). With `model.lora` (the algorithm's model built by `lora_module`) only the adapters and
    `trained_modules` train (`jaxalign.train.adapters.adapt`) and the export folds the adapters into the base
    weights; without, both are unchanged."""
    if config.model.lora is None:
        return algorithm, lambda params: params[name]
    from jaxalign.train.adapters import adapt

    adapted = adapt(algorithm, source, trained_modules=trained_modules, mesh_config=config.mesh, seed=config.seed,
                    name=name)
    return adapted.algorithm, adapted.merged


def export_model(config, save: Callable[[Path], Any], name: str = "hf") -> os.PathLike:
    """Runs `save(folder)` (every process; `folder` a local folder) into OUTPUT_DIR/<name>.partial, then puts it in
    place of OUTPUT_DIR/<name> (process 0, `storage.replace_folder`), so a failed or interrupted export never
    replaces a good one with a half-written folder. On an object store `folder` is a local staging folder, uploaded
    to OUTPUT_DIR/<name>.partial once `save` returns. Returns OUTPUT_DIR/<name>."""
    import jax

    out = storage.location(config.output_dir)
    partial, final = out / f"{name}.partial", out / name
    primary = jax.process_index() == 0
    if primary:
        storage.remove_folder(partial)
    with storage.staged_folder(partial) as folder:
        save(folder)
    if primary:
        storage.replace_folder(partial, final)
    return final


def export_adapter(config, model, state_params, tokenizer=None, name: str = "model") -> Path | None:
    """With `model.lora`, writes the trained adapters of `model` (the module without adapters) as a PEFT adapter
    folder OUTPUT_DIR/adapter with the tokenizer (`peft.PeftModel.from_pretrained(base, folder)` loads it;
    `model.path` is recorded as its base) and returns it; None without adapters."""
    if config.model.lora is None:
        return None
    from jaxalign.hf import save_peft_adapter

    import jax

    adapted = lora_module(config, model)

    def save(folder):
        save_peft_adapter(adapted.config, state_params[name], folder, base_model_name_or_path=config.model.path)
        if tokenizer is not None and jax.process_index() == 0:
            tokenizer.save_pretrained(folder)

    return export_model(config, save, name="adapter")


def report_finished(command: str, config, steps: int, model_line: str) -> None:
    """The closing message: where the curves, checkpoints and the exported model are."""
    out = storage.location(config.output_dir)
    say(command, f"finished {steps} steps. Outputs in {out}/:\n"
                 f"  metrics.jsonl, tensorboard/   training and eval curves (PNGs: jaxalign plot {out})\n"
                 f"  checkpoints/                  resumable train state\n"
                 f"  hf/                           {model_line}")


def write_jsonl(path: os.PathLike, lines: list[dict]) -> None:
    """Writes JSON lines in one step (`storage.write_text`: a crash never leaves a partial file)."""
    import json

    storage.write_text(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))


def on_primary(action: Callable[[], Any], name: str) -> None:
    """Runs `action()` on process 0 only (it writes files into the shared OUTPUT_DIR), then waits until every
    process is here (`name` labels the barrier)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        action()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def say(command: str, message: str) -> None:
    import jax

    if jax.process_index() == 0:
        print(f"jaxalign {command}: {message}", flush=True)
