"""Ghost Attention (GAtt; LLaMA-2-Chat, Touvron et al. 2023, §3.3): the data transform and the instruction checks.

A dialogue gets an instruction (a persona, a hobby, a language, a style; several combined at random). Its assistant
replies are sampled with the instruction appended to every user turn; the training example keeps the instruction in
the first user turn only, and the loss is zero on every token before the last assistant turn (earlier assistant
turns included; `data.mask: last_turn`). Trained on such examples a model keeps following an instruction it was
given once, at later turns where it no longer sees it next to the question.

An `Instruction` carries an optional programmatic `check` of a reply, so the effect can be measured:
`{"starts_with": "Ahoy!"}`, `{"ends_with": "Cheers!"}`, `{"contains": "chess"}` (case-insensitive, on the stripped
reply), `{"uppercase": true}` / `{"lowercase": true}` (every cased letter, and at least one). An instruction list
file is JSONL of `{"kind", "instruction", "check"?}` lines; `BUILTIN` is a small list in the spirit of the paper.
"""

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path

from jaxalign.errors import JaxalignError

CHECKS = ("starts_with", "ends_with", "contains", "uppercase", "lowercase")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One instruction: its `kind` (at most one of a kind in a combination), its `text`, and the `check` a reply
    that follows it passes (None: not checkable, e.g. a language)."""

    kind: str
    text: str
    check: dict | None = None


BUILTIN = (
    Instruction("persona", 'Act as a pirate: begin every answer with "Ahoy!"', {"starts_with": "Ahoy!"}),
    Instruction("persona", 'Act as a robot: begin every answer with "Beep."', {"starts_with": "Beep."}),
    Instruction("persona", 'Act as a cowboy: begin every answer with "Howdy!"', {"starts_with": "Howdy!"}),
    Instruction("hobby", "You love chess: mention chess in every answer.", {"contains": "chess"}),
    Instruction("hobby", "You love gardening: mention gardening in every answer.", {"contains": "gardening"}),
    Instruction("hobby", "You love tennis: mention tennis in every answer.", {"contains": "tennis"}),
    Instruction("style", "Answer in capital letters only.", {"uppercase": True}),
    Instruction("style", 'End every answer with "Cheers!"', {"ends_with": "Cheers!"}),
    Instruction("style", "Answer in lowercase letters only.", {"lowercase": True}),
    Instruction("language", "Always answer in French."),
    Instruction("language", "Always answer in Spanish."),
    Instruction("language", "Always answer in German."),
)


def load_instructions(spec: str) -> tuple[Instruction, ...]:
    """`builtin` (`BUILTIN`) or a JSONL file of `{"kind", "instruction", "check"?}` lines. Raises `JaxalignError`
    naming `file:line` for a bad line."""
    if spec == "builtin":
        return BUILTIN
    path = Path(spec)
    if not path.is_file():
        raise JaxalignError(f"config key 'gatt.instructions': {spec} is not a file (or 'builtin')")
    out = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise JaxalignError(f"{where}: not JSON ({error})") from None
        if not (isinstance(record, dict) and isinstance(record.get("kind"), str)
                and isinstance(record.get("instruction"), str) and record["instruction"].strip()):
            raise JaxalignError(f"{where}: expected {{\"kind\": str, \"instruction\": str, \"check\": ...}}")
        check = record.get("check")
        if check is not None and not (isinstance(check, dict) and check and set(check) <= set(CHECKS)):
            raise JaxalignError(f"{where}: 'check' must be null or an object with keys among {', '.join(CHECKS)}")
        out.append(Instruction(record["kind"], record["instruction"], check))
    if not out:
        raise JaxalignError(f"{path}: no instructions")
    return tuple(out)


def combine(rng: random.Random, instructions: Sequence[Instruction], most: int) -> tuple[Instruction, ...]:
    """1 to `most` instructions of different kinds, drawn at random with `rng`."""
    by_kind: dict[str, list[Instruction]] = {}
    for instruction in instructions:
        by_kind.setdefault(instruction.kind, []).append(instruction)
    kinds = rng.sample(sorted(by_kind), rng.randint(1, min(most, len(by_kind))))
    return tuple(rng.choice(by_kind[kind]) for kind in kinds)


def text_of(combination: Sequence[Instruction]) -> str:
    """The combined instruction as one text."""
    return " ".join(instruction.text for instruction in combination)


def checkable(combination: Sequence[Instruction]) -> bool:
    return any(instruction.check for instruction in combination)


def follows(reply: str, combination: Sequence[Instruction]) -> bool:
    """Whether `reply` passes every check of the combination (an instruction without a check passes)."""
    text = reply.strip()
    for instruction in combination:
        for name, value in (instruction.check or {}).items():
            if not _passes(text, name, value):
                return False
    return True


def _passes(text: str, name: str, value) -> bool:
    lower = text.lower()
    if name == "starts_with":
        return lower.startswith(str(value).lower())
    if name == "ends_with":
        return lower.endswith(str(value).lower())
    if name == "contains":
        return str(value).lower() in lower
    cased = [c for c in text if c.isalpha() and c.lower() != c.upper()]
    if name == "uppercase":
        return bool(cased) and all(c.isupper() for c in cased) == bool(value)
    if name == "lowercase":
        return bool(cased) and all(c.islower() for c in cased) == bool(value)
    raise JaxalignError(f"unknown instruction check {name!r}; expected one of {', '.join(CHECKS)}")


def with_instruction(message: dict, instruction: str) -> dict:
    """A user message with the instruction appended to its content (as GAtt concatenates it)."""
    return {**message, "content": f"{message['content']} {instruction}"}


def sampling_prompt(messages: Sequence[dict], replies: Sequence[str], instruction: str, every_turn: bool) -> list[dict]:
    """The chat to sample the assistant's reply to user turn `len(replies) + 1` of `messages` (a dialogue
    `[system?], user, assistant, user, ...`): the dialogue up to that user turn with `replies` as the assistant's
    earlier answers, and `instruction` appended to every user turn (`every_turn`, for sampling GAtt data) or to
    the first one only (for measuring whether the model keeps following it)."""
    out, users = [], 0
    for message in messages:
        if message["role"] == "system":
            out.append(dict(message))
        elif message["role"] == "user":
            if users == len(replies) + 1:
                break
            out.append(with_instruction(message, instruction) if users == 0 or every_turn else dict(message))
            users += 1
        elif users <= len(replies):
            out.append({"role": "assistant", "content": replies[users - 1]})
    if users != len(replies) + 1:
        raise ValueError(f"the dialogue has {users} user turns, no turn {len(replies) + 1} to answer")
    return out


def training_example(messages: Sequence[dict], replies: Sequence[str], instruction: str) -> dict:
    """The GAtt training record of a dialogue whose first `len(replies)` user turns were answered by `replies`:
    `{"messages": ...}` with the instruction in the first user turn only and the replies as the assistant turns,
    ending with the last reply (train it with `data.mask: last_turn`)."""
    prompt = sampling_prompt(messages, replies[:-1], instruction, every_turn=False)
    return {"messages": [*prompt, {"role": "assistant", "content": replies[-1]}]}


def user_turns(messages: Sequence[dict]) -> int:
    return sum(message["role"] == "user" for message in messages)
