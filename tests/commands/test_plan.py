"""`jaxalign plan`: exact parameter and optimiser bytes, a train-step total close to XLA's own memory analysis, and
pods planned from a config.json alone."""

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from jaxalign import sharding as shd
from jaxalign.cli import main
from jaxalign.commands.plan import build_plan
from jaxalign.config import apply_overrides, from_dict, load_yaml
from jaxalign.train import state as st
from jaxalign.train.algorithm import Trainable
from jaxalign.train.loop import fresh_state
from jaxalign.train.loop import plan as layout_plan
from jaxalign.train.step import train_step

REPO = Path(__file__).resolve().parents[2]
TINY_SFT = REPO / "configs" / "tiny" / "sft.yaml"
TINY_PPO = REPO / "configs" / "tiny" / "ppo.yaml"
TINY_MODEL = "model.config={preset: tiny, hidden_size: 128, intermediate_size: 384, max_position_embeddings: 320}"
LM_BATCH = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
EXPERIENCE = ("old_logp", "ref_logp", "old_values", "advantages", "returns")


def hf_config(folder: Path, architecture: str, **shape) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    values = {"architectures": [architecture], "model_type": "llama", "rms_norm_eps": 1e-5, "pad_token_id": 0,
              "max_position_embeddings": 320, **shape}
    (folder / "config.json").write_text(json.dumps(values))
    return folder


def term(plan, name):
    return next(t.bytes for t in plan.terms if t.name == name)


def xla_step_bytes(config, trainables, loss) -> int:
    """XLA's memory analysis of the loop's compiled train step on this machine's 8 devices: arguments (params and
    optimiser state, donated) + temporaries + outputs that do not reuse an argument."""
    layout = layout_plan(config, trainables, {})
    rows = config.train.batch_size // config.train.grad_accum
    sharding = shd.batch_sharding(layout.mesh, layout.rules, 2)
    batch = {key: jax.ShapeDtypeStruct((rows, config.train.seq_len), jnp.float32 if key in EXPERIENCE else jnp.int32,
                                       sharding=sharding)
             for key in (LM_BATCH + EXPERIENCE if len(trainables) > 1 else LM_BATCH)}

    def step(state, batch):
        return train_step(state, {}, batch, loss=loss, txs=layout.txs, schedules=layout.schedules,
                          grad_accum=config.train.grad_accum, batch_spec=shd.spec_for(("batch",), layout.rules))

    with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), layout.abstract,
                             layout.shardings)
        memory = jax.jit(step, donate_argnums=0).lower(state, batch).compile().memory_analysis()
    return (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes)


def test_sft_plan_holds_the_real_shards_and_is_within_20_percent_of_xla():
    from jaxalign.commands.sft import SFTConfig
    from jaxalign.models.loading import model_source
    from jaxalign.objectives.sft import make_loss_fn

    data = load_yaml(TINY_SFT)
    plan = build_plan("sft", data, str(TINY_SFT))
    config = from_dict(SFTConfig, data)
    model = model_source(config.model).module()
    trainables = {"model": Trainable(model, config.optimizer)}
    layout = layout_plan(config, trainables, {})
    with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        state = fresh_state(layout, trainables, seed=0)
    assert term(plan, "model parameters") == st.measured_bytes_per_device(state.params)
    assert term(plan, "model optimizer state") == st.measured_bytes_per_device(state.opt_state)
    loss_fn = make_loss_fn(model)
    xla = xla_step_bytes(config, trainables, lambda params, frozen, batch, rng: loss_fn(params["model"], batch, rng))
    assert 0.8 <= plan.total / xla <= 1.2, (plan.total, xla)


def test_ppo_plan_counts_four_models_and_is_within_20_percent_of_xla(tmp_path):
    from jaxalign.commands.ppo import PPOConfig, critic_source
    from jaxalign.models.loading import model_source
    from jaxalign.objectives.ppo_algorithm import make_loss_fn

    reward = hf_config(tmp_path / "rm", "LlamaForSequenceClassification", num_labels=1, vocab_size=256,
                       hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)
    data = apply_overrides(load_yaml(TINY_PPO), ["model.path=null", TINY_MODEL, f"reward.model={reward}"])
    plan = build_plan("ppo", data, str(TINY_PPO))
    names = {t.name for t in plan.terms}
    assert {"policy parameters", "value parameters", "reference parameters", "reward parameters"} <= names
    assert [t.name for t in plan.sampling][0] == "KV cache"
    config = from_dict(PPOConfig, data)
    policy, value = model_source(config.model).module(), critic_source(config, None, ()).module()
    trainables = {"policy": Trainable(policy, config.optimizer), "value": Trainable(value, config.value_optimizer)}
    frozen = term(plan, "reference parameters") + term(plan, "reward parameters")
    xla = xla_step_bytes(config, trainables, make_loss_fn(policy, value, config.ppo, 1.0)) + frozen
    assert 0.8 <= plan.total / xla <= 1.2, (plan.total, xla)


def test_llama2_7b_on_8_devices_from_a_config_json_alone(tmp_path, capsys):
    folder = hf_config(tmp_path / "Llama-2-7b-hf", "LlamaForCausalLM", vocab_size=32000, hidden_size=4096,
                       intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    start = time.perf_counter()
    code = main(["plan", str(REPO / "configs" / "llama2_chat_sft.yaml"), f"model.path={folder}", "--devices", "8",
                 "--device-memory", "32GiB", "--chip", "v5p"])
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert code == 0 and seconds < 60
    assert "sft on mesh data=1, fsdp=8, tensor=1 (8 devices)" in out
    assert "6,738,415,616 trained" in out
    # f32 weights of 6.74B parameters over 8 devices, and Adam's two moments
    assert f"{4 * 6_738_415_616 / 8 / 2**30:.2f} GiB" in out and f"{8 * 6_738_415_616 / 8 / 2**30:.2f} GiB" in out
    assert "expected step time at 40% MFU of 459 TFLOP/s per chip" in out
    assert "does not fit" in out and "try" in out


def test_a_small_run_fits_and_a_bad_mesh_is_exit_code_2(capsys):
    assert main(["plan", str(TINY_SFT), "--devices", "64", "train.batch_size=64", "--device-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "mesh data=1, fsdp=64, tensor=1 (64 devices)" in out and "fits:" in out
    assert main(["plan", str(TINY_SFT), "mesh.tensor=3", "--devices", "6"]) == 2
    assert "mesh.tensor=3 does not divide" in capsys.readouterr().err
    assert main(["plan", str(TINY_SFT), "--device-memory", "lots"]) == 2
    assert "--device-memory: expected a size such as 16GiB" in capsys.readouterr().err


@pytest.mark.parametrize("config, command", [("sft.yaml", "sft"), ("rm.yaml", "rm"), ("dpo.yaml", "dpo"),
                                             ("ppo.yaml", "ppo"), ("grpo.yaml", "grpo")])
def test_the_command_is_recognised_from_the_sections(config, command):
    from jaxalign.plan import detect_command

    assert detect_command(load_yaml(REPO / "configs" / "tiny" / config)) == command
