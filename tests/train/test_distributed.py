"""Two real processes on localhost (jax.distributed, 2 CPU devices each) train, checkpoint and resume; their
losses equal a single process with 4 devices."""

import shutil
import socket
import subprocess

import pytest

from tests.train.test_loop import STEPS, Driver, checkpoint_steps, training_lines


@pytest.fixture(scope="module")
def driver(cpu_process_env) -> Driver:
    return Driver(cpu_process_env)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(driver: Driver, out) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = [
        subprocess.Popen(driver.command(out, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                        "--process-id", str(i)),
                         env=driver.env(devices=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def assert_close(lines, reference, steps) -> None:
    for step in steps:
        for key in ("loss", "grad_norm"):
            expected = reference[step][key]
            assert abs(lines[step][key] - expected) <= 1e-5 * abs(expected), (step, key)


@pytest.mark.slow
def test_two_processes_train_save_and_resume_like_one(driver, tmp_path):
    single = driver.run_apart(tmp_path / "single", devices=4)
    assert single.returncode == 0, single.stderr[-3000:]
    reference = training_lines(tmp_path / "single")

    out = tmp_path / "two"
    for result in run_two_processes(driver, out):
        assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_steps(out) == [2, 4, 6]
    assert_close(training_lines(out), reference, range(1, STEPS + 1))

    shutil.rmtree(out / "checkpoints" / str(STEPS))
    results = run_two_processes(driver, out)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 4" in results[0].stderr
    assert "resumed" not in results[1].stderr
    lines = training_lines(out)
    assert sorted(lines) == list(range(1, STEPS + 1))
    assert_close(lines, reference, range(1, STEPS + 1))
