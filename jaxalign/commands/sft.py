"""`jaxalign sft CONFIG.yaml [key.sub=value ...]`: supervised fine-tuning with the one training loop.

The model starts from a Hugging Face folder or a jaxalign model checkpoint (`model.path`), or from random weights
(`model.config`, e.g. `{preset: tiny}`). Tokens the data config adds (a pad token, LIMA's end-of-turn token) grow
the embeddings with mean-initialised rows. The loss is the mean cross-entropy over the trained tokens of each global
batch; with eval data (`data.eval` or `data.eval_fraction`) every `train.eval_every` steps the run logs `eval_loss`,
`eval_perplexity` and `eval_correct` (next-token accuracy). A finished run is exported to `OUTPUT_DIR/hf/`, a
Hugging Face folder with the tokenizer.
"""

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from jaxalign.config import RunConfig, load_config
from jaxalign.data.config import DataConfig
from jaxalign.errors import JaxalignError

# LlamaConfig fields that `model.config` may change on top of a pretrained model: numerics and regularisation, not
# the shapes of the weights.
PRETRAINED_OVERRIDES = ("remat", "residual_dropout", "rope_scaling", "max_position_embeddings", "sliding_window")


@dataclass(frozen=True)
class SFTConfig(RunConfig):
    """A run config whose `data` section is the data pipeline's `DataConfig`."""

    data: DataConfig = field(default_factory=DataConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, values parsed as YAML (e.g. train.steps=100 optimizer.lr=1e-5)")


def split_preset(section) -> tuple[dict, dict]:
    """(defaults of `model.config.preset`, the other `model.config` values); `preset: tiny` is `LlamaConfig.tiny`,
    whose head_dim is left to derive from the final sizes."""
    from jaxalign.models.llama import LlamaConfig

    values = dict(section.config)
    preset = values.pop("preset", None)
    if preset not in (None, "tiny"):
        raise JaxalignError(f"config key 'model.config.preset': expected 'tiny' or no preset, got {preset!r}")
    defaults = dataclasses.asdict(LlamaConfig.tiny()) if preset == "tiny" else {}
    defaults.pop("head_dim", None)
    return defaults, values


def scratch_model_config(section, tokenizer):
    """`LlamaConfig` for random initialisation from `model.config` (`preset: tiny` starts from `LlamaConfig.tiny`);
    the vocabulary size and bos / eos / pad ids default to the tokenizer's."""
    from jaxalign.config import from_dict
    from jaxalign.models.llama import LlamaConfig

    defaults, values = split_preset(section)
    defaults.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=section.dtype,
        param_dtype=section.param_dtype,
    )
    config = from_dict(LlamaConfig, {**defaults, **values}, prefix="model.config")
    if config.vocab_size < len(tokenizer):
        raise JaxalignError(
            f"config key 'model.config.vocab_size': {config.vocab_size} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens"
        )
    return config


def pretrained_model_config(section):
    """(`LlamaConfig` of the weights in `model.path`, `load(shardings) -> params`) without reading any weights."""
    import jaxalign
    from jaxalign.hf import config_from_hf, read_hf_config
    from jaxalign.models.checkpoint import is_model_checkpoint, load_model_checkpoint, read_model_config

    path = Path(section.path)
    if (path / "config.json").is_file():
        config = config_from_hf(read_hf_config(path), where=str(path / "config.json"), dtype=section.param_dtype)

        def load(shardings):
            return jaxalign.load_pretrained(path, dtype=section.param_dtype, shardings=shardings)[1]
    elif is_model_checkpoint(path):
        config = dataclasses.replace(read_model_config(path), param_dtype=section.param_dtype)

        def load(shardings):
            return load_model_checkpoint(path, shardings=shardings, dtype=section.param_dtype)[1]
    else:
        raise JaxalignError(
            f"config key 'model.path': {path} is neither a Hugging Face folder (config.json) nor a jaxalign model "
            "checkpoint (jaxalign_model.json); to train from random weights set model.path=null and model.config"
        )
    changed = sorted(set(section.config) - set(PRETRAINED_OVERRIDES))
    if changed:
        raise JaxalignError(
            f"config key 'model.config.{changed[0]}': cannot change a pretrained model's architecture; with "
            f"model.path set, model.config may only set {', '.join(PRETRAINED_OVERRIDES)}"
        )
    from jaxalign.config import from_dict
    from jaxalign.models.llama import LlamaConfig

    values = {**dataclasses.asdict(config), **section.config, "dtype": section.dtype}
    return from_dict(LlamaConfig, values, prefix="model.config"), load


