"""Reading sources into normalised examples.

Core: JSONL, JSON (a list of records), Parquet (pyarrow), globs and folders of those, and `demo:NAME` (the
datasets bundled in `jaxalign/demo_data`). Extras, imported only when used: `hf:NAME` (Hugging Face `datasets`,
a hub name or a local folder / builder such as `json`) and `tfds:NAME` (tensorflow-datasets' `tfds.data_source`,
random access over array_record files, no TensorFlow needed).

Every record carries its origin (`file:line`, `file: record i`, `hf:name[split] row i`) for error messages. With
`on_error='skip'` a bad record (malformed line, missing field, wrong type...) is skipped and reported instead.
"""

import glob as globlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from jaxalign.data.config import SourceSpec
from jaxalign.data.formats import Example, detect_format, parse_record
from jaxalign.errors import JaxalignError

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_data"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class SourceData:
    """The examples of one source, its detected format, and the records skipped as `origin: reason`."""

    spec: SourceSpec
    format: str
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)


def demo_path(name: str) -> Path:
    """The file of bundled demo dataset `name` (e.g. `instructions`)."""
    candidates = [DEMO_DIR / name, DEMO_DIR / f"{name}.jsonl"]
    for path in candidates:
        if path.is_file():
            return path
    names = sorted(p.stem for p in DEMO_DIR.glob("*.jsonl"))
    raise JaxalignError(f"data source 'demo:{name}': no such demo dataset; available: {', '.join(names)}")


def resolve_files(path: str) -> list[Path]:
    """The files of a path, glob or folder, sorted."""
    if path.startswith("demo:"):
        return [demo_path(path[len("demo:") :])]
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise JaxalignError(f"data source {path}: the glob matched no files")
        return files
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in FILE_SUFFIXES and f.is_file())
        if not files:
            raise JaxalignError(f"data source {path}: the folder has no {', '.join(FILE_SUFFIXES)} files")
        return files
    if not p.is_file():
        raise JaxalignError(f"data source {path}: file does not exist")
    return [p]


def iter_records(spec: SourceSpec, skipped: list[str], on_error: str):
    """Yields `(record, origin)`; unreadable records raise, or are appended to `skipped` with `on_error='skip'`."""
    if spec.path.startswith("hf:"):
        yield from _hf_records(spec)
        return
    if spec.path.startswith("tfds:"):
        yield from _tfds_records(spec)
        return
    for path in resolve_files(spec.path):
        if path.suffix == ".parquet":
            yield from _parquet_records(path)
        elif path.suffix == ".json":
            yield from _json_records(path)
        else:
            yield from _jsonl_records(path, skipped, on_error)


def _jsonl_records(path: Path, skipped: list[str], on_error: str):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            origin = f"{path}:{number}"
            try:
                yield json.loads(line), origin
            except json.JSONDecodeError as err:
                message = f"{origin}: malformed JSON: {err.msg} (column {err.colno})"
                if on_error == "raise":
                    raise JaxalignError(message) from None
                skipped.append(message)


def _json_records(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise JaxalignError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise JaxalignError(f"{path}: not UTF-8 text: {err}") from None
    if not isinstance(data, list):
        raise JaxalignError(f"{path}: a .json data file must hold a list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield record, f"{path}: record {i}"


def _parquet_records(path: Path):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise JaxalignError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None

    try:
        table = pyarrow.parquet.read_table(path)
    except pyarrow.ArrowException as err:
        raise JaxalignError(f"{path}: not a readable Parquet file: {err}") from None
    for i, record in enumerate(table.to_pylist()):
        yield record, f"{path}: row {i}"


def _hf_records(spec: SourceSpec):
    try:
        import datasets
    except ImportError:
        raise JaxalignError(
            f"data source {spec.path}: needs the Hugging Face `datasets` package: pip install 'jaxalign[hf-datasets]'"
        ) from None
    name = spec.path[len("hf:") :]
    try:
        dataset = datasets.load_dataset(name, spec.hf_config, split=spec.split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise JaxalignError(f"data source {spec.path} (split {spec.split!r}): {err}") from None
    for i, record in enumerate(dataset):
        yield record, f"{spec.path}[{spec.split}] row {i}"


def _tfds_records(spec: SourceSpec):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise JaxalignError(
            f"data source {spec.path}: needs tensorflow-datasets with array_record and grain: "
            "pip install 'jaxalign[tfds]'"
        ) from None
    name = spec.path[len("tfds:") :]
    try:
        source = tfds.data_source(name, split=spec.split, data_dir=spec.data_dir)
    except Exception as err:  # tfds raises its own and builder-specific exception types
        raise JaxalignError(f"data source {spec.path} (split {spec.split!r}): {err}") from None
    for i in range(len(source)):
        yield _decode_bytes(source[i]), f"{spec.path}[{spec.split}] row {i}"


def _decode_bytes(value):
    """tfds text features come back as bytes (or numpy bytes); records want str."""
    if isinstance(value, dict):
        return {k: _decode_bytes(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_decode_bytes(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "tolist"):
        return _decode_bytes(value.tolist())
    return value


def load_source(spec: SourceSpec, default_format: str = "auto", on_error: str = "raise") -> SourceData:
    """Reads and parses every record of one source (format auto-detected from its first readable record)."""
    fmt = spec.format or default_format
    skipped: list[str] = []
    examples: list[Example] = []
    for record, origin in iter_records(spec, skipped, on_error):
        try:
            if fmt == "auto":
                fmt = detect_format(record, origin)
            examples.append(parse_record(record, fmt, origin))
        except JaxalignError as err:
            if on_error == "raise":
                raise
            skipped.append(str(err))
        if spec.limit is not None and len(examples) >= spec.limit:
            break
    if not examples:
        detail = f" ({len(skipped)} skipped, first: {skipped[0]})" if skipped else ""
        raise JaxalignError(f"data source {spec.path}: no usable records{detail}")
    return SourceData(spec, fmt, examples, skipped)
