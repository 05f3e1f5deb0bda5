"""Reward / value models as Hugging Face `*ForSequenceClassification` folders (one label): jaxalign's export scores
in transformers as in jaxalign, and a transformers reward model imports with its scores."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign
from jaxalign.errors import JaxalignError
from jaxalign.models.heads import LlamaForScore, last_token_scores
from jaxalign.models.llama import LlamaConfig
from jaxalign.models.loading import load_model

from tests.params import init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAD = 0


def right_padded(rng) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 9, 6 and 3 tokens (ids >= 3, so no pad inside), right-padded with `PAD` to 12."""
    ids = np.full((3, 12), PAD, np.int32)
    segments = np.zeros((3, 12), np.int32)
    for row, n in enumerate((9, 6, 3)):
        ids[row, :n] = rng.integers(3, 200, n)
        segments[row, :n] = 1
    return ids, segments


def jaxalign_rewards(model, params, ids, segments) -> np.ndarray:
    positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0)
    scores = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(segments))
    return np.asarray(last_token_scores(scores, jnp.asarray(segments)))


def transformers_rewards(hf_model, ids) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(ids, dtype=torch.long)).logits[:, 0].float().numpy()


def test_exported_reward_model_scores_in_transformers_like_jaxalign(tmp_path):
    config = LlamaConfig.tiny(vocab_size=256, pad_token_id=PAD, eos_token_id=2, bos_token_id=1)
    model = LlamaForScore(config)
    params = init_params(model, jax.random.PRNGKey(0))
    params["score"]["kernel"] = params["score"]["kernel"] * 20.0  # rewards of order 1
    jaxalign.save_pretrained(model, params, tmp_path / "rm")
    hf = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForSequenceClassification"] and hf["num_labels"] == 1
    assert hf["pad_token_id"] == PAD
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32)
    assert type(hf_model).__name__ == "LlamaForSequenceClassification" and hf_model.config.num_labels == 1
    ids, segments = right_padded(np.random.default_rng(1))
    ours, theirs = jaxalign_rewards(model, params, ids, segments), transformers_rewards(hf_model, ids)
    print(f"reward parity: ours {ours}, transformers {theirs}")
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.max(np.abs(theirs)))

    reloaded, reloaded_params = load_model(tmp_path / "rm")
    assert isinstance(reloaded, LlamaForScore)
    jax.tree.map(np.testing.assert_array_equal, params, reloaded_params)


def test_transformers_reward_model_imports_with_its_scores(tmp_path):
    hf_config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         num_labels=1, pad_token_id=PAD)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForSequenceClassification(hf_config).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            param.normal_(0.0, 0.15) if not name.endswith("norm.weight") else param.uniform_(0.5, 1.5)
    hf_model.save_pretrained(tmp_path / "hf_rm")
    model, params = load_model(tmp_path / "hf_rm")
    assert isinstance(model, LlamaForScore) and set(params) == {"model", "score"}
    ids, segments = right_padded(np.random.default_rng(2))
    np.testing.assert_allclose(jaxalign_rewards(model, params, ids, segments), transformers_rewards(hf_model, ids),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(JaxalignError, match="is not a causal LM|holds a score model"):
        load_model(tmp_path / "hf_rm", head="causal_lm")


def test_a_classifier_with_several_labels_is_refused(tmp_path):
    hf_config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    transformers.LlamaForSequenceClassification(hf_config).save_pretrained(tmp_path / "classifier")
    with pytest.raises(JaxalignError, match=r"classifier/config.json: a sequence classifier with 3 labels"):
        load_model(tmp_path / "classifier")
