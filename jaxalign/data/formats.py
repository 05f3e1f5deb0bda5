"""Record formats -> normalised examples.

Every record becomes one of:
- `Conversation` (SFT): messages with roles system / user / assistant; alpaca's `input` and dolly's `context`
  stay separate (`Message.context`) so the alpaca and dolly templates can render them in their own slot.
- `Text` (`{"text": ...}`): trained as a whole.
- `PreferencePair`: a shared prompt, a chosen and a rejected continuation, `strength` (0 significantly better,
  1 better, 2 slightly better, 3 negligibly better / unsure, -1 not given) and `safety` (1 safety prompt, 0 not,
  -1 not given).
- `Prompt` (RL): prompt messages, an optional reference answer (`answer` / `reference` field) and `safety`.
- `UnpairedExample` (KTO): a prompt, one completion and whether it is desirable (`label`); the loader gives each
  example a `mismatched` completion, another example's, for KTO's reference point.

Formats: alpaca `{instruction, input?, output}`; dolly `{instruction, context?, response}`; sharegpt
`{conversations: [{from, value}], system?}` (from: human/user, gpt/assistant/chatgpt/bing/bard, system); messages
`{messages: [{role, content}], system?}`; completion `{prompt, completion}` (TRL's prompt-completion: the prompt a
string or messages ending with a user turn, the completion a string or assistant messages); preference `{prompt,
chosen, rejected, strength?, safety?}` where each of the first three is a string or a message list, or
LLaMA-Factory style `{conversations, chosen: {from, value},
rejected: {from, value}}` (strength and safety may also be text, as CSV cells are: "2", "true"; an empty string is
"not given"); hh `{chosen, rejected}` full Anthropic-HH texts ("\\n\\nHuman: ...\\n\\nAssistant: ..."); prompt
`{prompt}` or `{messages}` ending in a user turn; unpaired `{prompt, completion, label}` (TRL's unpaired
preference; prompt and completion each a string or a message list) or LLaMA-Factory's KTO shape `{messages,
label}` / `{conversations, label, system?}`, where the last (assistant) message is the completion and everything
before it the prompt (`label`: true / false, or text as CSV cells are: "true", "false", "1", "0"); text `{text}`.
Other fields are ignored. A pair may carry its own numeric `margin` (reward models use it instead of the table by
strength); a pair whose chosen and rejected answers are identical raises `IdenticalPair`, which the source reader
always skips and counts.

Errors name the record's origin (`file:line`) and the field. A blank response (empty or whitespace only) raises
`BlankResponse` in every format: alpaca `output`, dolly `response`, every assistant turn of a sharegpt or messages
conversation, chosen / rejected answers, the final answers of an hh pair, an unpaired completion, and `text`; the
source reader skips such records or stops at them (`data.blank_responses`).
"""

import math
from dataclasses import dataclass
from typing import Union

from jaxalign.errors import JaxalignError

class BlankResponse(JaxalignError):
    """A record whose response, the text it trains on, is empty or whitespace only: it would train nothing but
    the end-of-turn token."""

    def __init__(self, origin: str, name: str):
        self.origin = origin
        self.field = name
        super().__init__(
            f"{origin}: field '{name}' is a blank response (empty or whitespace only); fix the record, or set "
            "data.blank_responses=skip to skip such records"
        )

    def brief(self) -> str:
        """The origin and field, without the advice (for the list of skipped records)."""
        return f"{self.origin}: field '{self.field}' is a blank response"


class IdenticalPair(JaxalignError):
    """A preference pair whose chosen and rejected answers are the same: it carries no preference, so the source
    reader always skips and counts it (with a warning)."""

    def __init__(self, origin: str):
        self.origin = origin
        super().__init__(f"{origin}: chosen and rejected are identical")

    def brief(self) -> str:
        return str(self)


ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}

STRENGTHS = {
    "significantly better": 0,
    "better": 1,
    "slightly better": 2,
    "negligibly better": 3,
    "unsure": 3,
    "negligibly better or unsure": 3,
}


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    context: str = ""

    def text(self) -> str:
        """Content with the context appended (how chat templates without a context slot show it)."""
        return f"{self.content}\n\n{self.context}" if self.context else self.content


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    origin: str


@dataclass(frozen=True)
class Text:
    text: str
    origin: str


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    strength: int
    safety: int
    origin: str
    margin: float | None = None  # a record's own margin, in place of the table by strength


@dataclass(frozen=True)
class Prompt:
    messages: tuple[Message, ...]
    reference: str | None
    origin: str
    safety: int = -1  # 1 a safety prompt, 0 not, -1 not given (LLaMA-2's reward combination reads it)


