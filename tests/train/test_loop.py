"""The training loop end to end, with runs stopped or started in real subprocesses: exact resume after SIGKILL,
SIGTERM, NaN, a damaged newest checkpoint, and a resume onto a different mesh (8 devices -> 1); exit statuses of a
stop by signal at any moment; the run directory's config.yaml refusing a rerun with other settings; what the console
shows."""

import contextlib
import io
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
import yaml

from tests.train import tiny_run

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "train" / "tiny_run.py"
STEPS = 6
COMMON = [f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=3"]


class Driver:
    """Runs tests/train/tiny_run.py: in this process, or in subprocesses that share its compilation cache
    (compiling dominates)."""

    def __init__(self, cpu_process_env):
        self.cpu_process_env = cpu_process_env

    def command(self, out: Path, *args: str) -> list[str]:
        return [sys.executable, str(DRIVER), str(out), *COMMON, *args]

    def env(self, devices: int = 8) -> dict:
        return {**self.cpu_process_env(devices), "PYTHONPATH": str(ROOT)}

    def run(self, out: Path, *args: str) -> subprocess.CompletedProcess:
        """The driver's `main` called here, with what it prints to stdout / stderr captured."""
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = tiny_run.main([str(out), *COMMON, *args])
        return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())

    def run_apart(self, out: Path, *args: str, devices: int = 8) -> subprocess.CompletedProcess:
        """The driver in a fresh process (other device counts; what reaches the terminal, library logs included)."""
        return subprocess.run(self.command(out, *args), env=self.env(devices), capture_output=True, text=True,
                              timeout=300)

    def start(self, out: Path, *args: str) -> subprocess.Popen:
        # SIGINT as an interactive shell leaves it: a suite started in the background inherits it ignored
        return subprocess.Popen(self.command(out, "--step-delay", "0.3", *args), env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def handles_sigterm(proc: subprocess.Popen) -> bool:
    """Whether the process has installed its SIGTERM handler (Python alone leaves SIGTERM to the default)."""
    status = Path(f"/proc/{proc.pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.fixture(scope="module")
def driver(cpu_process_env) -> Driver:
    return Driver(cpu_process_env)


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
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == STEPS and saved["optimizer"]["lr"] == 1e-2 and saved["output_dir"] == str(out)


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


def test_sigterm_saves_exits_143_and_resumes(driver, reference, tmp_path):
    proc = driver.start(tmp_path)
    wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and len(training_lines(tmp_path)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM after step" in stderr
    stopped = int(stderr.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert stopped < STEPS and stopped in checkpoint_steps(tmp_path)
    resumed = driver.run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped}" in resumed.stderr
    assert_identical_from(tmp_path, reference[1], stopped + 1)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_after_the_same_step(driver, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [
        subprocess.Popen(driver.command(tmp_path, "--step-delay", "0.3", "--coordinator", f"127.0.0.1:{port}",
                                        "--num-processes", "2", "--process-id", str(i)),
                         env=driver.env(devices=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    try:
        wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and len(training_lines(tmp_path)) >= 2, procs[0])
        procs[1].send_signal(signal.SIGTERM)
        stderrs = [proc.communicate(timeout=120)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [143, 143], stderrs[0][-3000:]
    stopped = int(stderrs[0].split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert stopped < STEPS and stopped in checkpoint_steps(tmp_path)


@pytest.mark.parametrize("moment", ["importing", "setting up", "training"])
def test_ctrl_c_is_honoured_at_any_moment_with_status_130(driver, tmp_path, moment):
    """SIGINT right after the handlers are installed (JAX still importing), during setup and compilation, and
    mid-training: always status 130, never a traceback, a swallowed interrupt or a crash; in training after a save."""
    proc = driver.start(tmp_path)
    wait_for(lambda: handles_sigterm(proc), proc, timeout=60)
    if moment == "setting up":
        time.sleep(1.5)
    if moment == "training":
        wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and training_lines(tmp_path), proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    if "stopped by SIGINT after step " in stderr:  # training had begun: it saved first
        stopped = int(stderr.split("stopped by SIGINT after step ")[1].split(";")[0])
        assert stopped in checkpoint_steps(tmp_path)
    else:
        assert moment != "training"
        assert "SIGINT: exiting now (status 130)" in stderr, stderr[-3000:]


def test_rerun_with_other_training_settings_is_refused_and_changes_nothing(driver, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = driver.run(out, f"train.steps={STEPS + 2}", "optimizer.lr=0.02", "seed=1", "train.seq_len=8")
    assert result.returncode == 2
    assert f"{out} holds a run trained with other settings" in result.stderr
    for change in ("optimizer.lr: 0.01 → 0.02", "seed: 0 → 1", "train.seq_len: 16 → 8", "--allow-config-change"):
        assert change in result.stderr
    assert "train.steps" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    extended = driver.run(out, f"train.steps={STEPS + 2}", "checkpoint.every=4", "train.log_every=2")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / str(STEPS)} at step {STEPS}" in extended.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == STEPS + 2


def test_extending_a_decaying_schedule_says_where_the_learning_rate_jumps(driver, tmp_path):
    first = driver.run(tmp_path, "train.steps=2", "optimizer.schedule=cosine")
    assert first.returncode == 0, first.stderr[-3000:]
    extended = driver.run(tmp_path, "train.steps=4", "optimizer.schedule=cosine")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert ("warning: train.steps changed 2 → 4: the learning rate of 'model' at step 2 moves from 0 to 0.005"
            in extended.stderr)
    again = driver.run(tmp_path, "train.steps=4", "optimizer.schedule=cosine")
    assert f"{tmp_path} already finished at step 4 (train.steps=4); nothing to train" in again.stderr


def test_checkpoint_that_does_not_fit_is_reported_without_library_noise(driver, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    result = driver.run_apart(out, "optimizer.name=sgd", "--allow-config-change")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("jaxalign: warning: continuing") and 'optimizer.name: "adamw" → "sgd"' in lines[0]
    assert lines[1].startswith(f"error: checkpoint step {STEPS} in {out / 'checkpoints'} does not fit this config:")
    assert "opt_state/model/" in lines[1] and "use a new output_dir" in lines[1]
    assert len(lines) == 2, result.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["optimizer"]["name"] == "adamw"


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
    result = driver.run_apart(out)  # the warning is logged: it reaches the terminal, not this process's stderr
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
    result = driver.run_apart(out, "mesh.fsdp=1", devices=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 2" in result.stderr
    lines = training_lines(out)
    for step in range(3, STEPS + 1):
        expected = reference[1][step]["loss"]
        assert abs(lines[step]["loss"] - expected) <= 1e-5 * abs(expected), step


def train_in_process(out: Path, *overrides: str):
    """The tiny run in this process with eval data (5 fixed batches): (state, model, eval data)."""
    import itertools

    from jaxalign.config import RunConfig, apply_overrides, from_dict
    from jaxalign.objectives.sft import make_algorithm
    from jaxalign.train.loop import train
    from tests.train.tiny_run import TINY_OVERRIDES, SyntheticTokens, tiny_model

    config = from_dict(RunConfig, apply_overrides({"output_dir": str(out)}, TINY_OVERRIDES + list(overrides)))
    model = tiny_model()

    def eval_data():
        return itertools.islice(SyntheticTokens(8, 16, model.config.vocab_size, seed=99), 5)

    algorithm = make_algorithm(model, config.optimizer, SyntheticTokens(8, 16, model.config.vocab_size),
                               eval_data=eval_data)
    return train(config, algorithm), model, eval_data


def test_eval_every_logs_eval_loss_of_the_current_params(tmp_path, capsys):
    """In-process: eval lines every train.eval_every steps, equal to the loss recomputed from the final params, and
    on the console; with train.steps < train.log_every the last step's loss is still shown."""
    import itertools

    import jax

    from jaxalign.objectives.sft import make_loss_fn

    state, model, eval_data = train_in_process(tmp_path, "train.steps=4", "train.eval_every=2",
                                               "train.eval_batches=2", "checkpoint.every=0", "train.log_every=10")
    assert int(state.step) == 4
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval_loss" in line]
    assert [line["step"] for line in evals] == [2, 4]
    assert set(evals[0]) == {"step", "eval_loss", "eval_correct", "eval_perplexity"}
    loss_fn = jax.jit(lambda params, batch: make_loss_fn(model)(params, batch, None))
    sums = [loss_fn(state.params["model"], batch) for batch in itertools.islice(eval_data(), 2)]
    expected = sum(float(o.total) for o, _ in sums) / sum(float(o.count) for o, _ in sums)
    assert evals[-1]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert checkpoint_steps(tmp_path) == [4]
    assert jax.tree.leaves(state.params)[0].sharding.mesh.shape["fsdp"] == 8

    console = capsys.readouterr().err.splitlines()
    train_line = [line for line in lines if "loss" in line][-1]
    assert console.count(f"jaxalign: step 4/4 loss {train_line['loss']:.4f}") == 1
    for line in evals:
        assert (f"jaxalign: step {line['step']}/4 eval_loss {line['eval_loss']:.4f} eval_correct "
                f"{line['eval_correct']:.4f} eval_perplexity {line['eval_perplexity']:.4f}") in console


@pytest.mark.parametrize("columns", [120, 0])
def test_console_on_a_terminal_shows_loss_and_eval(tmp_path, monkeypatch, columns):
    """On a terminal: a tqdm bar with the loss and eval lines above it; a terminal of 0 columns gets plain lines."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    received = []
    reader = threading.Thread(target=lambda: _drain(leader, received), daemon=True)
    reader.start()
    terminal = os.fdopen(follower, "w")
    monkeypatch.setattr(sys, "stderr", terminal)
    train_in_process(tmp_path, "train.steps=2", "train.eval_every=2", "train.eval_batches=1", "checkpoint.every=0",
                     "train.log_every=10")
    terminal.close()
    reader.join(timeout=10)
    console = b"".join(received).decode()
    loss = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][0]["loss"]
    assert "jaxalign: step 2/2 eval_loss " in console
    if columns:
        assert "train: 100%" in console and f"loss={loss:.4f}" in console
    else:
        assert f"jaxalign: step 2/2 loss {loss:.4f}" in console


def _drain(fd: int, received: list) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            return
        if not chunk:
            return
        received.append(chunk)
