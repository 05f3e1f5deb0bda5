"""One path type for everything jaxalign reads and writes: local folders and object stores (`gs://`, `s3://`).

`location(path)` gives an `etils.epath.Path`, the path type orbax checkpoints take: a local path is a plain file
path; `gs://bucket/key` goes through fsspec's `gcsfs` (`pip install 'jaxalign[gcs]'`; on a TPU VM the VM's service
account authenticates it) and `s3://` through `s3fs`. Object stores have neither renames nor appends, so:

- `write_text` / `write_bytes` replace a file in one step: locally a `.partial` file renamed into place, on an object
  store one upload, which is all-or-nothing. A crash never leaves half a file.
- `append_lines` appends locally and re-uploads the whole object on a store (metrics logs are small).
- `staged_folder(path)` is a local folder for libraries that only write local paths (Hugging Face `save_pretrained`,
  safetensors, tokenizers): the path itself when local, else a temporary folder uploaded to `path` on success.
- `replace_folder(finished, final)` moves a finished folder over `final`: a rename locally; on a store every object
  is copied, then `finished` removed (`final` is gone only from the copy's start to its end).
- `local_folder(path)` is a local copy to read with such libraries (model and tokenizer folders): the path itself
  when local, else a download into `JAXALIGN_CACHE` (default `~/.cache/jaxalign/remote/<scheme>/<bucket>/<key>`)
  that fetches only files missing there or of another size; `weights=False` fetches only the folder's own
  configuration and tokenizer files (what `jaxalign plan` and config checks read).
"""

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from etils import epath

REMOTE_PREFIXES = ("gs://", "s3://")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def location(path: str | os.PathLike) -> epath.Path:
    """`path` (local, `gs://` or `s3://`) as an `epath.Path`."""
    return epath.Path(path)


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names an object in a store (`gs://`, `s3://`) rather than a local file."""
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def write_bytes(path: str | os.PathLike, data: bytes) -> epath.Path:
    """Replaces the file at `path` with `data` in one step (creating its folder); returns the path."""
    target = location(path)
    if is_remote(target):
        target.write_bytes(data)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / (target.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, target)
    return target


def write_text(path: str | os.PathLike, text: str) -> epath.Path:
    """Replaces the file at `path` with UTF-8 `text` in one step (creating its folder); returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def append_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Appends `lines` (each without its newline) to the text file at `path`, creating it and its folder."""
    target = location(path)
    text = "".join(line + "\n" for line in lines)
    if is_remote(target):
        before = target.read_text(encoding="utf-8") if target.exists() else ""
        target.write_text(before + text, encoding="utf-8")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(text)


def files_under(folder: str | os.PathLike) -> list[epath.Path]:
    """Every file below `folder` (any depth), sorted; [] when it is missing."""
    root = location(folder)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        found.extend(files_under(child) if child.is_dir() else [child])
    return sorted(found, key=os.fspath)


def relative(path: epath.Path, folder: epath.Path) -> str:
    """`path`'s part below `folder` (`a/b.json`)."""
    return os.fspath(path)[len(os.fspath(folder).rstrip("/")) + 1:]


def copy_folder(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies every file below `source` to the same place below `target` (local or remote, either way)."""
    source, target = location(source), location(target)
    if not (is_remote(source) or is_remote(target)):
        shutil.copytree(source, target, dirs_exist_ok=True)
        return
    for file in files_under(source):
        destination = target / relative(file, source)
        if not is_remote(destination):
            destination.parent.mkdir(parents=True, exist_ok=True)
        with file.open("rb") as src, destination.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)


def remove_folder(path: str | os.PathLike) -> None:
    """Removes the folder (or file) at `path` with everything in it; nothing when it is missing."""
    target = location(path)
    if target.is_dir():
        target.rmtree()
    elif target.exists():
        target.unlink()


def replace_folder(finished: str | os.PathLike, final: str | os.PathLike) -> epath.Path:
    """Puts the complete folder `finished` in place of `final` (removing what `final` held); returns `final`."""
    finished, final = location(finished), location(final)
    remove_folder(final)
    if is_remote(final):
        copy_folder(finished, final)
        remove_folder(finished)
    else:
        os.replace(finished, final)
    return final


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A local folder whose files end up in `path`: `path` itself when local (created), else a temporary folder
    uploaded to `path` when the block ends without an exception."""
    target = location(path)
    if not is_remote(target):
        Path(target).mkdir(parents=True, exist_ok=True)
        yield Path(target)
        return
    with tempfile.TemporaryDirectory(prefix="jaxalign-stage-") as folder:
        yield Path(folder)
        copy_folder(folder, target)


def cache_root() -> Path:
    """Where `local_folder` keeps downloads: `$JAXALIGN_CACHE`, else `~/.cache/jaxalign/remote`."""
    return Path(os.environ.get("JAXALIGN_CACHE") or Path.home() / ".cache" / "jaxalign" / "remote")


def local_folder(path: str | os.PathLike, weights: bool = True) -> Path:
    """A local folder holding the files of the folder at `path`: `path` itself when local; for `gs://bucket/key`
    the folder `cache_root()/gs/bucket/key`, downloading the files that are missing there or differ in size (with
    `weights=False` only the files directly in the folder whose suffix is not in `WEIGHT_SUFFIXES`). A remote
    folder without files gives a local folder that does not exist."""
    source = location(path)
    if not is_remote(source):
        return Path(source)
    scheme, rest = os.fspath(source).split("://", 1)
    target = cache_root() / scheme / rest.strip("/")
    if weights:
        files = files_under(source)
    else:
        children = list(source.iterdir()) if source.is_dir() else []
        files = [f for f in children if f.suffix.lower() not in WEIGHT_SUFFIXES and not f.is_dir()]
    for file in files:
        copy = target / relative(file, source)
        if copy.is_file() and copy.stat().st_size == file.stat().length:
            continue
        copy.parent.mkdir(parents=True, exist_ok=True)
        partial = copy.with_name(copy.name + ".partial")
        with file.open("rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        os.replace(partial, copy)
    return target


class _StoreRecordWriter:
    """A tensorboardX record file on an object store: kept in memory and uploaded whole at every flush."""

    def __init__(self, path: str):
        self.path = path
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        write_bytes(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _StoreRecordWriterFactory:
    def open(self, path: str) -> _StoreRecordWriter:
        return _StoreRecordWriter(path)

    def directory_check(self, path: str) -> None:
        """Object stores need no folders."""


def tensorboard_writer(logdir: str | os.PathLike, purge_step: int | None = None):
    """A `tensorboardX.SummaryWriter` into `logdir`, local or on an object store (through `write_bytes`)."""
    from tensorboardX import SummaryWriter, record_writer

    for prefix in REMOTE_PREFIXES:
        record_writer.register_writer_factory(prefix.removesuffix("://"), _StoreRecordWriterFactory())
    return SummaryWriter(os.fspath(logdir), purge_step=purge_step)