@dataclass(frozen=True)
class UnpairedExample:
    prompt: tuple[Message, ...]
    completion: tuple[Message, ...]
    desirable: bool
    origin: str
    mismatched: tuple[Message, ...] = ()  # another example's completion (KTO's reference point), set by the loader


Example = Union[Conversation, Text, PreferencePair, Prompt, UnpairedExample]

FORMATS = ("alpaca", "dolly", "sharegpt", "messages", "completion", "preference", "hh", "prompt", "unpaired", "text")


def detect_format(record, origin: str) -> str:
    """The format of a record from its keys."""
    if not isinstance(record, dict):
        raise JaxalignError(f"{origin}: expected a JSON object (a record), got {type(record).__name__}")
    keys = set(record)
    if "chosen" in keys and "rejected" in keys:
        if "prompt" in keys or "conversations" in keys or "messages" in keys:
            return "preference"
        return "hh"
    if "label" in keys and ("messages" in keys or "conversations" in keys or {"prompt", "completion"} <= keys):
        return "unpaired"
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "completion"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "instruction" in keys and "response" in keys:
        return "dolly"
    if "prompt" in keys:
        return "prompt"
    if "text" in keys:
        return "text"
    raise JaxalignError(
        f"{origin}: cannot detect the record format from its fields {sorted(keys)}; expected alpaca "
        "(instruction, output), dolly (instruction, response), sharegpt (conversations), messages, preference "
        "(prompt, chosen, rejected), hh (chosen, rejected), unpaired (prompt, completion, label), completion (prompt, "
        "completion), prompt or text; "
        "or set data.format"
    )


