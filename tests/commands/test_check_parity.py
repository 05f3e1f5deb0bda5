"""`jaxalign check-parity`: agreement, a detected mismatch, and the message when PyTorch is missing."""

import sys

import pytest

from jaxalign import hf
from jaxalign.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity_model")
    config = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_matching_model_passes(tiny_hf_folder, capsys):
    assert main(["check-parity", str(tiny_hf_folder), "--num-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert "max abs diff:" in out and "mean KL" in out and "OK: within tolerance" in out


def test_mismatch_exits_1(tiny_hf_folder, capsys, monkeypatch):
    load = hf.load_pretrained

    def perturbed(*args, **kwargs):
        model, params = load(*args, **kwargs)
        params["model"]["norm"]["scale"] = params["model"]["norm"]["scale"] * 1.01
        return model, params

    monkeypatch.setattr(hf, "load_pretrained", perturbed)
    assert main(["check-parity", str(tiny_hf_folder), "--num-tokens", "20"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_missing_torch_is_a_clear_error(tiny_hf_folder, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["check-parity", str(tiny_hf_folder)]) == 2
    assert "needs PyTorch" in capsys.readouterr().err
