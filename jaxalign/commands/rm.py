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
`LlamaForSequenceClassification` with the tokenizer.
"""

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from jaxalign.config import ModelSection, RunConfig, load_config
from jaxalign.data.config import DataConfig
from jaxalign.errors import JaxalignError


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML run config (see configs/tiny/rm.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, values parsed as YAML (e.g. loss.margin=small optimizer.lr=1e-5)")


def run(args: argparse.Namespace) -> int:
    from jaxalign import sharding as shd

    config = load_config(RMConfig, args.config, args.overrides)
    shd.initialize_distributed()
    return train_rm(config)


def train_rm(config: RMConfig) -> int:
    import jax

    from jaxalign.data import build_loader, load_tokenizer, prepare_tokenizer
    from jaxalign.hf import save_pretrained
    from jaxalign.models.loading import model_source
    from jaxalign.objectives.reward import make_algorithm
    from jaxalign.train.loop import train

    tokenizer_spec = config.data.tokenizer or config.model.path
    if tokenizer_spec is None:
        raise JaxalignError("config key 'data.tokenizer' is required when model.path is not set (e.g. 'byte')")
    tokenizer = load_tokenizer(tokenizer_spec)
    added = prepare_tokenizer(config.data, tokenizer)
    source = model_source(config.model, tokenizer, head="score", mesh=config.mesh, seed=config.seed,
                          new_tokens=added)
    model = source.module()
    data = config.data.replace(margin=config.loss.margin)
    loader_args = dict(batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                       process_index=jax.process_index(), process_count=jax.process_count())
    train_loader = build_loader(data, tokenizer, split="train", **loader_args)
    if train_loader.kind != "preference":
        raise JaxalignError(f"config key 'data.train': a reward model trains on preference pairs (prompt, chosen, "
                            f"rejected), but the data holds {train_loader.kind} examples")
    eval_data = None
    if data.eval is not None or data.eval_fraction > 0:
        eval_loader = build_loader(data, tokenizer, split="eval", **loader_args)
        eval_data = lambda: eval_loader  # noqa: E731 - the eval loader restarts after each full pass

    algorithm = make_algorithm(model, config.optimizer, train_loader, init=source.load, eval_data=eval_data,
                               center_coefficient=config.loss.center_coefficient)
    state = train(config, algorithm)

    out = Path(config.output_dir)
    if int(state.step) < config.train.steps:
        _say(f"stopped at step {int(state.step)} of {config.train.steps}; run the same command again to resume")
        return 0
    hf_dir = save_pretrained(model, state.params["model"], out / "hf", tokenizer=tokenizer)
    _say(f"finished {config.train.steps} steps. Outputs in {out}/:\n"
         f"  metrics.jsonl, tensorboard/   training and eval curves (PNGs: jaxalign plot {out})\n"
         f"  checkpoints/                  resumable train state\n"
         f"  hf/                           the reward model with its tokenizer ({hf_dir}); score with "
         f"jaxalign reward --model {hf_dir} --data FILE.jsonl")
    return 0


def _say(message: str) -> None:
    import jax

    if jax.process_index() == 0:
        print(f"jaxalign rm: {message}", flush=True)
