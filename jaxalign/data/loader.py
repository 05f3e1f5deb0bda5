"""The resumable, per-process data loader.

Order: each epoch draws every source's examples `weight` times (fractions resampled per epoch), shuffles them
with `(seed, epoch)`, and gives process p the examples `order[p::process_count]`; every process computes the same
order, so the processes' examples together are exactly the epoch, without overlap. Examples are rendered and
tokenised as they are reached (in chunks, batched through the tokenizer), cut to `seq_len` (dropped ones counted),
and placed into fixed-shape rows: one per row, or packed first-come (`data.pack`). Train loaders run forever over
epochs; eval loaders make one pass (every process the same number of batches, padded) and restart on next use.
An unpaired split (KTO) sets each example's `mismatched` completion to the next example's (`mismatch`), so that
every row also carries its prompt with another example's completion, for KTO's reference point.

`state_dict()` is JSON-able `{epoch, position, part, stats}`: `position` is the next example of this process's share
not yet (wholly) in a returned batch and `part` its next block (`truncation.overlong: split`), so `load_state_dict` in
a fresh loader continues with exactly the next batch. `stats` counts examples (blocks), tokens, trained tokens,
truncated and dropped examples, rows and padding tokens of the batches returned so far.

Records skipped while reading (`data.on_error: skip`, `data.blank_responses: skip`) are kept in `skipped` (one
`origin: reason` each; `blank_skipped` counts the blank responses among them) and reported once, on process 0, as
one line on stderr when the loader is built.

```python
from jaxalign.data import DataConfig, build_loader, load_tokenizer
from jaxalign.config import from_dict
config = from_dict(DataConfig, {"train": "demo:instructions", "template": "alpaca", "pack": True})
loader = build_loader(config, load_tokenizer("byte"), batch_size=8, seq_len=256)
batch = next(loader)          # dict of numpy int32 [8, 256]: input_ids, targets, loss_mask, segment_ids, positions
```
"""

import dataclasses
import sys
from dataclasses import dataclass

import numpy as np

from jaxalign.data import packing
from jaxalign.data.config import DataConfig
from jaxalign.data.formats import Conversation, PreferencePair, Prompt, Text, UnpairedExample, parse_record
from jaxalign.data.masking import Fitted, fit, split_blocks, tokenize_segments, trained_flags
from jaxalign.data.sources import SourceData, load_source
from jaxalign.data.templates import render, render_pair, render_unpaired, special_tokens
from jaxalign.data.tokenizer import SegmentEncoder
from jaxalign.errors import JaxalignError

CHUNK = 256
STAT_KEYS = ("examples", "tokens", "trained_tokens", "truncated", "dropped", "rows", "padding_tokens")


@dataclass(frozen=True)
class Item:
    """A processed example: one `Fitted` part (LM, prompt) or two (chosen, rejected; completion, mismatched)."""

    parts: tuple[Fitted, ...]
    strength: int = -1
    safety: int = -1
    margin: float | None = None  # a pair's own margin
    desirable: bool = False  # an unpaired example's label
    index: int = -1  # the example's index in `DataLoader.examples`, set when the loader reads it

    @property
    def dropped(self) -> str | None:
        return next((p.dropped for p in self.parts if p.dropped), None)

    @property
    def truncated(self) -> bool:
        return any(p.truncated for p in self.parts)


def example_kind(example) -> str:
    if isinstance(example, (Conversation, Text)):
        return "lm"
    if isinstance(example, PreferencePair):
        return "preference"
    if isinstance(example, Prompt):
        return "prompt"
    if isinstance(example, UnpairedExample):
        return "unpaired"
    raise TypeError(type(example).__name__)


