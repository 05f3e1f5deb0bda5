import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxalign.cli import main
from jaxalign.commands.sft import SFTConfig, train_sft
from jaxalign.config import apply_overrides, from_dict

TINY_RUN = {
    "seed": 0,
    "model": {"config": {"preset": "tiny"}},
    "data": {"train": "demo:instructions", "template": "plain", "mask": "prompt", "tokenizer": "byte"},
    "train": {"batch_size": 16, "seq_len": 128, "log_every": 1},
    "optimizer": {"name": "adamw", "lr": 3e-3, "schedule": "constant", "clip": 1.0, "weight_decay": 0.0},
    "checkpoint": {"every": 0, "keep": 1, "async_save": False},
}


def tiny_config(tmp_path: Path, *overrides: str) -> SFTConfig:
    data = apply_overrides(TINY_RUN, [f"output_dir={tmp_path}", *overrides])
    return from_dict(SFTConfig, data)


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


MEMORISE = ["data.train=[{path: 'demo:instructions', limit: 16}]", "data.shuffle=false",
            "data.eval=[{path: 'demo:instructions', limit: 16}]", "train.steps=120", "train.eval_every=120",
            "optimizer.lr=1e-2", "optimizer.schedule=cosine", "optimizer.warmup_steps=10", "mesh.fsdp=8"]


@pytest.fixture(scope="module")
def memorised_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memorise")
    assert train_sft(tiny_config(out, *MEMORISE)) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def memorise_config_file(tmp_path: Path) -> Path:
    config_file = tmp_path / "memorise.yaml"
    config_file.write_text(json.dumps(apply_overrides(TINY_RUN, MEMORISE)))
    return config_file


def test_tiny_model_memorises_a_small_set(memorised_run):
    lines = metrics(memorised_run)
    train_lines = [line for line in lines if "loss" in line]
    assert train_lines[0]["loss"] > 3.0
    assert train_lines[-1]["loss"] < 0.05
    (final_eval,) = [line for line in lines if "eval_loss" in line]
    assert final_eval["eval_loss"] < 0.05
    assert final_eval["eval_perplexity"] == pytest.approx(np.exp(final_eval["eval_loss"]))
    assert final_eval["eval_correct"] > 0.99


def test_export_loads_in_transformers_and_reproduces_the_training_data(memorised_run):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxalign.data import build_loader

    hf_dir = memorised_run / "hf"
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    data_config = tiny_config(memorised_run, "data.train=[{path: 'demo:instructions', limit: 16}]",
                              "data.shuffle=false").data
    batch = next(build_loader(data_config, tokenizer, batch_size=1, seq_len=128))
    trained = np.flatnonzero(batch["loss_mask"][0])
    prompt = batch["input_ids"][0, : trained[0] + 1]
    expected = batch["targets"][0, trained]
    assert expected[-1] == tokenizer.eos_token_id
    output = model.generate(torch.tensor(prompt[None].astype(np.int64)), max_new_tokens=len(expected) + 4,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output[0, len(prompt):].tolist() == expected.tolist()


def test_starts_from_a_jaxalign_model_checkpoint(memorised_run, tmp_path):
    import jaxalign
    from jaxalign.models.checkpoint import save_model_checkpoint

    model, params = jaxalign.load_pretrained(memorised_run / "hf")
    save_model_checkpoint(tmp_path / "checkpoint", model.config, params)
    config = tiny_config(tmp_path / "run", f"model.path={tmp_path / 'checkpoint'}", "model.config={}",
                         "data.train=[{path: 'demo:instructions', limit: 16}]", "train.steps=1", "mesh.fsdp=8")
    assert train_sft(config) == 0
    (line,) = metrics(tmp_path / "run")
    assert line["loss"] < 0.05


@pytest.mark.slow
def test_losses_do_not_depend_on_devices_or_accumulation(tmp_path, cpu_process_env):
    """(1 device, accumulation 1) in a fresh process vs (8 fake devices, accumulation 2), same global batch."""
    common = ["train.steps=3", "data.eval_fraction=0.05", "train.eval_every=3", "data.pack=true"]
    single = tmp_path / "single"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(apply_overrides(TINY_RUN, common)))
    result = subprocess.run(
        [sys.executable, "-m", "jaxalign.cli", "sft", str(config_file), f"output_dir={single}", "mesh.fsdp=1"],
        env=cpu_process_env(1), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = tmp_path / "sharded"
    assert train_sft(tiny_config(sharded, *common, "train.grad_accum=2", "mesh.data=2", "mesh.fsdp=4")) == 0
    for one, eight in zip(metrics(single), metrics(sharded), strict=True):
        assert one["step"] == eight["step"]
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in one:
                assert eight[key] == pytest.approx(one[key], rel=1e-5), (one["step"], key)


def test_missing_tokenizer_is_a_config_error(tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(apply_overrides(TINY_RUN, ["data.tokenizer=null"])))
    assert main(["sft", str(config_file), f"output_dir={tmp_path}"]) == 2
    assert "'data.tokenizer' is required" in capsys.readouterr().err


def test_pretrained_architecture_cannot_be_overridden(tmp_path, memorised_run, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(TINY_RUN))
    code = main(["sft", str(config_file), f"output_dir={tmp_path}", f"model.path={memorised_run / 'hf'}",
                 "model.config={hidden_size: 32}"])
    assert code == 2
    assert "model.config.hidden_size': cannot change a pretrained model's architecture" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_fine_tune_lowers_eval_loss_and_exports(smollm2_dir, llamafactory_data, tmp_path):
    """SmolLM2-135M-Instruct, a few steps on alpaca_en_demo.json with Alpaca's added [PAD] token."""
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxalign.data import load_tokenizer, prepare_tokenizer

    config = from_dict(SFTConfig, {
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(smollm2_dir)},
        "data": {"train": str(llamafactory_data / "alpaca_en_demo.json"), "eval_fraction": 0.02,
                 "template": "alpaca", "mask": "prompt", "pad_token": "[PAD]"},
        "train": {"steps": 2, "batch_size": 8, "seq_len": 64, "log_every": 1, "eval_every": 2,
                  "eval_at_start": True},
        "optimizer": {"name": "adamw", "lr": 1e-4, "schedule": "constant", "weight_decay": 0.0},
        "checkpoint": {"every": 0, "keep": 1, "async_save": False},
    })
    assert prepare_tokenizer(config.data, load_tokenizer(str(smollm2_dir))) == ["[PAD]"]

    assert train_sft(config) == 0
    before, after = [line["eval_loss"] for line in metrics(config.output_dir) if "eval_loss" in line]
    assert after < before, (before, after)

    hf_dir = tmp_path / "run" / "hf"
    exported = AutoModelForCausalLM.from_pretrained(hf_dir)
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert exported.config.vocab_size == len(hf_tokenizer) == 49153
    prompt = hf_tokenizer("### Instruction:\nName a color.\n\n### Response:\n", return_tensors="pt")
    output = exported.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]
    assert hf_tokenizer.decode(output[0, prompt["input_ids"].shape[1]:]).strip()


