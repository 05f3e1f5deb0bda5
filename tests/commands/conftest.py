"""Fixtures shared by the command tests."""

import pytest

from jaxalign.hf import load_tokenizer


@pytest.fixture(scope="module")
def tiny_chat_model(smollm2_dir, tmp_path_factory):
    """`make(max_positions)` saves a tiny random LLaMA (weights large enough that replies depend on the prompt) with
    SmolLM2's tokenizer and chat template as a Hugging Face folder, and returns the folder."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def make(max_positions: int):
        folder = tmp_path_factory.mktemp("tiny_chat_model")
        tokenizer = load_tokenizer(smollm2_dir)
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if not name.endswith("norm.weight"):
                    param.normal_(0.0, 0.2)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return make
