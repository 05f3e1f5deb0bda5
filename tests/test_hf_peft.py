"""PEFT adapter folders: jaxalign's adapters give PEFT's logits in transformers, PEFT's adapters give PEFT's logits in
jaxalign, round trips, the merged export against `merge_and_unload`, and the errors of `read_peft_adapter`."""

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign
from jaxalign.config import LORA_PROJECTIONS, LoraConfig
from jaxalign.errors import JaxalignError
from jaxalign.hf import read_peft_adapter, save_peft_adapter
from jaxalign.models import lora
from jaxalign.models.llama import LlamaForCausalLM

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

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
IDS = np.random.default_rng(1).integers(0, TINY["vocab_size"], size=(2, 16))
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random tiny transformers Llama (float32) saved as a Hugging Face folder; weights scaled so logits are O(1)."""
    folder = tmp_path_factory.mktemp("peft") / "base"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.15)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def jax_adapter_dir(base_dir, tmp_path_factory):
    """An all-linear adapter with random A and B saved by `save_peft_adapter`: (folder, adapted config, params)."""
    base_config, params = load_base(base_dir, scan_layers=True)
    config = lora.apply_to(base_config, LoraConfig(rank=4, alpha=8, targets=("all-linear",)))
    params = lora.merge(params, random_adapters(config, seed=0))
    folder = save_peft_adapter(config, params, tmp_path_factory.mktemp("peft") / "adapter", "tiny-base")
    return folder, config, params


def load_base(folder, scan_layers):
    model, params = jaxalign.load_pretrained(folder, scan_layers=scan_layers)
    return model.config, params


def torch_base(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def jax_logits(config, params):
    return np.asarray(LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(IDS, jnp.int32)))


def relative_diff(reference, ours):
    return float(np.max(np.abs(reference - ours)) / np.max(np.abs(reference)))


def random_adapters(config, seed, dtype=np.float32):
    """The adapters of the adapted `config` with random non-zero A and B (both N(0, 0.1))."""
    model = LlamaForCausalLM(config)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape).astype(dtype)), lora.split(shapes)[1])


def randomise_peft(model, seed):
    """Random non-zero values in every lora_A / lora_B of a PEFT model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("targets, scan_layers, whole_tree", [
    (("all-linear",), True, True),
    (("all-linear",), False, False),
    (("q_proj", "v_proj"), True, False),
    (("o_proj", "down_proj"), False, True),
])
def test_saved_adapter_gives_peft_the_same_logits(base_dir, tmp_path, targets, scan_layers, whole_tree):
    base_config, base_params = load_base(base_dir, scan_layers)
    config = lora.apply_to(base_config, LoraConfig(rank=4, alpha=8, targets=targets))
    adapters = random_adapters(config, seed=1)
    params = lora.merge(base_params, adapters)
    save_peft_adapter(config, params if whole_tree else adapters, tmp_path / "adapter")

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM"
    assert (saved["r"], saved["lora_alpha"], saved["target_modules"]) == (4, 8, list(config.lora_targets))
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 2 * len(config.lora_targets) * TINY["num_hidden_layers"]
    if "q_proj" in config.lora_targets:
        assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
        assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (64, 4)

    peft_model = peft.PeftModel.from_pretrained(torch_base(base_dir), tmp_path / "adapter").eval()
    reference = torch_logits(peft_model)
    ours = jax_logits(config, params)
    diff = relative_diff(reference, ours)
    effect = relative_diff(reference, jax_logits(base_config, base_params))
    print(f"jaxalign -> PEFT {targets} scan={scan_layers}: max|diff|={np.max(np.abs(reference - ours)):.3e} "
          f"ratio={diff:.3e} (adapters change logits by {effect:.3f})")
    assert effect > 1e-2  # the adapters matter, so the parity says something about them
    assert diff <= TOLERANCE


@pytest.mark.parametrize("scan_layers", [True, False])
def test_read_gives_back_the_saved_adapters(base_dir, jax_adapter_dir, scan_layers):
    folder, config, params = jax_adapter_dir
    base_config, _ = load_base(base_dir, scan_layers)
    settings, adapters = read_peft_adapter(folder, base_config)
    assert settings == LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=LORA_PROJECTIONS)
    assert lora.apply_to(base_config, settings).lora_targets == config.lora_targets
    original = lora.split(params)[1]
    if scan_layers:
        jax.tree.map(np.testing.assert_array_equal, adapters, original)
    else:
        layers = original["model"]["layers"]
        for i in range(TINY["num_hidden_layers"]):
            jax.tree.map(lambda ours, stacked, i=i: np.testing.assert_array_equal(ours, stacked[i]),
                         adapters["model"][f"layers_{i}"], layers)


def test_read_places_adapters_on_shardings_and_keeps_a_bfloat16_file(base_dir, tmp_path):
    base_config, _ = load_base(base_dir, scan_layers=True)
    config = lora.apply_to(base_config, LoraConfig(rank=4, alpha=8, targets=("q_proj", "o_proj")))
    adapters = random_adapters(config, seed=2, dtype=jnp.bfloat16)
    save_peft_adapter(config, adapters, tmp_path / "adapter")
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}

    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    shardings = jax.tree.map(
        lambda a: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*([None] * (a.ndim - 1)), "x")),
        adapters)
    settings, read = read_peft_adapter(tmp_path / "adapter", base_config, shardings)
    assert settings.targets == ("q_proj", "o_proj")
    for leaf, sharding, original in zip(jax.tree.leaves(read), jax.tree.leaves(shardings), jax.tree.leaves(adapters)):
        assert leaf.sharding == sharding and leaf.dtype == jnp.float32  # the base config's param dtype
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(original.astype(jnp.float32)))


