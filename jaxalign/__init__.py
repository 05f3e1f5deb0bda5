"""jaxalign: supervised fine-tuning, reward models and RLHF for open LLaMA-family models in JAX."""

__version__ = "0.1.0"

__all__ = ["load_pretrained", "save_pretrained"]


def __getattr__(name):
    if name in __all__:
        from jaxalign import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'jaxalign' has no attribute {name!r}")
