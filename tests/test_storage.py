"""jaxalign.storage on local paths and on `gs://` paths served from a local folder by an fsspec filesystem that, like
a real object store, refuses appends; and a tiny SFT run whose data, output and export all live on `gs://`."""

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as fsspec_implementations

from jaxalign import storage
from jaxalign.commands.sft import SFTConfig, train_sft
from jaxalign.config import apply_overrides, from_dict
from jaxalign.data.config import SourceSpec
from jaxalign.data.sources import iter_records, resolve_files
from jaxalign.errors import JaxalignError
from jaxalign.models.loading import load_model


class LocalBucket(LocalFileSystem):
    """`gs://bucket/key` as the file `folder/bucket/key`; listings name `bucket/key` as gcsfs does; no appends."""

    protocol = ("gs", "gcs")
    folder: Path

    def __init__(self, *args, finalize_on_close=None, **kwargs):
        super().__init__(auto_mkdir=True)

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        if path.startswith(str(cls.folder)):
            return path.rstrip("/")
        return f"{cls.folder}/{path}".rstrip("/")

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError("object stores have no append")
        return super()._open(path, mode, **kwargs)

    def glob(self, path, **kwargs):
        return [os.path.relpath(p, self.folder) for p in super().glob(path, **kwargs)]

    @classmethod
    def local(cls, path) -> Path:
        return Path(cls._strip_protocol(path))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A `gs://bucket` served from tmp_path/gcs; returns the local folder of gs://bucket."""
    LocalBucket.folder = tmp_path / "gcs"
    (LocalBucket.folder / "bucket").mkdir(parents=True)
    for name in ("gs", "gcs"):
        monkeypatch.setitem(fsspec_implementations, name, LocalBucket)
    monkeypatch.setenv("JAXALIGN_CACHE", str(tmp_path / "cache"))
    return LocalBucket.folder / "bucket"


def test_local_writes_replace_files_in_one_step(tmp_path):
    path = tmp_path / "a" / "b.json"
    storage.write_text(path, "one")
    storage.write_text(path, "two")
    storage.append_lines(path, ["three", "four"])
    assert path.read_text() == "twothree\nfour\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.json"]


