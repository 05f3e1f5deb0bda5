"""The data pipeline: sources -> formats -> templates -> token masks -> padded / packed batches -> loader.

See `loader.py` for building a loader from a `DataConfig`, `packing.py` for the batch keys.
"""

from jaxalign.data.config import DataConfig, SourceSpec, TruncationConfig, prepare_tokenizer, tokens_to_add
from jaxalign.data.loader import DataLoader, build_loader, make_global_batch
from jaxalign.data.tokenizer import byte_tokenizer, load_tokenizer

__all__ = [
    "DataConfig",
    "DataLoader",
    "SourceSpec",
    "TruncationConfig",
    "build_loader",
    "byte_tokenizer",
    "load_tokenizer",
    "make_global_batch",
    "prepare_tokenizer",
    "tokens_to_add",
]
