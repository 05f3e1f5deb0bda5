"""`DataConfig`: the `data:` section of a run config.

```yaml
data:
  train: demo:instructions            # a path, a glob, `demo:NAME`, `hf:NAME`, `tfds:NAME`, or a list of sources:
  # train:
  #   - {path: data/sharegpt/*.jsonl, weight: 1.0, format: sharegpt}
  #   - {path: demo:instructions, weight: 0.5}   # half of it, resampled every epoch
  eval_fraction: 0.02                 # or eval: <source(s)>
  format: auto
  template: vicuna_v1.1
  mask: assistant
  pack: true
  tokenizer: byte                     # or a HF folder; default: model.path of the run config
```
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from jaxalign.errors import JaxalignError

Format = Literal[
    "auto", "alpaca", "dolly", "sharegpt", "messages", "completion", "preference", "hh", "prompt", "unpaired", "text"
]
TemplateName = Literal[
    "tokenizer", "alpaca", "dolly", "vicuna_v1.1", "koala", "llama2_chat", "chatml", "orca", "lima", "gpt4all", "plain"
]
MaskMode = Literal["prompt", "assistant", "last_turn", "full"]


@dataclass(frozen=True)
class SourceSpec:
    """One data source. `path`: a file, a glob, `demo:NAME` (bundled demo data), `hf:NAME` (Hugging Face
    `datasets`, by name or local folder) or `tfds:NAME` (tensorflow-datasets via `tfds.data_source`).

    `weight` scales how many of its examples each epoch draws: 1 = each once, 0.5 = a fresh random half every
    epoch, 2.5 = each twice plus a random half. `split` / `hf_config`: the split (hf, tfds) and the `datasets`
    config name; `data_dir`: where tfds finds prepared datasets (default: tfds' own); `limit`: read at most this
    many records.
    """

    path: str = ""
    weight: float = 1.0
    format: Optional[Format] = None
    split: str = "train"
    hf_config: Optional[str] = None
    data_dir: Optional[str] = None
    limit: Optional[int] = None

    def __post_init__(self):
        if not self.path:
            raise JaxalignError("data source: 'path' is required (a file, glob, demo:NAME, hf:NAME or tfds:NAME)")
        if self.weight < 0:
            raise JaxalignError(f"data source {self.path}: weight must be >= 0, got {self.weight}")
        if self.limit is not None and self.limit <= 0:
            raise JaxalignError(f"data source {self.path}: limit must be positive, got {self.limit}")


@dataclass(frozen=True)
class TruncationConfig:
    """How over-long examples are cut to `seq_len`.

    `max_prompt_fraction`: the prompt (tokens before the first trained token) keeps at most this fraction of
    `seq_len`, cut from its end (GPT4All: 0.5). `overlong`: `truncate` cuts the end of an example that does not
    fit, `drop` drops it, `split` cuts it into consecutive `seq_len` blocks, each its own example (Vicuna's long
    chats; preference pairs are truncated instead). Examples left with no trained token are dropped and counted.
    """

    max_prompt_fraction: Optional[float] = None
    overlong: Literal["truncate", "drop", "split"] = "truncate"

    def __post_init__(self):
        fraction = self.max_prompt_fraction
        if fraction is not None and not 0.0 < fraction < 1.0:
            raise JaxalignError(f"config key 'data.truncation.max_prompt_fraction': expected 0 < x < 1, got {fraction}")


SourcesValue = Union[str, SourceSpec, list[Union[str, SourceSpec]], None]


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it becomes token batches.

    - `format`: record format, `auto` detects it per source from the first record.
    - `template`: how a conversation becomes text; `tokenizer` uses the tokenizer's own `chat_template`.
    - `mask`: which tokens are trained. `assistant`: every assistant turn (response text and its end token);
      `prompt`: everything from the first assistant turn on (the prompt before it is masked; for single-turn
      data the same as `assistant`); `last_turn`: only the last assistant turn (Ghost Attention); `full`: all.
      Preference pairs always train only the chosen / rejected response.
    - `system_message`: overrides the template's default system message (`""` = none) where a record has none.
    - `add_bos`: built-in templates start with the tokenizer's bos token (LLaMA-2-chat: every turn); the
      `tokenizer` template leaves bos to the chat template.
    - `shuffle`, `seed`: the per-epoch order; `on_error: skip` skips bad records and reports them (file:line).
    - `blank_responses`: a record whose response (the text it trains on: alpaca `output`, an assistant turn, a
      chosen / rejected answer, `text`) is empty or whitespace only would train only the end-of-turn token. `error`
      makes it a bad record (an error naming file:line and the field, or skipped with `on_error: skip`); `skip`
      skips it, and the loader reports how many it skipped.
    - `pad_token`, `eot_token`, `added_tokens`: tokens added to the tokenizer (see `tokens_to_add`); the SFT
      command gives them mean-initialised embedding rows, also on the padding rows of a table padded past its
      tokenizer (see `jaxalign.objectives.sft.resize_embeddings`). `pad_token` is needed when the tokenizer has
      none (Alpaca: `[PAD]`).
      `eot_token` is LIMA's end-of-turn token, used by the `lima` template.
    - `margin`: preference margin by strength (LLaMA-2 RM): `small` 1, 2/3, 1/3, 0; `large` 3, 2, 1, 0.
    - `tokenizer`: `byte` (built in, no download) or a HF tokenizer folder; null = the run config's `model.path`.
    """

    train: SourcesValue = None
    eval: SourcesValue = None
    eval_fraction: float = 0.0
    format: Format = "auto"
    template: TemplateName = "tokenizer"
    mask: MaskMode = "assistant"
    pack: bool = False
    system_message: Optional[str] = None
    shuffle: bool = True
    seed: int = 0
    on_error: Literal["raise", "skip"] = "raise"
    blank_responses: Literal["error", "skip"] = "error"
    truncation: TruncationConfig = field(default_factory=TruncationConfig)
    add_bos: bool = True
    pad_token: Optional[str] = None
    eot_token: str = "<|eot|>"
    added_tokens: tuple[str, ...] = ()
    margin: Literal["none", "small", "large"] = "none"
    tokenizer: Optional[str] = None

    def __post_init__(self):
        if not 0.0 <= self.eval_fraction < 1.0:
            raise JaxalignError(f"config key 'data.eval_fraction': expected 0 <= x < 1, got {self.eval_fraction}")
        if self.eval_fraction > 0 and self.eval is not None:
            raise JaxalignError("config keys 'data.eval' and 'data.eval_fraction' are exclusive: set one of them")

    def sources(self, split: str) -> tuple[SourceSpec, ...]:
        """The source specs of `split` (`train` or `eval`); eval_fraction draws eval from the train sources."""
        if split not in ("train", "eval"):
            raise JaxalignError(f"data split must be 'train' or 'eval', got {split!r}")
        value = self.eval if split == "eval" and self.eval is not None else self.train
        if value is None:
            raise JaxalignError(f"config key 'data.{split}' is required (a path, glob or list of sources)")
        if isinstance(value, str):
            return (SourceSpec(path=value),)
        if isinstance(value, SourceSpec):
            return (value,)
        if not value:
            raise JaxalignError(f"config key 'data.{split}': the list of sources is empty")
        return tuple(SourceSpec(path=v) if isinstance(v, str) else v for v in value)

    def replace(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)


def tokens_to_add(config: DataConfig, tokenizer) -> list[str]:
    """Tokens the config needs that `tokenizer` lacks, in a stable order (the SFT command resizes embeddings)."""
    wanted = list(config.added_tokens)
    if config.pad_token is not None:
        wanted.append(config.pad_token)
    if config.template == "lima":
        wanted.append(config.eot_token)
    vocab = tokenizer.get_vocab()
    missing = []
    for token in wanted:
        if token not in vocab and token not in missing:
            missing.append(token)
    return missing


def prepare_tokenizer(config: DataConfig, tokenizer):
    """Adds the config's missing tokens as special tokens and sets the pad token; returns the list of new tokens,
    which `jaxalign.models.loading.model_source(..., new_tokens=...)` gives mean-initialised embedding rows.

    Mutates `tokenizer` (HF tokenizers are mutable objects); call once, before building loaders or resizing.
    """
    new_tokens = tokens_to_add(config, tokenizer)
    if new_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": new_tokens}, replace_extra_special_tokens=False)
    if config.pad_token is not None:
        tokenizer.pad_token = config.pad_token
    return new_tokens
