"""Sharded training core: the one training loop (`train`), its layout planning and memory prediction.

See `jaxalign.train.loop` for the loop's contract. The names below load on first use, so that
`jaxalign.train.stop` can be imported (and its signal handlers installed) before JAX.
"""

__all__ = ["TrainState", "state_memory", "plan", "train"]


def __getattr__(name):
    if name == "TrainState":
        from jaxalign.train.state import TrainState

        return TrainState
    if name in __all__:
        from jaxalign.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'jaxalign.train' has no attribute {name!r}")