def test_missing_model_path_says_how_to_train_from_scratch(tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(TINY_RUN))
    assert main(["sft", str(config_file), f"output_dir={tmp_path}", f"model.path={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert "'model.path'" in err and "nowhere is neither a Hugging Face folder" in err and "model.path=null" in err


def test_rerun_of_a_finished_run_says_so_and_leaves_the_export(memorised_run, tmp_path, capsys):
    out = copy_of(memorised_run, tmp_path)
    before = mtimes(out)
    assert train_sft(tiny_config(out, *MEMORISE)) == 0
    said = capsys.readouterr().out
    assert f"{out} already finished at step 120 (train.steps=120); the model is in {out / 'hf'}" in said
    assert mtimes(out) == before


def test_rerun_of_a_finished_run_exports_a_missing_hf_folder(memorised_run, tmp_path, capsys):
    out = copy_of(memorised_run, tmp_path)
    shutil.rmtree(out / "hf")
    assert train_sft(tiny_config(out, *MEMORISE)) == 0
    assert "already finished at step 120" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "hf").iterdir()) == sorted(p.name for p in (memorised_run / "hf").iterdir())
    assert not (out / "hf.partial").exists()


def test_rerun_with_other_template_mask_and_lr_is_refused_and_changes_nothing(memorised_run, tmp_path, capsys):
    out = copy_of(memorised_run, tmp_path)
    before = mtimes(out)
    code = main(["sft", str(memorise_config_file(tmp_path)), f"output_dir={out}", "data.template=chatml",
                 "data.mask=assistant", "optimizer.lr=1e-3", "train.steps=150"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"jaxalign sft: error: {out} holds a run trained with other settings ({out / 'config.yaml'}):" in err
    for change in ('data.template: "plain" → "chatml"', 'data.mask: "prompt" → "assistant"',
                   "optimizer.lr: 0.01 → 0.001", "--allow-config-change"):
        assert change in err
    assert "train.steps" not in err
    assert mtimes(out) == before


def test_checkpoint_of_another_model_is_reported_without_library_noise(memorised_run, tmp_path, capfd):
    out = copy_of(memorised_run, tmp_path)
    code = main(["sft", str(memorise_config_file(tmp_path)), f"output_dir={out}", "train.steps=121",
                 "model.config={preset: tiny, hidden_size: 48}", "--allow-config-change"])
    assert code == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert 'warning: continuing' in lines[0] and "model.config" in lines[0]
    assert "does not fit this config: " in lines[-1] and "embed_tokens/embedding: checkpoint (" in lines[-1]
    assert len(lines) == 2, lines
    assert "hidden_size" not in (out / "config.yaml").read_text()


def test_a_stop_signal_ends_jaxalign_sft_with_status_143(tmp_path):
    """`jaxalign sft cfg && jaxalign generate ...` must not go on after a stop; SIGTERM during setup."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(TINY_RUN))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "jaxalign.cli", "sft", str(config_file),
                             f"output_dir={tmp_path / 'run'}"], env=env, stderr=subprocess.PIPE, text=True)
    status = Path(f"/proc/{proc.pid}/status")
    deadline = time.monotonic() + 60
    while not int(next(line.split()[1] for line in status.read_text().splitlines()
                       if line.startswith("SigCgt:")), 16) & (1 << (signal.SIGTERM - 1)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-3000:]
    assert "SIGTERM: exiting now (status 143)" in stderr and "Traceback" not in stderr


def test_sft_run_returns_the_exit_status_of_a_stop(tmp_path, monkeypatch):
    from jaxalign.commands import sft
    from jaxalign.train.stop import TrainingStopped

    def stopped(config, allow_config_change):
        raise TrainingStopped(signal.SIGINT, "stopped by SIGINT after step 3")

    monkeypatch.setattr(sft, "train_sft", stopped)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(TINY_RUN))
    assert main(["sft", str(config_file), f"output_dir={tmp_path}"]) == 130


def test_tiny_lora_config_trains_adapters_only_and_exports_merged_and_peft(memorised_run, tmp_path):
    """configs/tiny/sft_lora.yaml on a tiny export: the loss falls, hf/ is the merged model and adapter/ a PEFT
    folder whose adapters, read back and folded into the base, give hf/'s weights."""
    import jax

    from jaxalign.config import load_config
    from jaxalign.hf import read_peft_adapter
    from jaxalign.models import lora
    from jaxalign.models.loading import load_model

    config = load_config(SFTConfig, Path(__file__).resolve().parents[2] / "configs" / "tiny" / "sft_lora.yaml",
                         [f"output_dir={tmp_path}", f"model.path={memorised_run / 'hf'}", "data.template=plain",
                          "train.steps=20", "train.eval_every=20", "train.seq_len=128", "checkpoint.every=0"])
    assert train_sft(config) == 0
    lines = metrics(tmp_path)
    losses = [line["loss"] for line in lines if "loss" in line]
    assert losses[-1] < losses[0]
    assert lines[-1]["eval_loss"] < lines[0]["eval_loss"]
    base_model, base = load_model(memorised_run / "hf")
    merged_model, merged = load_model(tmp_path / "hf")
    settings, adapters = read_peft_adapter(tmp_path / "adapter", base_model.config)
    assert settings.projections() == lora.PROJECTIONS and settings.rank == 8
    folded = lora.merged_params(lora.merge(base, adapters), lora.apply_to(base_model.config, settings))
    for a, b in zip(jax.tree.leaves(folded), jax.tree.leaves(merged)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_peft_adapter_folder_loads_merged_and_trains_further(memorised_run, tmp_path):
    import jax

    from jaxalign.config import load_config
    from jaxalign.errors import JaxalignError
    from jaxalign.hf import read_peft_adapter
    from jaxalign.models.loading import load_model

    lora_yaml = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "sft_lora.yaml"
    common = ["data.template=plain", "train.seq_len=128", "checkpoint.every=0", "train.eval_every=4",
              "model.lora.targets=[q_proj, v_proj]"]
    first = tmp_path / "first"
    assert train_sft(load_config(SFTConfig, lora_yaml, [f"output_dir={first}", f"model.path={memorised_run / 'hf'}",
                                                         "train.steps=4", *common])) == 0
    _, merged = load_model(first / "hf")
    _, from_adapter = load_model(first / "adapter")  # the base that adapter_config.json names, adapters folded in
    for a, b in zip(jax.tree.leaves(from_adapter), jax.tree.leaves(merged)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    second = tmp_path / "second"  # the adapters themselves train on (at a learning rate too small to move them)
    assert train_sft(load_config(SFTConfig, lora_yaml, [f"output_dir={second}", f"model.path={first / 'adapter'}",
                                                         "train.steps=4", "optimizer.lr=1e-12", *common])) == 0
    assert metrics(second)[0]["eval_loss"] == pytest.approx(metrics(first)[-1]["eval_loss"], rel=1e-5)
    base_config = load_model(memorised_run / "hf")[0].config
    continued, trained = (read_peft_adapter(run / "adapter", base_config)[1] for run in (second, first))
    for a, b in zip(jax.tree.leaves(continued), jax.tree.leaves(trained)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(JaxalignError, match="'model.lora': the adapter in .* has rank 8"):
        train_sft(load_config(SFTConfig, lora_yaml, [f"output_dir={tmp_path / 'third'}", "model.lora.rank=4",
                                                     f"model.path={first / 'adapter'}", "train.steps=1", *common]))