class Preprocessor:
    """Renders, tokenises, masks and fits examples (all kinds) for one tokenizer and config."""

    def __init__(self, config: DataConfig, tokenizer, seq_len: int):
        if tokenizer.pad_token_id is None:
            raise JaxalignError(
                "the tokenizer has no pad token; set config key 'data.pad_token' (e.g. '[PAD]' as Alpaca does, "
                "which adds it, or the eos token)"
            )
        if seq_len < 2:
            raise JaxalignError(f"seq_len must be at least 2, got {seq_len}")
        self.config = config
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.pad_id = int(tokenizer.pad_token_id)
        self.tokens = special_tokens(tokenizer, config.add_bos, config.eot_token)
        self.encoder = SegmentEncoder(tokenizer)

    def segments(self, example):
        """The rendered segments of an example (a pair: a tuple of chosen and rejected segments; an unpaired example:
        of its completion and its mismatched completion)."""
        c = self.config
        if isinstance(example, PreferencePair):
            return render_pair(example, c.template, self.tokens, c.system_message, self.tokenizer)
        if isinstance(example, UnpairedExample):
            return render_unpaired(example, c.template, self.tokens, c.system_message, self.tokenizer)
        return render(example, c.template, self.tokens, c.system_message, self.tokenizer)

    def prompt_ids(self, messages: list[dict], origin: str = "prompt") -> np.ndarray:
        """Token ids of a chat (`[{role, content}]`, ending with a user turn) rendered with the config's template up
        to the assistant header: what generation continues (chat, rollouts) for a model trained on this data."""
        parsed = parse_record({"messages": messages}, "prompt", origin)
        return tokenize_segments([self.segments(parsed)], self.encoder)[0].ids

    def process(self, examples: list) -> list[list[Item]]:
        """The items of each example: one, or several blocks with `truncation.overlong: split`."""
        flat, shapes = [], []
        for example in examples:
            rendered = self.segments(example)
            parts = list(rendered) if isinstance(example, (PreferencePair, UnpairedExample)) else [rendered]
            shapes.append(len(parts))
            flat.extend(parts)
        tokens = tokenize_segments(flat, self.encoder)
        items, k = [], 0
        for example, n in zip(examples, shapes):
            parts = tokens[k : k + n]
            k += n
            items.append(self._fit(example, parts))
        return items

    def _fit(self, example, parts) -> list[Item]:
        trunc = self.config.truncation
        if isinstance(example, Prompt):
            ids = parts[0].ids
            cut = ids.size > self.seq_len
            ids = ids[-self.seq_len :]
            return [Item((Fitted(ids, np.zeros(ids.size, bool), cut, None),))]
        if isinstance(example, (PreferencePair, UnpairedExample)):
            overlong = "truncate" if trunc.overlong == "split" else trunc.overlong
            fitted = tuple(
                fit(p.ids, trained_flags(p, "assistant"), self.seq_len, trunc.max_prompt_fraction, overlong)
                for p in parts
            )
            if isinstance(example, UnpairedExample):
                return [Item(fitted, desirable=example.desirable)]
            return [Item(fitted, example.strength, example.safety, margin=example.margin)]
        trained = trained_flags(parts[0], self.config.mask)
        if trunc.overlong == "split":
            return [Item((block,)) for block in split_blocks(parts[0].ids, trained, self.seq_len)]
        return [Item((fit(parts[0].ids, trained, self.seq_len, trunc.max_prompt_fraction, trunc.overlong),))]


def split_eval(sources: list[SourceData], fraction: float, seed: int, split: str) -> list[SourceData]:
    """Each source's examples for `split` when `eval_fraction` holds out a fixed random part of it; the records
    skipped while reading the source are reported with the train split."""
    out = []
    for i, source in enumerate(sources):
        n = len(source.examples)
        n_eval = max(1, round(n * fraction)) if n > 1 else 0
        order = np.random.default_rng([seed, 7919, i]).permutation(n)
        keep = np.sort(order[:n_eval] if split == "eval" else order[n_eval:])
        if keep.size == 0:
            raise JaxalignError(f"data source {source.spec.path}: eval_fraction {fraction} leaves no {split} examples")
        examples = [source.examples[j] for j in keep]
        if split == "train":
            out.append(SourceData(source.spec, source.format, examples, source.skipped, source.blank,
                                  source.identical))
        else:
            out.append(SourceData(source.spec, source.format, examples))
    return out


