"""Fixed-shape numpy batches: padded or packed LM rows, preference pairs, unpaired (KTO) examples, left-padded RL
prompts.

LM batch (all int32 `[B, L]`):
- `input_ids`: the tokens; pad id on padding.
- `targets`: `targets[t]` is the token position t predicts (`input_ids[t + 1]` inside an example; pad id at an
  example's last token and on padding).
- `loss_mask`: 1 where predicting `targets[t]` is trained; 0 on prompts, padding and an example's last token (its
  "next token" belongs to the next packed example).
- `segment_ids`: 1, 2, 3... for the packed examples of a row, 0 on padding.
- `positions`: 0, 1, 2... restarting for every packed example; 0 on padding.

Preference batch, one pair per row (never packed): `chosen_{input_ids,targets,loss_mask,segment_ids,positions}`
and the same with `rejected_`, all `[B, L]` int32 as above; `[B]` arrays `strength` int32 (0 significantly
better .. 3 negligibly better / unsure, -1 unknown), `safety` int32 (1 / 0, -1 unknown), `margin` float32 (from
strength with `data.margin`, or the record's own `margin`; 0 when unknown or `none`) and `pair_mask` float32 (1 for
a real pair, 0 for a padding row at the end of an eval set). The loader adds `example_index` `[B]` int32: the row's
index in `loader.examples` (-1 for padding), to key per-example values such as precomputed reference log-probs.

Unpaired batch (KTO), one example per row (never packed): `completion_{input_ids,targets,loss_mask,segment_ids,
positions}` (the prompt and the example's own completion, only the completion trained) and the same with `kl_`
(the prompt and the `mismatched` completion, another example's: KTO's reference point), all `[B, L]` int32 as
above; `[B]` arrays `desirable` float32 (1 desirable, 0 undesirable and on padding rows) and `example_mask` float32
(1 for a real example, 0 for a padding row). The loader adds `example_index` `[B]` int32 as for preference batches.

Prompt batch (RL), left-padded so generation continues every row at the same slot: `input_ids`, `segment_ids`
(1 on tokens, 0 on padding), `positions` (0... from the first real token), all `[B, L]` int32; `prompt_length`
`[B]` int32 and `prompt_mask` `[B]` float32 (0 for padding rows). The loader adds `example_index` `[B]` int32:
the row's index in `loader.examples` (-1 for padding), whose `.reference` is the record's reference answer.
"""

import numpy as np

MARGINS = {
    "none": (0.0, 0.0, 0.0, 0.0),
    "small": (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0),
    "large": (3.0, 2.0, 1.0, 0.0),
}

LM_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def lm_batch(rows: list[list[tuple[np.ndarray, np.ndarray]]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """`rows[b]` lists the `(ids, trained)` examples packed into row b, in order (an empty list = a padding row)."""
    batch = {key: np.zeros((len(rows), seq_len), np.int32) for key in LM_KEYS}
    batch["input_ids"][:] = pad_id
    batch["targets"][:] = pad_id
    for b, examples in enumerate(rows):
        offset = 0
        for segment, (ids, trained) in enumerate(examples, start=1):
            n = ids.size
            if offset + n > seq_len:
                raise ValueError(f"row {b}: examples of {offset + n} tokens exceed seq_len {seq_len}")
            span = slice(offset, offset + n)
            batch["input_ids"][b, span] = ids
            batch["targets"][b, offset : offset + n - 1] = ids[1:]
            batch["loss_mask"][b, offset : offset + n - 1] = trained[1:]
            batch["segment_ids"][b, span] = segment
            batch["positions"][b, span] = np.arange(n)
            offset += n
    return batch


def preference_batch(pairs: list, seq_len: int, pad_id: int, margin: str = "none") -> dict[str, np.ndarray]:
    """`pairs[b]` = `(chosen (ids, trained), rejected (ids, trained), strength, safety[, margin])` or None for a
    padding row; a pair's own margin (not None) replaces the `margin` table's value for its strength."""
    batch = {}
    for index, name in ((0, "chosen"), (1, "rejected")):
        rows = [[pair[index]] if pair is not None else [] for pair in pairs]
        batch.update({f"{name}_{k}": v for k, v in lm_batch(rows, seq_len, pad_id).items()})
    strength = np.asarray([pair[2] if pair is not None else -1 for pair in pairs], np.int32)
    margins = np.asarray(MARGINS[margin] + (0.0,), np.float32)
    batch["strength"] = strength
    batch["safety"] = np.asarray([pair[3] if pair is not None else -1 for pair in pairs], np.int32)
    batch["margin"] = margins[strength]
    for b, pair in enumerate(pairs):
        if pair is not None and len(pair) > 4 and pair[4] is not None:
            batch["margin"][b] = pair[4]
    batch["pair_mask"] = np.asarray([pair is not None for pair in pairs], np.float32)
    return batch


def unpaired_batch(examples: list, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """`examples[b]` = `(completion (ids, trained), kl (ids, trained), desirable)` or None for a padding row."""
    batch = {}
    for index, name in ((0, "completion"), (1, "kl")):
        rows = [[example[index]] if example is not None else [] for example in examples]
        batch.update({f"{name}_{k}": v for k, v in lm_batch(rows, seq_len, pad_id).items()})
    batch["desirable"] = np.asarray([bool(e[2]) if e is not None else False for e in examples], np.float32)
    batch["example_mask"] = np.asarray([e is not None for e in examples], np.float32)
    return batch


def prompt_batch(prompts: list, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """`prompts[b]`: token ids (an int array or list, at most `seq_len`) or None for a padding row; left-padded."""
    batch = {key: np.zeros((len(prompts), seq_len), np.int32) for key in ("input_ids", "segment_ids", "positions")}
    batch["input_ids"][:] = pad_id
    lengths = np.zeros(len(prompts), np.int32)
    for b, ids in enumerate(prompts):
        if ids is None:
            continue
        ids = np.asarray(ids, np.int32)
        n = ids.size
        batch["input_ids"][b, seq_len - n :] = ids
        batch["segment_ids"][b, seq_len - n :] = 1
        batch["positions"][b, seq_len - n :] = np.arange(n)
        lengths[b] = n
    batch["prompt_length"] = lengths
    batch["prompt_mask"] = np.asarray([p is not None for p in prompts], np.float32)
    return batch