@pytest.mark.parametrize("target_modules, scan_layers", [
    (["q_proj", "k_proj", "down_proj"], True),
    ("all-linear", False),  # PEFT saves this as the list of every layer's full module names
    (r".*\.(v_proj|up_proj)", True),
])
def test_adapter_made_by_peft_gives_jaxalign_the_same_logits(base_dir, tmp_path, target_modules, scan_layers):
    peft_model = peft.get_peft_model(torch_base(base_dir), peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.05, target_modules=target_modules, task_type="CAUSAL_LM"))
    randomise_peft(peft_model, seed=3)
    peft_model.eval()
    reference = torch_logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")

    base_config, base_params = load_base(base_dir, scan_layers)
    settings, adapters = read_peft_adapter(tmp_path / "adapter", base_config)
    assert (settings.rank, settings.alpha, settings.dropout) == (4, 16.0, 0.05)
    config = lora.apply_to(base_config, settings)
    ours = jax_logits(config, lora.merge(base_params, adapters))
    diff = relative_diff(reference, ours)
    print(f"PEFT -> jaxalign {target_modules} scan={scan_layers} targets={settings.targets}: "
          f"max|diff|={np.max(np.abs(reference - ours)):.3e} ratio={diff:.3e}")
    assert diff <= TOLERANCE


def test_merged_export_equals_peft_merge_and_unload(base_dir, jax_adapter_dir, tmp_path):
    folder, config, params = jax_adapter_dir
    merged = lora.merged_params(params, config)
    jaxalign.save_pretrained(LlamaForCausalLM(lora.apply_to(config, None)), merged, tmp_path / "merged")
    ours = torch_logits(torch_base(tmp_path / "merged"))
    reference = torch_logits(peft.PeftModel.from_pretrained(torch_base(base_dir), folder).merge_and_unload().eval())
    diff = relative_diff(reference, ours)
    print(f"merged export vs merge_and_unload: max|diff|={np.max(np.abs(reference - ours)):.3e} ratio={diff:.3e}")
    assert diff <= TOLERANCE


# ---------------------------------------------------------------------------------------------- errors


def edit_config(**changes):
    def edit(folder):
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def edit_tensors(edit_dict):
    def edit(folder):
        from safetensors.numpy import load_file, save_file

        path = folder / "adapter_model.safetensors"
        tensors = load_file(path)
        edit_dict(tensors)
        save_file(tensors, path)

    return edit


Q_A = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
ERRORS = {
    "missing_config": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json", "missing"),
    "missing_weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors", "missing"),
    "not_lora": (edit_config(peft_type="LOHA"), "adapter_config.json", "peft_type 'LOHA' is not supported"),
    "rslora": (edit_config(use_rslora=True), "adapter_config.json", "use_rslora=true .* is not supported"),
    "dora": (edit_config(use_dora=True), "adapter_config.json", "use_dora=true .*DoRA.* is not supported"),
    "bias": (edit_config(bias="lora_only"), "adapter_config.json", 'bias="lora_only" .* is not supported'),
    "modules_to_save": (edit_config(modules_to_save=["lm_head"]), "adapter_config.json",
                        r'modules_to_save=\["lm_head"\] .* is not supported'),
    "unknown_target": (edit_config(target_modules=["q_proj", "embed_tokens"]), "adapter_config.json",
                       "target module 'embed_tokens' is not supported"),
    "lm_head_target": (edit_config(target_modules=["q_proj", "lm_head"]), "adapter_config.json",
                       "target module 'lm_head' is not supported"),
    "some_layers": (edit_config(target_modules=["model.layers.0.self_attn.q_proj"]), "adapter_config.json",
                    "different projections on different layers"),
    "wrong_shape": (edit_tensors(lambda t: t.update({Q_A: t[Q_A][:, :32].copy()})), "adapter_model.safetensors",
                    rf"tensor '{Q_A}' has shape \[4, 32\], expected \[4, 64\]"),
    "missing_tensor": (edit_tensors(lambda t: t.pop(Q_A)), "adapter_model.safetensors",
                       f"missing tensor '{Q_A}'"),
    "unexpected_tensor": (
        edit_tensors(lambda t: t.update({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)})),
        "adapter_model.safetensors", "unexpected tensor.*base_model.model.lm_head.lora_A.weight"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_read_errors_name_the_file_and_key(base_dir, jax_adapter_dir, tmp_path, case):
    edit, filename, message = ERRORS[case]
    folder = shutil.copytree(jax_adapter_dir[0], tmp_path / "adapter")
    edit(folder)
    base_config, _ = load_base(base_dir, scan_layers=True)
    with pytest.raises(JaxalignError, match=message) as error:
        read_peft_adapter(folder, base_config)
    assert str(folder / filename) in str(error.value)


def test_save_needs_an_adapted_config(base_dir, tmp_path):
    base_config, params = load_base(base_dir, scan_layers=True)
    with pytest.raises(JaxalignError, match="has no adapters"):
        save_peft_adapter(base_config, params, tmp_path / "adapter")
