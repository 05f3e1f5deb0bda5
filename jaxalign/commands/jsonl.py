"""Reading the JSONL files that commands take (prompts, texts to score, metrics), with errors naming file:line."""

import json
from pathlib import Path
from typing import Iterator

from jaxalign.errors import JaxalignError


def read_objects(path: Path, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) for each non-blank line of `path`; `what` names the file in errors."""
    if not path.is_file():
        raise JaxalignError(f"{what} {path} does not exist")
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise JaxalignError(f"{path}:{line_number}: not valid JSON: {err}") from None
        if not isinstance(record, dict):
            raise JaxalignError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        yield line_number, record