def params_initializer(base_config, load, new_vocab_size: int, mesh_config):
    """`init_params(shardings)` for the loop: loads the weights, growing the vocabulary when tokens were added."""
    if new_vocab_size == base_config.vocab_size:
        return load

    def init_params(shardings):
        import warnings

        import jax

        from jaxalign import sharding as shd
        from jaxalign.models.llama import LlamaForCausalLM
        from jaxalign.objectives.sft import resize_embeddings
        from jaxalign.train.loop import model_init_fn
        from jaxalign.train.state import param_shardings

        mesh = jax.tree.leaves(shardings)[0].mesh
        boxed = jax.eval_shape(model_init_fn(LlamaForCausalLM(base_config)), jax.random.PRNGKey(0))
        params = load(param_shardings(boxed, mesh, shd.logical_rules(mesh_config)))
        # Donation lets every unchanged weight keep its buffer; only the grown embedding tables are new.
        grow = jax.jit(lambda p: resize_embeddings(p, base_config, new_vocab_size)[0], out_shardings=shardings,
                       donate_argnums=0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            return grow(params)

    return init_params


def run(args: argparse.Namespace) -> int:
    from jaxalign import sharding as shd

    config = load_config(SFTConfig, args.config, args.overrides)
    shd.initialize_distributed()
    return train_sft(config)


def train_sft(config: SFTConfig) -> int:
    import jax

    from jaxalign.data import build_loader, load_tokenizer, prepare_tokenizer
    from jaxalign.hf import save_pretrained
    from jaxalign.models.llama import LlamaForCausalLM
    from jaxalign.objectives.sft import make_loss_fn, perplexity
    from jaxalign.train.loop import train

    tokenizer_spec = config.data.tokenizer or config.model.path
    if tokenizer_spec is None:
        raise JaxalignError("config key 'data.tokenizer' is required when model.path is not set (e.g. 'byte')")
    tokenizer = load_tokenizer(tokenizer_spec)
    added = prepare_tokenizer(config.data, tokenizer)

    if config.model.path is None:
        model_config = scratch_model_config(config.model, tokenizer)
        init_params = None
    else:
        base_config, load = pretrained_model_config(config.model)
        new_vocab_size = max(base_config.vocab_size, len(tokenizer))
        init_params = params_initializer(base_config, load, new_vocab_size, config.mesh)
        model_config = dataclasses.replace(base_config, vocab_size=new_vocab_size)
        if tokenizer.pad_token_id is not None:
            model_config = dataclasses.replace(model_config, pad_token_id=tokenizer.pad_token_id)
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
    state = train(config, model, make_loss_fn(model), train_loader, init_params=init_params, eval_data=eval_data,
                  eval_derived=perplexity)

    out = Path(config.output_dir)
    if int(state.step) < config.train.steps:
        _say(f"stopped at step {int(state.step)} of {config.train.steps}; run the same command again to resume")
        return 0
    hf_dir = save_pretrained(model, state.params, out / "hf", tokenizer=tokenizer)
    _say(f"finished {config.train.steps} steps. Outputs in {out}/:\n"
         f"  metrics.jsonl, tensorboard/   training and eval curves (PNGs: jaxalign plot {out})\n"
         f"  checkpoints/                  resumable train state\n"
         f"  hf/                           the fine-tuned model with its tokenizer ({hf_dir})")
    return 0


def with_stop_token(config, token_id: int):
    """`config` whose eos ids also include `token_id`, so generation stops at LIMA's end-of-turn token."""
    eos = config.eos_token_id
    eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    if token_id in eos:
        return config
    return dataclasses.replace(config, eos_token_id=(*eos, token_id))


def _say(message: str) -> None:
    import jax

    if jax.process_index() == 0:
        print(f"jaxalign sft: {message}", flush=True)