class DataLoader:
    """Process-local batches (numpy) of one split; see the module docstring."""

    def __init__(
        self,
        config: DataConfig,
        tokenizer,
        *,
        batch_size: int,
        seq_len: int,
        split: str = "train",
        process_index: int = 0,
        process_count: int = 1,
        sources: list[SourceData] | None = None,
    ):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise JaxalignError(f"process_index {process_index} is not in [0, process_count={process_count})")
        if batch_size < 1 or batch_size % process_count:
            raise JaxalignError(
                f"config key 'train.batch_size': {batch_size} must be a positive multiple of the process count "
                f"{process_count}"
            )
        self.config = config
        self.split = split
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.process_index = process_index
        self.process_count = process_count
        self.preprocessor = Preprocessor(config, tokenizer, seq_len)
        if sources is None:
            sources = [load_source(s, config.format, config.on_error, config.blank_responses)
                       for s in config.sources(split)]
            if config.eval_fraction > 0:
                sources = split_eval(sources, config.eval_fraction, config.seed, split)
        self.sources = sources
        self.skipped = [message for s in sources for message in s.skipped]
        self.blank_skipped = sum(s.blank for s in sources)
        self.identical_skipped = sum(s.identical for s in sources)
        if self.skipped and process_index == 0:
            summary = skipped_summary(split, self.skipped, self.blank_skipped, self.identical_skipped)
            print(f"jaxalign: {summary}", file=sys.stderr, flush=True)
        self.examples = [e for s in sources for e in s.examples]
        kinds = {example_kind(e) for e in self.examples}
        if len(kinds) != 1:
            formats = ", ".join(f"{s.spec.path}: {s.format}" for s in sources)
            raise JaxalignError(f"data.{split} mixes examples of different kinds ({formats}); use one kind per split")
        self.kind = kinds.pop()
        if self.kind == "unpaired":
            self.examples = mismatch(self.examples, split)
        self._offsets = np.cumsum([0] + [len(s.examples) for s in sources])
        self._eval_batches = self._count_eval_batches() if split == "eval" else None
        self.load_state_dict({"epoch": 0, "position": 0})

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global example indices of `epoch`, in order, before sharding over processes."""
        if self.split == "eval":
            return np.arange(len(self.examples))
        parts = []
        for i, source in enumerate(self.sources):
            n = len(source.examples)
            indices = np.arange(n) + self._offsets[i]
            whole, frac = divmod(source.spec.weight, 1.0)
            parts.extend([indices] * int(whole))
            extra = round(frac * n)
            if extra:
                rng = np.random.default_rng([self.config.seed, epoch, i, 1])
                parts.append(np.sort(rng.choice(indices, size=extra, replace=False)))
        order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if order.size == 0:
            raise JaxalignError(f"data.{self.split}: the source weights select no examples")
        if self.config.shuffle:
            order = np.random.default_rng([self.config.seed, epoch]).permutation(order)
        return order

    def shard(self, epoch: int, process_index: int | None = None) -> np.ndarray:
        p = self.process_index if process_index is None else process_index
        return self.epoch_order(epoch)[p :: self.process_count]

    def state_dict(self) -> dict:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "part": self._part,
            "process": [self.process_index, self.process_count],
            "num_examples": len(self.examples),
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict):
        """Continues where `state` (from `state_dict` of a loader over the same data and processes) stopped."""
        try:
            epoch, position, part = int(state["epoch"]), int(state["position"]), int(state.get("part", 0))
        except (KeyError, TypeError, ValueError):
            raise JaxalignError(f"data loader state must have integer 'epoch' and 'position', got {state!r}") from None
        here = {"process": [self.process_index, self.process_count], "num_examples": len(self.examples)}
        for key, value in here.items():
            if key in state and list(np.atleast_1d(state[key])) != list(np.atleast_1d(value)):
                raise JaxalignError(
                    f"the data position in the checkpoint was saved with {key} {state[key]}, this run has {value}; "
                    "resume with the same data and the same number of processes"
                )
        self._epoch, self._position, self._part = epoch, position, part
        self.stats = {k: int(state.get("stats", {}).get(k, 0)) for k in STAT_KEYS}
        self._shard_epoch, self._shard = None, None
        self._buffer: list[tuple[int, Item]] = []  # (shard position of its example, item)
        self._emitted = 0
        self._dropped_run = 0

    def __iter__(self):
        return self

    def __len__(self) -> int:
        if self._eval_batches is None:
            raise TypeError("a train loader is endless")
        return self._eval_batches

    def __next__(self) -> dict[str, np.ndarray]:
        if self.split == "eval" and self._emitted >= self._eval_batches:
            self.load_state_dict({"epoch": 0, "position": 0})
            raise StopIteration
        rows: list[list[Item]] = [[] for _ in range(self.local_batch_size)]
        used = [0] * self.local_batch_size
        pack = self.config.pack and self.kind == "lm"
        while (item := self._peek()) is not None:
            row = first_fit(used, item.parts[0].ids.size, self.seq_len, pack)
            if row is None:
                break
            rows[row].append(item)
            used[row] += item.parts[0].ids.size
            self._consume()
        self._emitted += 1
        return self._assemble(rows)

    def _assemble(self, rows: list[list[Item]]) -> dict[str, np.ndarray]:
        pad = self.preprocessor.pad_id
        if self.kind == "lm":
            examples = [[(i.parts[0].ids, i.parts[0].trained) for i in r] for r in rows]
            batch = packing.lm_batch(examples, self.seq_len, pad)
            real = batch["segment_ids"] > 0
        elif self.kind == "preference":
            pairs = [
                ((r[0].parts[0].ids, r[0].parts[0].trained), (r[0].parts[1].ids, r[0].parts[1].trained),
                 r[0].strength, r[0].safety, r[0].margin) if r else None
                for r in rows
            ]
            batch = packing.preference_batch(pairs, self.seq_len, pad, self.config.margin)
            real = np.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]]) > 0
        elif self.kind == "unpaired":
            examples = [
                ((r[0].parts[0].ids, r[0].parts[0].trained), (r[0].parts[1].ids, r[0].parts[1].trained),
                 r[0].desirable) if r else None
                for r in rows
            ]
            batch = packing.unpaired_batch(examples, self.seq_len, pad)
            real = np.concatenate([batch["completion_segment_ids"], batch["kl_segment_ids"]]) > 0
        else:
            batch = packing.prompt_batch([r[0].parts[0].ids if r else None for r in rows], self.seq_len, pad)
            real = batch["segment_ids"] > 0
        if self.kind != "lm":
            batch["example_index"] = np.asarray([r[0].index if r else -1 for r in rows], np.int32)
        self.stats["rows"] += real.shape[0]
        self.stats["tokens"] += int(real.sum())
        self.stats["padding_tokens"] += int(real.size - real.sum())
        self.stats["trained_tokens"] += int(sum(v.sum() for k, v in batch.items() if k.endswith("loss_mask")))
        return batch

    def _peek(self) -> Item | None:
        """The next usable item at the current position; dropped items are consumed and counted on the way."""
        while True:
            if not self._buffer:
                if not self._fill():
                    return None
            position, item = self._buffer[0]
            if item.dropped is None:
                self._dropped_run = 0
                return item
            self.stats["dropped"] += 1
            self._dropped_run += 1
            if self._dropped_run > self._current_shard().size:
                raise JaxalignError(
                    f"data.{self.split}: every example is dropped ({item.dropped}, e.g. {self.examples[0].origin}); "
                    f"seq_len {self.seq_len} may be too short for the template"
                )
            self._consume()

    def _consume(self):
        position, item = self._buffer.pop(0)
        if item.dropped is None:
            self.stats["examples"] += 1
            self.stats["truncated"] += int(item.truncated)
        if self._buffer and self._buffer[0][0] == position:
            self._part += 1
        else:
            self._position, self._part = position + 1, 0

    def _fill(self) -> bool:
        """Processes the next chunk of this process's share; False when an eval pass is done."""
        shard = self._current_shard()
        if self._position >= shard.size:
            if self.split == "eval":
                return False
            self._epoch += 1
            self._position = 0
            shard = self._current_shard()
            if shard.size == 0:
                raise JaxalignError(f"data.{self.split}: process {self.process_index} has no examples in its share")
        end = min(self._position + CHUNK, shard.size)
        indices = shard[self._position : end]
        processed = self.preprocessor.process([self.examples[i] for i in indices])
        self._buffer = [
            (p, dataclasses.replace(item, index=int(shard[p])))
            for p, items in zip(range(self._position, end), processed)
            for item in items
        ]
        self._buffer = self._buffer[self._part :] if self._part else self._buffer
        return True

    def _current_shard(self) -> np.ndarray:
        if self._shard_epoch != self._epoch:
            self._shard_epoch, self._shard = self._epoch, self.shard(self._epoch)
        return self._shard

    def _count_eval_batches(self) -> int:
        """Batches of the process with the largest share, so all processes run the same number of eval steps."""
        items = self.preprocessor.process(self.examples)
        shares = [[item for i in self.shard(0, p) for item in items[i]] for p in range(self.process_count)]
        return max(_pass_stats(share, self)["batches"] for share in shares)

    def pass_stats(self, epoch: int = 0, limit: int | None = None) -> dict:
        """Counts over this process's share of `epoch` (at most `limit` examples), without moving the loader."""
        shard = self.shard(epoch)[:limit]
        items = []
        for start in range(0, shard.size, CHUNK):
            for example_items in self.preprocessor.process([self.examples[i] for i in shard[start : start + CHUNK]]):
                items += example_items
        return _pass_stats(items, self)


