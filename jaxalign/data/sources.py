"""Reading sources into normalised examples.

Core: JSONL, JSON (a list of records), Parquet (pyarrow), CSV and TSV (a header row names the fields; every cell is
a string, an empty cell an empty string), globs and folders of those, locally or on an object store (`gs://`,
`s3://` through `jaxalign.storage`; a remote glob matches `*`, `?` and `[...]` within one folder level), and
`demo:NAME` (the datasets bundled in `jaxalign/demo_data`). Extras, imported only when used: `hf:NAME` (Hugging
Face `datasets`, a hub name or a local folder / builder such as `json`) and `tfds:NAME` (tensorflow-datasets'
`tfds.data_source`, random access over array_record files, no TensorFlow needed).

Every record carries its origin (`file:line`, `file: record i`, `hf:name[split] row i`) for error messages. With
`on_error='skip'` a bad record (malformed line, missing field, wrong type...) is skipped and reported instead; with
`blank_responses='skip'` a record whose response is blank (see `formats.BlankResponse`) is skipped and counted,
while other bad records still follow `on_error`.
"""

import csv
import glob as globlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from jaxalign import storage
from jaxalign.data.config import SourceSpec
from jaxalign.data.formats import BlankResponse, Example, IdenticalPair, detect_format, parse_record
from jaxalign.errors import JaxalignError

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_data"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}


@dataclass
class SourceData:
    """The examples of one source, its detected format, the records skipped as `origin: reason`, and how many of
    those were skipped for a blank response and as a pair with identical answers."""

    spec: SourceSpec
    format: str
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)
    blank: int = 0
    identical: int = 0


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
    if storage.is_remote(path):
        return _remote_files(path)
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise JaxalignError(f"data source {path}: the glob matched no files")
        for file in files:
            _check_suffix(file)
        return files
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in FILE_SUFFIXES and f.is_file())
        if not files:
            raise JaxalignError(f"data source {path}: the folder has no {', '.join(FILE_SUFFIXES)} files")
        return files
    if not p.is_file():
        raise JaxalignError(f"data source {path}: file does not exist")
    _check_suffix(p)
    return [p]


def _remote_files(path: str) -> list:
    """`resolve_files` for a `gs://` / `s3://` path, glob or folder."""
    parts = path.split("/")
    first = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*?[")), None)
    if first is not None:
        if "**" in path:
            raise JaxalignError(f"data source {path}: '**' globs are not supported on object stores; name each "
                                "folder level with '*'")
        files = [f for f in storage.location("/".join(parts[:first])).glob("/".join(parts[first:])) if f.is_file()]
        if not files:
            raise JaxalignError(f"data source {path}: the glob matched no files")
    else:
        files = storage.files_under(path)
        if files:
            files = [f for f in files if f.suffix.lower() in FILE_SUFFIXES]
            if not files:
                raise JaxalignError(f"data source {path}: the folder has no {', '.join(FILE_SUFFIXES)} files")
        elif storage.location(path).is_file():
            files = [storage.location(path)]
        else:
            raise JaxalignError(f"data source {path}: file does not exist")
    for file in files:
        _check_suffix(file)
    return sorted(files, key=str)


def _text(path, newline: str | None = None, encoding: str = "utf-8"):
    """The file at `path` (local or remote) opened as text."""
    return io.TextIOWrapper(storage.location(path).open("rb"), encoding=encoding, newline=newline)


def _check_suffix(file: Path):
    if file.suffix.lower() not in FILE_SUFFIXES:
        kind = f"'{file.suffix}' files" if file.suffix else "files without an extension"
        raise JaxalignError(
            f"data source {file}: cannot read {kind}; supported: {', '.join(FILE_SUFFIXES)} files, or "
            "demo:NAME, hf:NAME, tfds:NAME"
        )


def iter_records(spec: SourceSpec, skipped: list[str], on_error: str):
    """Yields `(record, origin)`; unreadable records raise, or are appended to `skipped` with `on_error='skip'`."""
    if spec.path.startswith("hf:"):
        yield from _hf_records(spec)
        return
    if spec.path.startswith("tfds:"):
        yield from _tfds_records(spec)
        return
    for path in resolve_files(spec.path):
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            yield from _parquet_records(path)
        elif suffix == ".json":
            yield from _json_records(path)
        elif suffix in CSV_DELIMITERS:
            yield from _csv_records(path, CSV_DELIMITERS[suffix], skipped, on_error)
        else:
            yield from _jsonl_records(path, skipped, on_error)


def _jsonl_records(path: Path, skipped: list[str], on_error: str):
    with _text(path) as f:
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


def _csv_records(path: Path, delimiter: str, skipped: list[str], on_error: str):
    """Rows of a CSV / TSV file with a header row, as `{column: cell}` records of strings; a row's origin is the
    line it starts on (quoted cells may span lines). A row with more or fewer cells than the header is a bad record."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with _text(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise JaxalignError(f"{path}: empty file; expected a header row naming the fields")
            duplicates = sorted({name for name in header if header.count(name) > 1})
            if duplicates:
                raise JaxalignError(f"{path}:1: the header names columns {duplicates} more than once")
            start = reader.line_num + 1
            for row in reader:
                origin = f"{path}:{start}"
                start = reader.line_num + 1
                if not any(row):
                    continue
                if len(row) != len(header):
                    message = (f"{origin}: expected {len(header)} cells ({', '.join(header)}), got {len(row)}; "
                               "quote cells that hold the delimiter")
                    if on_error == "raise":
                        raise JaxalignError(message)
                    skipped.append(message)
                    continue
                yield dict(zip(header, row)), origin
        except csv.Error as err:
            raise JaxalignError(f"{path}:{reader.line_num}: malformed CSV: {err}") from None
        except UnicodeDecodeError as err:
            raise JaxalignError(f"{path}: not UTF-8 text: {err}") from None


def _parquet_records(path: Path):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise JaxalignError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None

    try:
        with storage.location(path).open("rb") as handle:
            table = pyarrow.parquet.read_table(handle)
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


def load_source(spec: SourceSpec, default_format: str = "auto", on_error: str = "raise",
                blank_responses: str = "error") -> SourceData:
    """Reads and parses every record of one source (format auto-detected from its first readable record).

    `on_error` ("raise" | "skip"): what a bad record does; `blank_responses` ("error" | "skip"): whether a record
    whose response is blank is a bad record or is skipped and counted in `SourceData.blank`. A preference pair with
    identical answers is always skipped and counted in `SourceData.identical`.
    """
    fmt = spec.format or default_format
    skipped: list[str] = []
    examples: list[Example] = []
    blank = identical = 0
    for record, origin in iter_records(spec, skipped, on_error):
        try:
            if fmt == "auto":
                fmt = detect_format(record, origin)
            examples.append(parse_record(record, fmt, origin))
        except IdenticalPair as err:
            skipped.append(err.brief())
            identical += 1
        except BlankResponse as err:
            if blank_responses == "skip":
                skipped.append(err.brief())
                blank += 1
            elif on_error == "raise":
                raise
            else:
                skipped.append(str(err))
        except JaxalignError as err:
            if on_error == "raise":
                raise
            skipped.append(str(err))
        if spec.limit is not None and len(examples) >= spec.limit:
            break
    if not examples:
        detail = f" ({len(skipped)} skipped, first: {skipped[0]})" if skipped else ""
        raise JaxalignError(f"data source {spec.path}: no usable records{detail}")
    return SourceData(spec, fmt, examples, skipped, blank, identical)