def test_object_store_writes_appends_and_listings(bucket):
    storage.write_text("gs://bucket/run/config.yaml", "a: 1\n")
    storage.append_lines("gs://bucket/run/metrics.jsonl", ['{"step": 1}'])
    storage.append_lines("gs://bucket/run/metrics.jsonl", ['{"step": 2}'])
    storage.write_bytes("gs://bucket/run/hf/model.safetensors", b"\0" * 10)
    assert (bucket / "run" / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert [storage.relative(f, storage.location("gs://bucket/run")) for f in storage.files_under("gs://bucket/run")] \
        == ["config.yaml", "hf/model.safetensors", "metrics.jsonl"]
    assert storage.files_under("gs://bucket/missing") == []
    with pytest.raises(NotImplementedError):
        storage.location("gs://bucket/run/metrics.jsonl").open("a")


def test_folders_copy_replace_and_stage_between_local_and_store(bucket, tmp_path):
    local = tmp_path / "export"
    (local / "sub").mkdir(parents=True)
    (local / "config.json").write_text("{}")
    (local / "sub" / "w.bin").write_bytes(b"123")
    storage.copy_folder(local, "gs://bucket/run/hf.partial")
    storage.write_text("gs://bucket/run/hf/stale.json", "old")
    storage.replace_folder("gs://bucket/run/hf.partial", "gs://bucket/run/hf")
    assert sorted(str(p.relative_to(bucket / "run")) for p in (bucket / "run").rglob("*") if p.is_file()) == \
        ["hf/config.json", "hf/sub/w.bin"]
    with pytest.raises(RuntimeError):
        with storage.staged_folder("gs://bucket/run/failed") as folder:
            (folder / "half.json").write_text("{")
            raise RuntimeError("save failed")
    assert not (bucket / "run" / "failed").exists()
    with storage.staged_folder("gs://bucket/run/done") as folder:
        (folder / "x.json").write_text("[]")
    assert (bucket / "run" / "done" / "x.json").read_text() == "[]"
    with storage.staged_folder(tmp_path / "here") as folder:
        assert folder == tmp_path / "here" and folder.is_dir()


def test_local_folder_downloads_once_and_metadata_only_on_request(bucket, tmp_path):
    storage.write_text("gs://bucket/model/config.json", "{}")
    storage.write_bytes("gs://bucket/model/model.safetensors", b"weights")
    assert storage.local_folder(tmp_path) == tmp_path
    metadata = storage.local_folder("gs://bucket/model", weights=False)
    assert metadata == tmp_path / "cache" / "gs" / "bucket" / "model"
    assert sorted(p.name for p in metadata.iterdir()) == ["config.json"]
    full = storage.local_folder("gs://bucket/model")
    assert (full / "model.safetensors").read_bytes() == b"weights"
    storage.write_bytes("gs://bucket/model/model.safetensors", b"new weights")
    assert (storage.local_folder("gs://bucket/model") / "model.safetensors").read_bytes() == b"new weights"
    assert not storage.local_folder("gs://bucket/nothing").exists()


def test_data_sources_read_files_globs_and_folders_on_a_store(bucket):
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    storage.write_text("gs://bucket/data/a/part1.jsonl", "".join(json.dumps(r) + "\n" for r in records[:2]))
    storage.write_text("gs://bucket/data/a/part2.jsonl", json.dumps(records[2]) + "\n")
    storage.write_text("gs://bucket/data/a/notes.txt", "ignored in a folder")
    for path in ("gs://bucket/data/a", "gs://bucket/data/*/part*.jsonl"):
        assert [f.name for f in resolve_files(path)] == ["part1.jsonl", "part2.jsonl"]
        read = [(r, origin) for r, origin in iter_records(SourceSpec(path=path), [], "raise")]
        assert [r for r, _ in read] == records
        assert read[2][1] == "gs://bucket/data/a/part2.jsonl:1"
    with pytest.raises(JaxalignError, match="the glob matched no files"):
        resolve_files("gs://bucket/data/*.parquet")
    with pytest.raises(JaxalignError, match="not supported on object stores"):
        resolve_files("gs://bucket/**/*.jsonl")
    with pytest.raises(JaxalignError, match="file does not exist"):
        resolve_files("gs://bucket/data/missing.jsonl")


def test_tensorboard_events_reach_the_store(bucket):
    writer = storage.tensorboard_writer("gs://bucket/run/tensorboard")
    writer.add_scalar("train/loss", 1.5, 1)
    writer.close()
    events = list((bucket / "run" / "tensorboard").iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents") and events[0].stat().st_size > 40


def test_sft_run_with_data_output_and_export_on_a_store(bucket, monkeypatch, capsys):
    """Every file of the run goes to gs://bucket/run (orbax writes its checkpoint arrays to the same folder, here
    reached by its local path, since orbax's own gs:// support needs the real service, and completes a step with a
    commit file as it does on gs://); a rerun finds it finished; a longer one resumes; the export loads from gs://."""
    manager = ocp.CheckpointManager

    def on_bucket(directory, options, **kwargs):
        commit_file = ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)
        options = dataclasses.replace(options, atomicity_options=commit_file)
        return manager(LocalBucket.local(directory), options=options, **kwargs)

    monkeypatch.setattr(ocp, "CheckpointManager", on_bucket)
    records = [{"instruction": f"Say {i}", "output": f"{i} {i} {i}"} for i in range(16)]
    storage.write_text("gs://bucket/data/train.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    config = from_dict(SFTConfig, apply_overrides({
        "seed": 0, "output_dir": "gs://bucket/run", "model": {"config": {"preset": "tiny"}},
        "data": {"train": "gs://bucket/data/train.jsonl", "template": "plain", "tokenizer": "byte"},
        "train": {"batch_size": 8, "seq_len": 64, "log_every": 1, "steps": 3},
        "checkpoint": {"every": 2, "keep": 1, "async_save": False},
    }, []))
    assert train_sft(config) == 0
    run = bucket / "run"
    written = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert "config.yaml" in written and "metrics.jsonl" in written and "hf/model.safetensors" in written
    assert any(name.startswith("tensorboard/events.out.tfevents") for name in written)
    assert "checkpoints/3/commit_success.txt" in written
    assert not any(".partial" in name for name in written)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    capsys.readouterr()
    assert train_sft(config) == 0
    assert "already finished at step 3" in capsys.readouterr().out
    assert train_sft(dataclasses.replace(config, train=dataclasses.replace(config.train, steps=5))) == 0
    assert "resumed from gs://bucket/run/checkpoints/3 at step 3" in "".join(capsys.readouterr())
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    model, params = load_model("gs://bucket/run/hf")
    local_model, local_params = load_model(run / "hf")
    assert model.config == local_model.config
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(local_params), strict=True):
        np.testing.assert_array_equal(got, want)