def parse_record(record, fmt: str, origin: str) -> Example:
    """The normalised example of one record in format `fmt`."""
    if not isinstance(record, dict):
        raise JaxalignError(f"{origin}: expected a JSON object (a record), got {type(record).__name__}")
    if fmt not in FORMATS:
        raise JaxalignError(f"{origin}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return _PARSERS[fmt](record, origin)


def _field(record: dict, name: str, origin: str, kind=str, required: bool = True, default=None):
    if name not in record or record[name] is None:
        if required:
            raise JaxalignError(f"{origin}: missing field '{name}'")
        return default
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise JaxalignError(f"{origin}: field '{name}' must be a {expected}, got {type(value).__name__}")
    return value


def _nonempty(text: str, name: str, origin: str) -> str:
    if not text.strip():
        raise JaxalignError(f"{origin}: field '{name}' is empty")
    return text


def _answer(text: str, name: str, origin: str) -> str:
    if not text.strip():
        raise BlankResponse(origin, name)
    return text


def _check_answers(messages: list[Message], name: str, content_key: str, origin: str):
    """Raises `BlankResponse` for the first blank assistant turn of `messages` (as read from field `name`)."""
    for i, message in enumerate(messages):
        if message.role == "assistant":
            _answer(message.content, f"{name}[{i}].{content_key}", origin)


def _alpaca(record: dict, origin: str) -> Conversation:
    instruction = _nonempty(_field(record, "instruction", origin), "instruction", origin)
    context = _field(record, "input", origin, required=False, default="")
    output = _answer(_field(record, "output", origin), "output", origin)
    return Conversation((Message("user", instruction, context), Message("assistant", output)), origin)


def _dolly(record: dict, origin: str) -> Conversation:
    instruction = _nonempty(_field(record, "instruction", origin), "instruction", origin)
    context = _field(record, "context", origin, required=False, default="")
    response = _answer(_field(record, "response", origin), "response", origin)
    return Conversation((Message("user", instruction, context), Message("assistant", response)), origin)


def _messages(items, name: str, origin: str, role_key: str, content_key: str) -> list[Message]:
    if not isinstance(items, list):
        raise JaxalignError(f"{origin}: field '{name}' must be a list of messages, got {type(items).__name__}")
    messages = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise JaxalignError(f"{origin}: field '{where}' must be an object with '{role_key}' and '{content_key}'")
        for key in (role_key, content_key):
            if key not in item:
                raise JaxalignError(f"{origin}: field '{where}' has no '{key}'")
        role, content = item[role_key], item[content_key]
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise JaxalignError(
                f"{origin}: field '{where}.{role_key}': unknown role {role!r}; expected one of "
                f"{', '.join(sorted(ROLE_ALIASES))}"
            )
        if not isinstance(content, str):
            kind = type(content).__name__
            raise JaxalignError(f"{origin}: field '{where}.{content_key}' must be a string, got {kind}")
        messages.append(Message(ROLE_ALIASES[role.lower()], content))
    return messages


def _with_system(record: dict, messages: list[Message], origin: str) -> list[Message]:
    system = _field(record, "system", origin, required=False, default="")
    if system and not (messages and messages[0].role == "system"):
        messages = [Message("system", system)] + messages
    return messages


def _check_dialogue(messages: list[Message], name: str, origin: str, final: str | None) -> tuple[Message, ...]:
    """Checks [system] user assistant user ... order; `final`: the role the dialogue must end with (after
    dropping trailing user turns when it must end with an assistant turn: they carry nothing to train)."""
    if not messages:
        raise JaxalignError(f"{origin}: field '{name}' is an empty conversation")
    body = messages[1:] if messages[0].role == "system" else messages
    if any(m.role == "system" for m in body):
        raise JaxalignError(f"{origin}: field '{name}': a system message is only allowed first")
    if final == "assistant":
        while body and body[-1].role == "user":
            body = body[:-1]
    if not body:
        raise JaxalignError(f"{origin}: field '{name}' has no {final or 'user'} turn")
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise JaxalignError(
                f"{origin}: field '{name}': turn {i + 1} is {message.role!r}, expected {expected!r} "
                "(turns alternate user, assistant, starting with user)"
            )
    if final is not None and body[-1].role != final:
        raise JaxalignError(f"{origin}: field '{name}' must end with a {final} turn, not {body[-1].role!r}")
    head = [messages[0]] if messages[0].role == "system" else []
    return tuple(head + body)


def _conversation(record: dict, name: str, role_key: str, content_key: str, origin: str) -> Conversation:
    turns = _messages(_field(record, name, origin, kind=list), name, origin, role_key, content_key)
    dialogue = _check_dialogue(_with_system(record, turns, origin), name, origin, "assistant")
    _check_answers(turns, name, content_key, origin)
    return Conversation(dialogue, origin)


def _sharegpt(record: dict, origin: str) -> Conversation:
    return _conversation(record, "conversations", "from", "value", origin)


def _openai_messages(record: dict, origin: str) -> Conversation:
    return _conversation(record, "messages", "role", "content", origin)


def _response(value, name: str, origin: str) -> tuple[Message, ...]:
    """A chosen / rejected value: a string, a {from, value} / {role, content} object, or a message list."""
    if isinstance(value, str):
        return (Message("assistant", _answer(value, name, origin)),)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise JaxalignError(f"{origin}: field '{name}' must be a string or messages, got {type(value).__name__}")
    sharegpt_style = bool(value) and isinstance(value[0], dict) and "from" in value[0]
    role_key, content_key = ("from", "value") if sharegpt_style else ("role", "content")
    messages = _messages(value, name, origin, role_key, content_key)
    if not messages:
        raise JaxalignError(f"{origin}: field '{name}' is an empty list of messages")
    if messages[-1].role != "assistant":
        raise JaxalignError(f"{origin}: field '{name}' must end with an assistant message")
    _check_answers(messages, name, content_key, origin)
    return tuple(messages)


def _strength(record: dict, origin: str) -> int:
    value = record.get("strength")
    if value is None or value == "":
        return -1
    if isinstance(value, str) and value.strip() in ("0", "1", "2", "3"):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
        return value
    if isinstance(value, str) and value.strip().lower() in STRENGTHS:
        return STRENGTHS[value.strip().lower()]
    raise JaxalignError(
        f"{origin}: field 'strength': expected 0-3 or one of {', '.join(repr(s) for s in STRENGTHS)}, got {value!r}"
    )


def _safety(record: dict, origin: str) -> int:
    value = record.get("safety")
    if value is None or value == "":
        return -1
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    if isinstance(value, bool):
        return int(value)
    raise JaxalignError(f"{origin}: field 'safety' must be true or false, got {value!r}")


def _prompt_messages(record: dict, origin: str) -> tuple[Message, ...]:
    if "prompt" in record:
        value = record["prompt"]
        if isinstance(value, str):
            messages = [Message("user", _nonempty(value, "prompt", origin))]
        else:
            messages = _messages(value, "prompt", origin, "role", "content")
        name = "prompt"
    elif "conversations" in record:
        messages = _messages(record["conversations"], "conversations", origin, "from", "value")
        name = "conversations"
    elif "messages" in record:
        messages = _messages(record["messages"], "messages", origin, "role", "content")
        name = "messages"
    else:
        raise JaxalignError(f"{origin}: missing field 'prompt'")
    return _check_dialogue(_with_system(record, messages, origin), name, origin, "user")


def _preference(record: dict, origin: str) -> PreferencePair:
    prompt = _prompt_messages(record, origin)
    for name in ("chosen", "rejected"):
        if name not in record:
            raise JaxalignError(f"{origin}: missing field '{name}'")
    chosen = _response(record["chosen"], "chosen", origin)
    rejected = _response(record["rejected"], "rejected", origin)
    if chosen == rejected:
        raise IdenticalPair(origin)
    return PreferencePair(prompt, chosen, rejected, _strength(record, origin), _safety(record, origin), origin,
                          _margin(record, origin))


def _margin(record: dict, origin: str) -> float | None:
    value = record.get("margin")
    if value is None or value == "":
        return None
    try:
        margin = float(value)
    except (TypeError, ValueError):
        raise JaxalignError(f"{origin}: field 'margin': expected a number, got {value!r}") from None
    if not math.isfinite(margin):
        raise JaxalignError(f"{origin}: field 'margin': expected a finite number, got {value!r}")
    return margin


def _label(record: dict, origin: str) -> bool:
    if "label" not in record or record["label"] is None:
        raise JaxalignError(f"{origin}: missing field 'label' (true for a desirable completion, false if not)")
    value = record["label"]
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        value = value.strip().lower() in ("true", "1")
    if isinstance(value, bool):
        return value
    raise JaxalignError(f"{origin}: field 'label' must be true or false (or \"true\", \"false\", \"1\", \"0\"), "
                        f"got {value!r}")


def _unpaired(record: dict, origin: str) -> UnpairedExample:
    desirable = _label(record, origin)
    if "prompt" in record and "completion" in record:
        prompt = _prompt_messages(record, origin)
        completion = _response(record["completion"], "completion", origin)
        return UnpairedExample(prompt, completion, desirable, origin)
    if "messages" in record:
        name, role_key, content_key = "messages", "role", "content"
    elif "conversations" in record:
        name, role_key, content_key = "conversations", "from", "value"
    else:
        raise JaxalignError(f"{origin}: missing field 'completion' (or 'messages' ending with the completion)")
    turns = _messages(_field(record, name, origin, kind=list), name, origin, role_key, content_key)
    dialogue = _check_dialogue(_with_system(record, turns, origin), name, origin, "assistant")
    if turns[-1].role != "assistant":
        raise JaxalignError(f"{origin}: field '{name}' must end with an assistant turn, the completion 'label' judges")
    _answer(turns[-1].content, f"{name}[{len(turns) - 1}].{content_key}", origin)
    return UnpairedExample(dialogue[:-1], dialogue[-1:], desirable, origin)


def _hh_dialogue(text: str, name: str, origin: str) -> list[Message]:
    """Splits "\\n\\nHuman: a\\n\\nAssistant: b..." into messages."""
    markers = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}
    messages: list[Message] = []
    rest = text
    if not rest.startswith("\n\nHuman:"):
        raise JaxalignError(f"{origin}: field '{name}' must start with '\\n\\nHuman:' (Anthropic-HH text)")
    while rest:
        marker = next(m for m in markers if rest.startswith(m))
        rest = rest[len(marker) :]
        ends = [i for i in (rest.find(m) for m in markers) if i >= 0]
        end = min(ends) if ends else len(rest)
        messages.append(Message(markers[marker], rest[:end].strip()))
        rest = rest[end:]
    return messages


