"""jaxalign model checkpoints: save / load round trip, sharded restore, bad folders."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.errors import JaxalignError
from jaxalign.models.checkpoint import CONFIG_FILE, is_model_checkpoint, load_model_checkpoint, save_model_checkpoint
from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM, logical_axes

from tests.params import init_params


def test_round_trip_restores_config_and_params_onto_shardings(tmp_path):
    config = LlamaConfig.tiny(rope_scaling={"rope_type": "linear", "factor": 2.0}, eos_token_id=(2, 3),
                              residual_dropout=(0.0, 0.2), param_dtype="bfloat16")
    model = LlamaForCausalLM(config)
    params = init_params(model, jax.random.PRNGKey(0))
    save_model_checkpoint(tmp_path / "ckpt", config, params)
    assert is_model_checkpoint(tmp_path / "ckpt") and not (tmp_path / "ckpt" / "config.json").exists()

    mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",))
    shardings = jax.tree_util.tree_map(
        lambda spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            *[("fsdp" if axis == "mlp" else None) for axis in spec])),
        logical_axes(model), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    loaded, restored = load_model_checkpoint(tmp_path / "ckpt", shardings=shardings)
    assert loaded.config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, restored)
    kernel = restored["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16 and kernel.sharding == shardings["model"]["layers"]["mlp"]["up_proj"]["kernel"]

    as_f32, params_f32 = load_model_checkpoint(tmp_path / "ckpt", dtype="float32")
    assert as_f32.config.param_dtype == "float32" and params_f32["lm_head"]["kernel"].dtype == jnp.float32


def test_bad_checkpoint_folders_are_reported(tmp_path):
    with pytest.raises(JaxalignError, match=f"{CONFIG_FILE}: missing"):
        load_model_checkpoint(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "jaxalign-model", "config": {"hidden_size": "big"}}))
    with pytest.raises(JaxalignError, match="hidden_size"):
        load_model_checkpoint(tmp_path)


def test_the_recorded_head_must_match_the_params(tmp_path):
    config = LlamaConfig.tiny()
    params = init_params(LlamaForCausalLM(config), jax.random.PRNGKey(0))
    with pytest.raises(JaxalignError, match="head 'score': the params lack a 'score' head"):
        save_model_checkpoint(tmp_path / "rm", config, params, head="score")
    save_model_checkpoint(tmp_path / "lm", config, params)
    meta = json.loads((tmp_path / "lm" / CONFIG_FILE).read_text())
    (tmp_path / "lm" / CONFIG_FILE).write_text(json.dumps({**meta, "head": "value"}))
    with pytest.raises(JaxalignError, match="'head' should be one of causal_lm, score, got 'value'"):
        load_model_checkpoint(tmp_path / "lm")
