"""Pieces every training command shares: eval data restarts at its first batch for every evaluation."""

import itertools

import numpy as np

from jaxalign.config import TrainConfig, from_dict
from jaxalign.data import load_tokenizer
from jaxalign.data.config import DataConfig
from jaxalign.train.command import build_loaders


def test_every_evaluation_starts_at_the_first_eval_batch():
    data = from_dict(DataConfig, {"train": "demo:instructions", "eval_fraction": 0.2, "template": "alpaca"})
    train_loader, eval_data = build_loaders(data, load_tokenizer("byte"), TrainConfig(batch_size=4, seq_len=320))
    first = [batch["input_ids"] for batch in itertools.islice(eval_data(), 2)]  # stops early, as eval_batches does
    again = [batch["input_ids"] for batch in itertools.islice(eval_data(), 2)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert len(list(eval_data())) == len(eval_data())