def _hh(record: dict, origin: str) -> PreferencePair:
    chosen = _hh_dialogue(_field(record, "chosen", origin), "chosen", origin)
    rejected = _hh_dialogue(_field(record, "rejected", origin), "rejected", origin)
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1].role != "assistant":
            raise JaxalignError(f"{origin}: field '{name}' must end with an '\\n\\nAssistant:' turn")
    if chosen[:-1] != rejected[:-1]:
        raise JaxalignError(f"{origin}: fields 'chosen' and 'rejected' must share the dialogue before the last answer")
    prompt = _check_dialogue(chosen[:-1], "chosen", origin, "user")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        _answer(messages[-1].content, name, origin)
    if chosen[-1] == rejected[-1]:
        raise IdenticalPair(origin)
    return PreferencePair(
        prompt, (chosen[-1],), (rejected[-1],), _strength(record, origin), _safety(record, origin), origin,
        _margin(record, origin),
    )


def _prompt(record: dict, origin: str) -> Prompt:
    reference = record.get("answer", record.get("reference"))
    if reference is not None and not isinstance(reference, str):
        raise JaxalignError(f"{origin}: field 'answer' must be a string, got {type(reference).__name__}")
    return Prompt(_prompt_messages(record, origin), reference, origin, _safety(record, origin))


def _completion(record: dict, origin: str) -> Conversation:
    prompt = _prompt_messages(record, origin)
    return Conversation(prompt + _response(record["completion"], "completion", origin), origin)


def _text(record: dict, origin: str) -> Text:
    return Text(_answer(_field(record, "text", origin), "text", origin), origin)


_PARSERS = {
    "alpaca": _alpaca,
    "dolly": _dolly,
    "sharegpt": _sharegpt,
    "messages": _openai_messages,
    "completion": _completion,
    "preference": _preference,
    "hh": _hh,
    "prompt": _prompt,
    "unpaired": _unpaired,
    "text": _text,
}
