"""Hugging Face import/export: logit parity against transformers per architecture feature, round trips, errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign
from jaxalign.data.templates import TEMPLATES
from jaxalign.errors import JaxalignError
from jaxalign.hf import config_from_hf, config_to_hf, load_tokenizer
from jaxalign.models.llama import LlamaConfig, init_cache

from tests.params import init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

# name -> (transformers config class, overrides of TINY, sequence length)
VARIANTS = {
    "gqa": ("LlamaConfig", {}, 24),
    "mha": ("LlamaConfig", {"num_key_value_heads": 4}, 24),
    "mqa": ("LlamaConfig", {"num_key_value_heads": 1}, 24),
    "qkv_bias_qwen2": ("Qwen2Config", {}, 24),
    "tied_embeddings": ("LlamaConfig", {"tie_word_embeddings": True}, 24),
    "llama3_rope": (
        "LlamaConfig",
        {
            "max_position_embeddings": 256,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
        24,
    ),
    "linear_rope": (
        "LlamaConfig",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
        24,
    ),
    "dynamic_rope_beyond_max_positions": (
        "LlamaConfig",
        {
            "max_position_embeddings": 16,
            "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        },
        40,
    ),
    "sliding_window_mistral": ("MistralConfig", {"sliding_window": 6}, 24),
    "sliding_window_qwen2": (
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0},
        24,
    ),
    "separate_head_dim": ("LlamaConfig", {"head_dim": 24}, 24),
}


def build_hf_model(folder, class_name, overrides, seed=0):
    """A random tiny transformers model saved as a normal HF folder (float32); weights scaled up so logits are O(1)."""
    config = getattr(transformers, class_name)(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.15)
            else:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return model


def relative_diff(reference, ours):
    return float(np.max(np.abs(reference - ours)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_variants")
    models = {}
    for name, (class_name, overrides, _) in VARIANTS.items():
        models[name] = (root / name, build_hf_model(root / name, class_name, overrides))
    return models


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, variant_dirs):
    folder, hf_model = variant_dirs[variant]
    length = VARIANTS[variant][2]
    ids = np.random.default_rng(1).integers(0, TINY["vocab_size"], size=(2, length))
    with torch.no_grad():
        reference = hf_model(torch.tensor(ids)).logits.float().numpy()
    model, params = jaxalign.load_pretrained(folder)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    diff = relative_diff(reference, ours)
    print(f"parity {variant}: max|diff|={np.max(np.abs(reference - ours)):.3e} "
          f"max|logit|={np.max(np.abs(reference)):.3f} ratio={diff:.3e}")
    assert ours.shape == reference.shape
    assert diff <= 1e-4


def test_config_maps_both_rope_styles():
    new_style = {**TINY, "model_type": "llama", "num_hidden_layers": 2,
                 "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}}
    old_style = {**TINY, "model_type": "llama", "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    for hf in (new_style, old_style):
        config = config_from_hf(hf)
        assert config.rope_theta == 5e5 and config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config_from_hf({**TINY, "model_type": "llama"}).rope_scaling is None
    back = config_to_hf(config_from_hf(new_style))
    assert back["rope_parameters"] == new_style["rope_parameters"]
    assert back["rope_theta"] == 5e5 and back["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert config_from_hf(back) == config_from_hf(new_style)


@pytest.mark.parametrize("variant", ["gqa", "tied_embeddings", "qkv_bias_qwen2", "sliding_window_mistral"])
def test_export_reloads_in_transformers_bit_identical(variant, variant_dirs, tmp_path):
    folder, hf_model = variant_dirs[variant]
    model, params = jaxalign.load_pretrained(folder, scan_layers=variant != "gqa")
    jaxalign.save_pretrained(model, params, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(reloaded) is type(hf_model)
    original = hf_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert set(reloaded.state_dict()) == set(original)
    def head_dim(config):
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    assert head_dim(reloaded.config) == head_dim(hf_model.config)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rope_parameters", "rms_norm_eps", "tie_word_embeddings",
            "sliding_window", "max_position_embeddings", "layer_types")
    for key in keys:
        assert getattr(reloaded.config, key, None) == getattr(hf_model.config, key, None), key
    reexported, params_again = jaxalign.load_pretrained(tmp_path / "out", scan_layers=variant != "gqa")
    assert reexported.config == model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_again)


def test_import_export_round_trip_is_byte_identical_with_sharded_index(variant_dirs, tmp_path):
    from safetensors.numpy import load_file

    folder, _ = variant_dirs["gqa"]
    model, params = jaxalign.load_pretrained(folder)
    jaxalign.save_pretrained(model, params, tmp_path / "a")
    jaxalign.save_pretrained(model, params, tmp_path / "b", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model_b, params_b = jaxalign.load_pretrained(tmp_path / "b")
    jaxalign.save_pretrained(model_b, params_b, tmp_path / "c")
    original = load_file(folder / "model.safetensors")
    again = load_file(tmp_path / "c" / "model.safetensors")
    assert set(original) == set(again)
    for name in original:
        assert original[name].tobytes() == again[name].tobytes(), name
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "c" / "model.safetensors").read_bytes()


def test_bfloat16_checkpoint_keeps_its_dtype_and_loads_onto_shardings(variant_dirs, tmp_path):
    folder, hf_model = variant_dirs["gqa"]
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    hf_model.to(torch.float32)
    mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",))
    model, _ = jaxalign.load_pretrained(tmp_path / "bf16")
    from jaxalign.models.llama import logical_axes

    specs = logical_axes(model)
    shardings = jax.tree_util.tree_map(
        lambda spec: jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(*[("fsdp" if axis == "embed" else None) for axis in spec])
        ),
        specs,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    model, params = jaxalign.load_pretrained(tmp_path / "bf16", shardings=shardings)
    assert model.config.param_dtype == "bfloat16" and model.config.dtype == "float32"
    embedding = params["model"]["embed_tokens"]["embedding"]
    assert embedding.dtype == jnp.bfloat16 and embedding.sharding == shardings["model"]["embed_tokens"]["embedding"]
    jaxalign.save_pretrained(model, params, tmp_path / "bf16_out")
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size == (
        tmp_path / "bf16_out" / "model.safetensors"
    ).stat().st_size


def test_smollm2_real_weights_match_transformers(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    model, params = jaxalign.load_pretrained(smollm2_dir)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little"]
    apply = jax.jit(model.apply)
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="np")["input_ids"]
        with torch.no_grad():
            reference = hf_model(torch.tensor(ids)).logits.float().numpy()
        ours = np.asarray(apply({"params": params}, jnp.asarray(ids, jnp.int32)))
        diff = relative_diff(reference, ours)
        print(f"smollm2 {prompt!r}: max|diff|={np.max(np.abs(reference - ours)):.3e} "
              f"max|logit|={np.max(np.abs(reference)):.3f} ratio={diff:.3e}")
        assert diff <= 1e-4
        np.testing.assert_array_equal(ours.argmax(-1), reference.argmax(-1))

    ids = tokenizer(prompts[0], return_tensors="np")["input_ids"]
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].numpy()
    cache = init_cache(model.config, batch_size=1, max_length=ids.shape[1] + 6)
    logits, cache = apply({"params": params}, jnp.asarray(ids, jnp.int32), cache=cache)
    generated = []
    for _ in range(6):
        generated.append(int(jnp.argmax(logits[0, -1])))
        logits, cache = apply({"params": params}, jnp.asarray([[generated[-1]]], jnp.int32), cache=cache)
    print(f"smollm2 greedy: {tokenizer.decode(generated)!r}")
    assert generated == expected.tolist()


def test_bad_inputs_name_the_file_or_tensor(variant_dirs, tmp_path):
    folder, _ = variant_dirs["gqa"]
    with pytest.raises(JaxalignError, match="config.json: missing"):
        jaxalign.load_pretrained(tmp_path)

    def copy(name):
        target = tmp_path / name
        shutil.copytree(folder, target)
        return target

    gpt2 = copy("gpt2")
    (gpt2 / "config.json").write_text(json.dumps({**TINY, "model_type": "gpt2"}))
    with pytest.raises(JaxalignError, match="'gpt2' is not supported; supported model types: llama, mistral, qwen2"):
        jaxalign.load_pretrained(gpt2)

    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    missing = copy("missing")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"},
              missing / "model.safetensors")
    with pytest.raises(JaxalignError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        jaxalign.load_pretrained(missing)

    wrong = copy("wrong_shape")
    save_file({**tensors, "model.norm.weight": np.ones(63, np.float32)}, wrong / "model.safetensors")
    shape_error = r"model.safetensors: tensor 'model.norm.weight' has shape \[63\], expected \[64\]"
    with pytest.raises(JaxalignError, match=shape_error):
        jaxalign.load_pretrained(wrong)

    pickled = copy("pickled")
    (pickled / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, pickled / "pytorch_model.bin")
    with pytest.raises(JaxalignError, match="pytorch_model.bin.*allow_pickle=True"):
        jaxalign.load_pretrained(pickled)
    model, params = jaxalign.load_pretrained(pickled, allow_pickle=True)
    np.testing.assert_array_equal(params["model"]["norm"]["scale"], tensors["model.norm.weight"])


def test_llama_config_tiny_round_trips_through_hf_config():
    config = LlamaConfig.tiny(head_dim=8, eos_token_id=(2, 3))
    assert config_from_hf(config_to_hf(config)) == config


def test_save_pretrained_writes_the_tokenizer(variant_dirs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    model, params = jaxalign.load_pretrained(variant_dirs["tied_embeddings"][0])
    jaxalign.save_pretrained(model, params, tmp_path / "out", tokenizer=tokenizer)
    assert load_tokenizer(tmp_path / "out")("hello world there")["input_ids"] == [1, 2, 0]
    with pytest.raises(JaxalignError, match="no tokenizer files"):
        load_tokenizer(variant_dirs["tied_embeddings"][0])


@pytest.fixture(scope="module")
def byte_model():
    from jaxalign.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=264, hidden_size=32, intermediate_size=32))
    params = init_params(model, jax.random.PRNGKey(0))
    return model, params


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "20."},
]


@pytest.mark.parametrize("template", TEMPLATES)
def test_export_carries_the_training_format(byte_model, template, tmp_path):
    """The exported tokenizer's chat template gives, through transformers, the ids jaxalign trained on and prompts
    with; the template's end-of-turn token is an eos id of config.json and generation_config.json."""
    from jaxalign.data import DataConfig, prepare_tokenizer
    from jaxalign.data.formats import Conversation, Message, Prompt
    from jaxalign.data.masking import tokenize_segments
    from jaxalign.data.templates import chat_format, render, special_tokens
    from jaxalign.data.tokenizer import BYTE_CHAT_TEMPLATE, SegmentEncoder, byte_tokenizer

    tokenizer = byte_tokenizer()
    data = DataConfig(template=template, system_message="Answer in words." if template == "orca" else None)
    prepare_tokenizer(data, tokenizer)
    model, params = byte_model
    jaxalign.save_pretrained(model, params, tmp_path / "out", tokenizer=tokenizer,
                             chat_format=chat_format(data, tokenizer))
    exported = load_tokenizer(tmp_path / "out")

    tokens = special_tokens(tokenizer, data.add_bos, data.eot_token)
    messages = tuple(Message(m["role"], m["content"]) for m in CHAT)
    encoder = SegmentEncoder(tokenizer)
    for example, chat, prompt in ((Conversation(messages, "t"), CHAT, False), (Prompt(messages[:-1], None, "t"),
                                                                             CHAT[:-1], True)):
        segments = render(example, template, tokens, data.system_message, tokenizer)
        ids = tokenize_segments([segments], encoder)[0].ids.tolist()
        assert exported.apply_chat_template(chat, add_generation_prompt=prompt, return_dict=False) == ids

    end = {"chatml": "<|im_end|>", "lima": "<|eot|>", "tokenizer": "<|im_end|>"}.get(template, "</s>")
    end_id = tokenizer.convert_tokens_to_ids(end)
    for name in ("config.json", "generation_config.json"):
        eos = json.loads((tmp_path / "out" / name).read_text())["eos_token_id"]
        assert end_id in ([eos] if isinstance(eos, int) else eos) and 2 in ([eos] if isinstance(eos, int) else eos)
    assert tokenizer.chat_template == BYTE_CHAT_TEMPLATE
    assert (exported.chat_template == BYTE_CHAT_TEMPLATE) == (template == "tokenizer")
