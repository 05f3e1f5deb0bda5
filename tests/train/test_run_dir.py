"""config.yaml in the run directory: which changes a rerun may make, what a refusal says, and that it writes nothing."""

import pytest
import yaml

from jaxalign.config import RunConfig, apply_overrides, from_dict
from jaxalign.errors import JaxalignError
from jaxalign.train import run_dir


def config(tmp_path, *overrides: str) -> RunConfig:
    return from_dict(RunConfig, apply_overrides({"output_dir": str(tmp_path)}, list(overrides)))


def test_a_fresh_directory_has_no_changes_and_save_records_every_key(tmp_path):
    first = config(tmp_path, "optimizer.lr=3e-4", "mesh.rules={batch: [data, fsdp]}")
    assert run_dir.check_config(first) == []
    saved = yaml.safe_load(run_dir.save_config(first).read_text())
    assert saved["optimizer"]["lr"] == 3e-4 and saved["train"]["seq_len"] == 2048
    assert run_dir.config_changes(saved, first) == []


def test_cadence_length_and_layout_may_change(tmp_path):
    run_dir.save_config(config(tmp_path))
    rerun = config(tmp_path, "train.steps=5000", "train.log_every=1", "train.eval_every=7", "train.grad_accum=2",
                   "checkpoint.every=3", "checkpoint.keep=9", "mesh.fsdp=2", "mesh.data=4")
    changes = run_dir.check_config(rerun)
    assert {c.key for c in changes} == {"train.steps", "train.log_every", "train.eval_every", "train.grad_accum",
                                       "checkpoint.every", "checkpoint.keep", "mesh.fsdp", "mesh.data"}
    assert all(c.changeable for c in changes)


def test_training_settings_are_refused_listing_old_and_new_and_nothing_is_written(tmp_path):
    path = run_dir.save_config(config(tmp_path))
    before = path.read_text()
    rerun = config(tmp_path, "seed=3", "optimizer.lr=1e-3", "optimizer.name=sgd", "train.batch_size=8",
                   "train.steps=2000")
    with pytest.raises(JaxalignError) as caught:
        run_dir.check_config(rerun)
    message = str(caught.value)
    for line in ("seed: 0 → 3", "optimizer.lr: 1e-05 → 0.001", 'optimizer.name: "adamw" → "sgd"',
                 "train.batch_size: 32 → 8", "--allow-config-change"):
        assert line in message
    assert "train.steps" not in message
    assert path.read_text() == before
    assert {c.key for c in run_dir.check_config(rerun, allow_config_change=True)} >= {"seed", "optimizer.lr"}


def test_keys_the_saved_file_lacks_are_not_compared_dict_fields_compare_whole(tmp_path):
    saved = yaml.safe_load(yaml.safe_dump({"seed": 0, "mesh": {"rules": {"batch": "data"}}}))
    changes = run_dir.config_changes(saved, config(tmp_path, "mesh.rules={batch: data, mlp: tensor}"))
    assert [str(c) for c in changes] == ['mesh.rules: {"batch": "data"} → {"batch": "data", "mlp": "tensor"}']


def test_a_damaged_config_file_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(JaxalignError, match="config.yaml: expected the run's config as a mapping"):
        run_dir.check_config(config(tmp_path))


def test_latest_checkpoint_step_ignores_unfinished_folders(tmp_path):
    assert run_dir.latest_checkpoint_step(tmp_path) is None
    for name in ("2", "10", "12.orbax-checkpoint-tmp-5"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert run_dir.latest_checkpoint_step(tmp_path) == 10
