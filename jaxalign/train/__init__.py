"""Sharded training core: the one training loop (`train`), its layout planning and memory prediction.

See `jaxalign.train.loop` for the loop's contract.
"""

from jaxalign.train.loop import memory_report, plan, train
from jaxalign.train.state import TrainState

__all__ = ["TrainState", "memory_report", "plan", "train"]
