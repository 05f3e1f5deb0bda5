"""`jaxalign memory`: per-device prediction for a config on a device count this machine does not have."""

from pathlib import Path

from jaxalign.cli import main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "sft.yaml"


def test_predicts_fsdp_split_for_many_devices(capsys):
    assert main(["memory", str(CONFIG), "model.config.vocab_size=512", "train.batch_size=64", "--devices", "64"]) == 0
    out = capsys.readouterr().out
    assert "mesh data=1, fsdp=64, tensor=1 (64 devices)" in out
    # tiny preset with hidden 128, intermediate 384, vocab 512, 2 layers, untied head: params, then AdamW mu + nu.
    n_params = 2 * 512 * 128 + 128 + 2 * (4 * 128 * 128 // 2 + 2 * 128 * 128 // 2 + 3 * 128 * 384 + 2 * 128)
    assert f"parameters: {n_params:,}" in out
    assert f"together {3 * 4 * n_params / 64 / 1024:.2f} KiB" in out


def test_mesh_that_does_not_divide_the_model_is_exit_code_2(capsys):
    assert main(["memory", str(CONFIG), "mesh.tensor=3", "--devices", "6"]) == 2
    assert "mesh.tensor=3 does not divide" in capsys.readouterr().err
