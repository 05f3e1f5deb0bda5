"""The loop's contract with an algorithm: a test-only algorithm with two trainables, a frozen reference and batches
generated from the current policy trains equally on 1 and 8 devices, checkpoints only between its iterations and
resumes after SIGKILL with bit-identical metrics; metrics with their own counts are exact under uneven lengths,
gradient accumulation, devices and log windows."""

import json
import signal

import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxalign.config import RunConfig, apply_overrides, from_dict
from jaxalign.train.algorithm import Algorithm, DataSource, Mean, Trainable
from jaxalign.train.loop import train

from tests.train.test_loop import STEPS, Driver, checkpoint_steps, training_lines, wait_for

TOY = ["--algorithm", "toy"]
TOY_METRICS = ("loss", "grad_norm", "grad_norm/policy", "grad_norm/value", "policy_nll", "kl", "value_mse",
               "response_length", "lr/policy", "lr/value")


@pytest.fixture(scope="module")
def driver(cpu_process_env) -> Driver:
    return Driver(cpu_process_env)


@pytest.fixture(scope="module")
def toy_reference(driver, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    result = driver.run(out, *TOY)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, training_lines(out)


def test_toy_algorithm_logs_every_metric_and_checkpoints_between_iterations(toy_reference):
    out, lines = toy_reference
    assert sorted(lines) == list(range(1, STEPS + 1))
    assert set(TOY_METRICS) <= set(lines[1])
    assert "response_length" in lines[4] and "response_length" not in lines[2]  # one rollout per 3 steps
    # checkpoint.every=2: step 2 and 4 fall inside an iteration, so they wait for its end (3 and 6).
    assert checkpoint_steps(out) == [3, 6]
    lengths = {lines[step]["response_length"] for step in (1, 4)}
    assert all(1 <= n < 6 for n in lengths)
    assert lines[1]["lr/value"] == pytest.approx(lines[1]["lr/policy"] / 2)


@pytest.mark.slow
def test_toy_algorithm_on_one_device_equals_eight(driver, toy_reference, tmp_path):
    result = driver.run_apart(tmp_path, *TOY, "mesh.fsdp=1", devices=1)
    assert result.returncode == 0, result.stderr[-3000:]
    one, eight = training_lines(tmp_path), toy_reference[1]
    # float32 sums in another order on 8 shards: up to ~6e-5 apart at step 4, up to ~5e-4 by step 6 on an AMD EPYC
    # host, ~1.5e-4 on others (the rollouts are sampled from the policy being trained and Adam scales each update to
    # the learning rate, so the differences compound; the value head's grow fastest)
    for step in range(1, STEPS + 1):
        assert set(one[step]) == set(eight[step])
        for key in set(TOY_METRICS) & set(eight[step]):
            assert one[step][key] == pytest.approx(eight[step][key], rel=1e-3, abs=1e-6), (step, key)


def test_toy_algorithm_resumes_after_sigkill_bit_identically(driver, toy_reference, tmp_path):
    proc = driver.start(tmp_path, *TOY)
    wait_for(lambda: 3 in checkpoint_steps(tmp_path), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = driver.run(tmp_path, *TOY)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    restored = int(resumed.stderr.split(" at step ")[1].split()[0])
    assert restored in (3, 6)
    lines = training_lines(tmp_path)
    assert sorted(lines) == list(range(1, STEPS + 1))
    for step in range(restored + 1, STEPS + 1):
        for key in TOY_METRICS:
            assert lines[step].get(key) == toy_reference[1][step].get(key), (step, key)


class Scale(nn.Module):
    """One trainable scalar `w`."""

    @nn.compact
    def __call__(self, input_ids):
        return self.param("w", nn.initializers.constant(0.5), ()) * input_ids


class Batches:
    """Fixed process-local batches with a resumable position."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.position += 1
        return self.batches[self.position - 1]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def uneven_batch(rng, rows=16, length=16) -> dict:
    lengths = rng.permutation(np.arange(1, rows + 1))  # 1..16 valid tokens per row
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)
    x = rng.normal(size=(rows, length)).astype(np.float32)
    return {"x": x, "mask": mask, "input_ids": np.zeros((rows, 1), np.int32)}


def scalar_loss(params, frozen, batch, rng):
    w, x, mask = params["model"]["w"], batch["x"], batch["mask"]
    row_sums = jnp.sum(x * mask, axis=1)
    objective = Mean.of((w * x) ** 2, mask)
    return objective, {"per_token": Mean.of(x, mask), "per_sequence": Mean.of(row_sums)}


def test_metrics_with_their_own_counts_are_exact(tmp_path):
    """Per-token and per-sequence means in one step, 2 accumulation micro-batches of uneven rows on 8 devices, a
    log line pooling 2 steps: each equals its exact global mean, and SGD's update the exact mean gradient."""
    rng = np.random.default_rng(0)
    batches = [uneven_batch(rng), uneven_batch(rng)]
    overrides = ["train.steps=2", "train.batch_size=16", "train.grad_accum=2", "train.log_every=2",
                 "optimizer.name=sgd", "optimizer.lr=0.1", "optimizer.schedule=constant", "optimizer.b1=null",
                 "optimizer.clip=0", "checkpoint.every=0", "mesh.fsdp=-1"]
    config = from_dict(RunConfig, apply_overrides({"output_dir": str(tmp_path)}, overrides))
    algorithm = Algorithm(trainables={"model": Trainable(Scale(), config.optimizer)}, loss=scalar_loss,
                          source=DataSource(Batches(batches)))
    state = train(config, algorithm)

    x = np.stack([b["x"] for b in batches])
    mask = np.stack([b["mask"] for b in batches])
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["step"] == 2
    assert line["per_token"] == pytest.approx(float((x * mask).sum() / mask.sum()), rel=1e-6)
    assert line["per_sequence"] == pytest.approx(float((x * mask).sum(axis=2).mean()), rel=1e-6)
    w = 0.5
    losses = []
    for b in batches:
        losses.append((b["x"] ** 2 * b["mask"]).sum() * w**2)
        w -= 0.1 * (2 * w * (b["x"] ** 2 * b["mask"]).sum() / b["mask"].sum())
    assert line["loss"] == pytest.approx(float(sum(losses) / mask.sum()), rel=1e-5)
    assert float(state.params["model"]["w"]) == pytest.approx(w, rel=1e-5)


def test_mean_of_ignores_nan_in_masked_slots():
    mean = Mean.of(jnp.array([1.0, jnp.nan, 3.0]), jnp.array([1.0, 0.0, 1.0]))
    assert float(mean.total) == 4.0 and float(mean.count) == 2.0 and mean.value() == 2.0
    assert (Mean.scalar(2.0) + Mean.scalar(4.0)).value() == 3.0
    assert Mean(0.0, 0.0).value() == 0.0



def test_a_batch_of_pairs_counts_the_real_tokens_of_both_halves():
    from jaxalign.train.loop import real_token_count

    chosen = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    rejected = np.array([[1, 1, 1, 1], [0, 1, 1, 1]])
    assert int(real_token_count({"chosen_segment_ids": jnp.asarray(chosen),
                                 "rejected_segment_ids": jnp.asarray(rejected),
                                 "margin": jnp.zeros(2)})) == 12
    assert int(real_token_count({"input_ids": jnp.zeros((2, 5), jnp.int32)})) == 10


def test_extending_a_run_that_ended_inside_a_source_iteration_warns(driver, tmp_path):
    short = driver.run(tmp_path, *TOY, "train.steps=4")  # iterations of 3 minibatches: step 4 is inside one
    assert short.returncode == 0, short.stderr[-3000:]
    longer = driver.run(tmp_path, *TOY)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "checkpoint step 4 was saved at the end of a run, inside an iteration of the batch source" in longer.stderr


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    from jaxalign.train.loop import _MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    _MetricsLogger(tmp_path, start=2, primary=True).close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