def mismatch(examples: list[UnpairedExample], split: str = "train") -> list[UnpairedExample]:
    """`examples` with each one's `mismatched` set to the completion of the next example (the last: the first's):
    every prompt paired with another example's completion for KTO's reference point, a fixed partner per example,
    so that everything stays keyed by example index."""
    n = len(examples)
    if n < 2:
        raise JaxalignError(
            f"data.{split} has {n} unpaired example; KTO needs at least 2 (each prompt is paired with another "
            "example's completion for its reference point)"
        )
    return [dataclasses.replace(e, mismatched=examples[(i + 1) % n].completion) for i, e in enumerate(examples)]


def skipped_summary(split: str, skipped: list[str], blank: int, identical: int = 0) -> str:
    """One line: how many records of `split` were skipped, why, and the first of them."""
    reasons = []
    if blank:
        reasons.append(f"{blank} with a blank response (data.blank_responses=skip)")
    if identical:
        reasons.append(f"{identical} pairs with chosen identical to rejected")
    if len(skipped) > blank + identical:
        reasons.append(f"{len(skipped) - blank - identical} bad (data.on_error=skip)")
    records = "record" if len(skipped) == 1 else "records"
    return f"data.{split}: skipped {len(skipped)} {records}: {', '.join(reasons)}; first: {skipped[0]}"


