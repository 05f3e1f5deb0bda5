"""Model loading: Hugging Face folders, jaxalign checkpoints and scratch configs, with a causal-LM or score head."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import hf
from jaxalign.config import MeshConfig, ModelSection, from_dict
from jaxalign.data.config import DataConfig, prepare_tokenizer
from jaxalign.data.tokenizer import byte_tokenizer
from jaxalign.errors import JaxalignError
from jaxalign.models.checkpoint import CONFIG_FILE, load_model_checkpoint, save_model_checkpoint
from jaxalign.models.heads import LlamaForScore
from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM
from jaxalign.models.loading import load_model, model_source
from jaxalign.sharding import logical_rules, make_mesh
from jaxalign.train.state import param_shardings

from tests.params import init_params

IDS = jnp.asarray([[1, 5, 9, 17, 33, 2]], jnp.int32)


def init(model, seed=0):
    return init_params(model, jax.random.PRNGKey(seed), IDS)


def assert_same(tree_a, tree_b):
    assert jax.tree_util.tree_structure(tree_a) == jax.tree_util.tree_structure(tree_b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, tree_a, tree_b)


@pytest.fixture(scope="module")
def causal_lm():
    model = LlamaForCausalLM(LlamaConfig.tiny())
    return model, init(model)


@pytest.fixture(scope="module")
def lm_checkpoint(causal_lm, tmp_path_factory):
    model, params = causal_lm
    return save_model_checkpoint(tmp_path_factory.mktemp("lm") / "ckpt", model.config, params)


@pytest.fixture(scope="module")
def lm_hf_folder(causal_lm, tmp_path_factory):
    model, params = causal_lm
    return hf.save_pretrained(model, params, tmp_path_factory.mktemp("lm_hf") / "hf")


def test_a_score_checkpoint_reloads_as_a_score_model_with_the_same_scores(tmp_path):
    model = LlamaForScore(LlamaConfig.tiny(param_dtype="bfloat16"))
    params = init(model)
    save_model_checkpoint(tmp_path / "rm", model.config, params, head="score")
    assert json.loads((tmp_path / "rm" / CONFIG_FILE).read_text())["head"] == "score"

    loaded, restored = load_model(tmp_path / "rm")
    assert isinstance(loaded, LlamaForScore) and loaded.config == model.config
    assert_same(params, restored)
    np.testing.assert_array_equal(loaded.apply({"params": restored}, IDS), model.apply({"params": params}, IDS))
    assert isinstance(load_model_checkpoint(tmp_path / "rm")[0], LlamaForScore)


@pytest.mark.parametrize("source", ["lm_checkpoint", "lm_hf_folder"])
def test_scan_layers_false_loads_a_module_per_layer_with_the_same_weights_and_logits(source, causal_lm, request):
    model, params = causal_lm
    loaded, per_layer = load_model(request.getfixturevalue(source), scan_layers=False)
    assert not loaded.config.scan_layers
    assert "layers" not in per_layer["model"]
    for i in range(model.config.num_layers):
        assert_same(jax.tree.map(lambda leaf: leaf[i], params["model"]["layers"]), per_layer["model"][f"layers_{i}"])
    np.testing.assert_allclose(loaded.apply({"params": per_layer}, IDS), model.apply({"params": params}, IDS),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["lm_checkpoint", "lm_hf_folder"])
def test_a_causal_lm_loaded_with_a_score_head_keeps_its_trunk(source, causal_lm, request, monkeypatch):
    path = request.getfixturevalue(source)
    read = []
    reader_read = hf._TensorReader.read
    monkeypatch.setattr(hf._TensorReader, "read", lambda self, name: read.append(name) or reader_read(self, name))

    model, params = load_model(path, head="score")
    assert isinstance(model, LlamaForScore) and set(params) == {"model", "score"}
    assert_same(causal_lm[1]["model"], params["model"])
    assert set(params["score"]) == {"kernel"} and params["score"]["kernel"].shape == (model.config.hidden_size,)
    assert model.apply({"params": params}, IDS).shape == IDS.shape
    assert "lm_head.weight" not in read
    assert_same(params["score"], load_model(path, head="score")[1]["score"])
    assert not np.array_equal(params["score"]["kernel"], load_model(path, head="score", seed=1)[1]["score"]["kernel"])


def test_a_grown_score_model_from_a_causal_lm_is_placed_on_the_mesh(lm_checkpoint, causal_lm):
    mesh_config = MeshConfig(fsdp=8)
    tokenizer = byte_tokenizer()
    source = model_source(ModelSection(path=str(lm_checkpoint)), tokenizer, head="score", mesh=mesh_config, seed=3)
    assert source.config.vocab_size == len(tokenizer) == 264 and source.config.pad_token_id == tokenizer.pad_token_id
    model = source.module()
    assert isinstance(model, LlamaForScore)

    mesh = make_mesh(mesh_config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), IDS)["params"])
    shardings = param_shardings(boxed, mesh, logical_rules(mesh_config))
    params = source.load(shardings)
    embedding = params["model"]["embed_tokens"]["embedding"]
    assert embedding.sharding == shardings["model"]["embed_tokens"]["embedding"]
    old = causal_lm[1]["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(embedding[:256], old)
    np.testing.assert_allclose(embedding[256:], np.broadcast_to(old.mean(axis=0), (8, old.shape[1])), atol=1e-8)
    assert params["score"]["kernel"].sharding == shardings["score"]["kernel"]


@pytest.mark.parametrize("stored_rows", [272, 265])
def test_added_tokens_of_a_table_padded_past_its_tokenizer_get_the_mean_of_the_real_rows(stored_rows, tmp_path):
    """A Hugging Face model whose embedding table has zero padding rows past the byte tokenizer's 264 tokens (as
    Qwen2 ships 151,936 rows for 151,665 tokens), fine-tuned with an added token and an added pad token: their rows
    (264, 265) are the mean of the 264 real rows, in the input embedding and the LM head, whether they fall on
    padding rows (272) or partly past the table (265); the remaining padding rows are left as they are."""
    model = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=stored_rows))
    params = init(model)
    params["model"]["embed_tokens"]["embedding"] = params["model"]["embed_tokens"]["embedding"].at[264:].set(0.0)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, 264:].set(0.0)
    folder = hf.save_pretrained(model, params, tmp_path / "hf")
    tokenizer = byte_tokenizer()
    added = prepare_tokenizer(from_dict(DataConfig, {"added_tokens": ["<tool>"], "pad_token": "<|pad|>"}), tokenizer)
    assert tokenizer.convert_tokens_to_ids(added) == [264, 265]

    source = model_source(ModelSection(path=str(folder)), tokenizer, new_tokens=added)
    rows = max(stored_rows, 266)
    assert (source.config.vocab_size, source.config.pad_token_id) == (rows, 265)
    mesh_config = MeshConfig()
    boxed = jax.eval_shape(lambda: source.module().init(jax.random.PRNGKey(0), IDS)["params"])
    loaded = source.load(param_shardings(boxed, make_mesh(mesh_config), logical_rules(mesh_config)))

    embedding = np.asarray(loaded["model"]["embed_tokens"]["embedding"])
    kernel = np.asarray(loaded["lm_head"]["kernel"])
    assert embedding.shape[0] == kernel.shape[1] == rows
    old_embedding = np.asarray(params["model"]["embed_tokens"]["embedding"])
    old_kernel = np.asarray(params["lm_head"]["kernel"])
    np.testing.assert_array_equal(embedding[:264], old_embedding[:264])
    np.testing.assert_array_equal(kernel[:, :264], old_kernel[:, :264])
    for token_id in (264, 265):
        np.testing.assert_allclose(embedding[token_id], old_embedding[:264].mean(axis=0), atol=1e-7)
        np.testing.assert_allclose(kernel[:, token_id], old_kernel[:, :264].mean(axis=1), atol=1e-7)
    assert embedding[264].any() and kernel[:, 265].any()
    np.testing.assert_array_equal(embedding[266:], 0.0)
    np.testing.assert_array_equal(kernel[:, 266:], 0.0)


def test_a_checkpoint_written_without_a_head_loads_as_a_causal_lm(causal_lm, tmp_path):
    old = tmp_path / "old"
    save_model_checkpoint(old, causal_lm[0].config, causal_lm[1])
    meta = json.loads((old / CONFIG_FILE).read_text())
    del meta["head"]
    (old / CONFIG_FILE).write_text(json.dumps(meta))
    model, params = load_model(old)
    assert isinstance(model, LlamaForCausalLM)
    assert_same(causal_lm[1], params)


def test_a_scratch_config_takes_the_tokenizer_vocabulary():
    tokenizer = byte_tokenizer()
    source = model_source(ModelSection(config={"preset": "tiny", "hidden_size": 32}), tokenizer, head="score")
    assert source.load is None and isinstance(source.module(), LlamaForScore)
    config = source.config
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (264, 32, 2)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    with pytest.raises(JaxalignError, match="'model.config.vocab_size': 100 is smaller than the tokenizer's 264"):
        model_source(ModelSection(config={"preset": "tiny", "vocab_size": 100}), tokenizer)


def test_paths_that_hold_no_model_and_score_models_asked_for_as_causal_lms_are_errors(tmp_path):
    with pytest.raises(JaxalignError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(JaxalignError, match="neither a Hugging Face model folder"):
        load_model(tmp_path)
    with pytest.raises(JaxalignError, match="'model.path': .* is neither a Hugging Face folder"):
        model_source(ModelSection(path=str(tmp_path)))

    model = LlamaForScore(LlamaConfig.tiny())
    save_model_checkpoint(tmp_path / "rm", model.config, init(model), head="score")
    with pytest.raises(JaxalignError, match="holds a score model"):
        load_model(tmp_path / "rm", head="causal_lm")
    with pytest.raises(JaxalignError, match="head 'reward': expected one of causal_lm, score"):
        load_model(tmp_path / "rm", head="reward")
    with pytest.raises(JaxalignError, match="config key 'model.path': .* holds a score model"):
        model_source(ModelSection(path=str(tmp_path / "rm")))
    with pytest.raises(JaxalignError, match="'model.config.hidden_size': cannot change a pretrained model"):
        model_source(ModelSection(path=str(tmp_path / "rm"), config={"hidden_size": 8}), head="score")
