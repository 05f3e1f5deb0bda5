"""The training loop end to end in real subprocesses: exact resume after SIGKILL, SIGTERM, NaN, a damaged newest
checkpoint, and a resume onto a different mesh (8 devices -> 1)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "train" / "tiny_run.py"
STEPS = 6
COMMON = [f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=3"]


class Driver:
    """Runs tests/train/tiny_run.py in subprocesses that share a JAX compilation cache (compiling dominates)."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir

    def command(self, out: Path, *args: str) -> list[str]:
        return [sys.executable, str(DRIVER), str(out), *COMMON, *args]

    def env(self, devices: int = 8) -> dict:
        env = dict(os.environ)
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                   PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(self.cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
        return env

    def run(self, out: Path, *args: str, devices: int = 8) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(out, *args), env=self.env(devices), capture_output=True, text=True,
                              timeout=300)

    def start(self, out: Path, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(out, "--step-delay", "0.3", *args), env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Driver:
    return Driver(tmp_path_factory.mktemp("jax-compile-cache"))


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def training_lines(out: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {line["step"]: line for line in lines if "loss" in line}


def assert_identical_from(out: Path, reference: dict[int, dict], first_step: int) -> None:
    lines = training_lines(out)
    assert sorted(lines) == list(range(1, STEPS + 1))
    for step in range(first_step, STEPS + 1):
        for key in ("loss", "grad_norm", "lr"):
            assert lines[step][key] == reference[step][key], f"step {step} {key}"


def checkpoint_steps(out: Path) -> list[int]:
    folder = out / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def reference(driver, tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    out = tmp_path_factory.mktemp("reference")
    result = driver.run(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, training_lines(out)


def test_uninterrupted_run_logs_and_checkpoints(reference):
    out, lines = reference
    assert sorted(lines) == list(range(1, STEPS + 1))
    assert {"step", "loss", "grad_norm", "lr", "tokens_per_s"} <= set(lines[1])
    assert checkpoint_steps(out) == [2, 4, 6]
    assert list((out / "tensorboard").iterdir())


def test_exact_resume_after_sigkill(driver, reference, tmp_path):
    kill_after = random.choice([2, 4])
    proc = driver.start(tmp_path)
    wait_for(lambda: kill_after in checkpoint_steps(tmp_path), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = driver.run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    restored = int(resumed.stderr.split(" at step ")[1].split()[0])
    assert restored >= kill_after, f"killed after checkpoint {kill_after}, restored {restored}"
    print(f"SIGKILL after checkpoint {kill_after}; restored step {restored}")
    assert_identical_from(tmp_path, reference[1], restored + 1)


def test_sigterm_saves_exits_zero_and_resumes(driver, reference, tmp_path):
    proc = driver.start(tmp_path)
    wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and len(training_lines(tmp_path)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by SIGTERM after step" in stderr
    stopped = int(stderr.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert stopped < STEPS and stopped in checkpoint_steps(tmp_path)
    resumed = driver.run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped}" in resumed.stderr
    assert_identical_from(tmp_path, reference[1], stopped + 1)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(driver, tmp_path):
    result = driver.run(tmp_path, "--nan-at", "4")
    assert result.returncode == 2
    assert "step 4: loss is nan" in result.stderr
    assert checkpoint_steps(tmp_path) == [2]
    assert max(training_lines(tmp_path)) < 4


def test_damaged_newest_checkpoint_is_skipped(driver, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    for path in (out / "checkpoints" / str(STEPS) / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    result = driver.run(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint step {STEPS}" in result.stderr and "cannot be restored" in result.stderr
    assert f"at step {STEPS - 2}" in result.stderr
    assert (out / "corrupt_checkpoints" / str(STEPS)).is_dir()
    assert checkpoint_steps(out)[-1] == STEPS
    assert_identical_from(out, reference[1], STEPS - 1)


def test_resume_on_a_different_mesh(driver, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    for step in (4, 6):
        shutil.rmtree(out / "checkpoints" / str(step))
    result = driver.run(out, "mesh.fsdp=1", devices=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 2" in result.stderr
    lines = training_lines(out)
    for step in range(3, STEPS + 1):
        expected = reference[1][step]["loss"]
        assert abs(lines[step]["loss"] - expected) <= 1e-5 * abs(expected), step


def test_eval_every_logs_eval_loss_of_the_current_params(tmp_path):
    """In-process: eval lines every train.eval_every steps, equal to the loss recomputed from the final params."""
    import itertools

    import jax

    from jaxalign.config import RunConfig, apply_overrides, from_dict
    from jaxalign.objectives.sft import make_algorithm, make_loss_fn
    from jaxalign.train.loop import train
    from tests.train.tiny_run import TINY_OVERRIDES, SyntheticTokens, tiny_model

    overrides = TINY_OVERRIDES + ["train.steps=4", "train.eval_every=2", "train.eval_batches=2", "checkpoint.every=0"]
    config = from_dict(RunConfig, apply_overrides({"output_dir": str(tmp_path)}, overrides))
    model = tiny_model()

    def eval_data():
        return itertools.islice(SyntheticTokens(8, 16, model.config.vocab_size, seed=99), 5)

    algorithm = make_algorithm(model, config.optimizer, SyntheticTokens(8, 16, model.config.vocab_size),
                               eval_data=eval_data)
    state = train(config, algorithm)
    assert int(state.step) == 4
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval_loss" in line]
    assert [line["step"] for line in evals] == [2, 4]
    assert set(evals[0]) == {"step", "eval_loss", "eval_correct", "eval_perplexity"}
    loss_fn = jax.jit(lambda params, batch: make_loss_fn(model)(params, batch, None))
    sums = [loss_fn(state.params["model"], batch) for batch in itertools.islice(eval_data(), 2)]
    expected = sum(float(objective.total) for objective, _ in sums) / sum(float(objective.count) for objective, _ in sums)
    assert evals[-1]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert checkpoint_steps(tmp_path) == [4]
    assert jax.tree.leaves(state.params)[0].sharding.mesh.shape["fsdp"] == 8