def first_fit(used: list[int], n: int, seq_len: int, pack: bool) -> int | None:
    """The row of a batch an example of `n` tokens goes to: the first with room (packed) or the first empty one;
    None when the batch is full. Examples are placed in order, so the loader's position stays one number."""
    for row, filled in enumerate(used):
        if filled == 0 or pack and filled + n <= seq_len:
            return row
    return None


def _pass_stats(items: list[Item], loader: DataLoader) -> dict:
    """examples, tokens, trained tokens, truncated, dropped, rows, batches and packing efficiency of `items`."""
    pack = loader.config.pack and loader.kind == "lm"
    stats = dict.fromkeys(("examples", "tokens", "trained_tokens", "truncated", "dropped", "rows", "batches"), 0)
    used = [0] * loader.local_batch_size
    for item in items:
        if item.dropped is not None:
            stats["dropped"] += 1
            continue
        n = item.parts[0].ids.size
        row = first_fit(used, n, loader.seq_len, pack)
        if row is None:
            stats["batches"] += 1
            stats["rows"] += len(used)
            used = [0] * loader.local_batch_size
            row = 0
        used[row] += n
        stats["examples"] += 1
        stats["truncated"] += int(item.truncated)
        stats["tokens"] += sum(p.ids.size for p in item.parts)
        stats["trained_tokens"] += sum(int(p.trained[1:].sum()) for p in item.parts)
    if any(used):
        stats["batches"] += 1
        stats["rows"] += sum(1 for filled in used if filled)
    capacity = stats["rows"] * loader.seq_len * (2 if loader.kind in ("preference", "unpaired") else 1)
    stats["packing_efficiency"] = stats["tokens"] / capacity if capacity else 0.0
    return stats


def build_loader(config: DataConfig, tokenizer, *, batch_size: int, seq_len: int, split: str = "train",
                 process_index: int = 0, process_count: int = 1) -> DataLoader:
    """A loader for `split`; call `prepare_tokenizer(config, tokenizer)` first when the config adds tokens."""
    return DataLoader(config, tokenizer, batch_size=batch_size, seq_len=seq_len, split=split,
                      process_index=process_index, process_count=process_count)


def make_global_batch(batch: dict, mesh, batch_axes=("data", "fsdp")) -> dict:
    """Process-local numpy batch -> global `jax.Array`s, leading axis sharded over `batch_axes` of `mesh`."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    out = {}
    for key, value in batch.items():
        spec = PartitionSpec(axes or None, *([None] * (value.ndim - 1)))
        out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value)
    return out
