"""Model definitions: the LLaMA family (`llama`), scalar heads (`heads`), jaxalign model checkpoints."""

from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM, LlamaModel, init_cache, logical_axes

__all__ = ["LlamaConfig", "LlamaForCausalLM", "LlamaModel", "init_cache", "logical_axes"]
