"""Chat templates: a conversation -> a list of `Segment`s (text pieces that know whether they are response text).

Built-ins reproduce the recipes (`RECIPES.md`) exactly; `render_text` joins the segments into the exact string.
Special tokens (bos, eos, LIMA's end-of-turn) are their own segments and become exactly one token id. Segment
boundaries sit before a space, after a newline or at a special token (see `tokenizer.py` for why).

| template | shape (user turns u, answers a; ⟨eos⟩ the tokenizer's eos; ⟨s⟩ `<|im_start|>`, ⟨e⟩ `<|im_end|>`) |
|---|---|
| alpaca | ⟨bos⟩{preamble}\\n\\n### Instruction:\\n{u}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n{a}⟨eos⟩ |
| dolly | ⟨bos⟩{preamble}\\n### Instruction:\\n{u}[\\n{context}]\\n### Response:\\n{a}⟨eos⟩ |
| vicuna_v1.1 | ⟨bos⟩{system} USER: {u} ASSISTANT: {a}⟨eos⟩USER: ... |
| koala | ⟨bos⟩BEGINNING OF CONVERSATION: USER: {u} GPT:{a}⟨eos⟩USER: ... |
| llama2_chat | ⟨bos⟩[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{u} [/INST] {a} ⟨eos⟩⟨bos⟩[INST] {u2} [/INST] ... |
| chatml | ⟨bos⟩[⟨s⟩system\\n{system}⟨e⟩\\n]⟨s⟩user\\n{u}⟨e⟩\\n⟨s⟩assistant\\n{a}⟨e⟩\\n |
| orca | ⟨bos⟩### System:\\n{system}\\n\\n### User:\\n{u}\\n\\n### Response:\\n{a}⟨eos⟩\\n\\n### User:\\n... |
| lima | ⟨bos⟩[{system}⟨eot⟩]{u}⟨eot⟩{a}⟨eot⟩{u2}⟨eot⟩... |
| gpt4all | ⟨bos⟩[{system}\\n]{u}\\n{a}⟨eos⟩{u2}\\n... |
| plain | ⟨bos⟩[{system}\\n\\n]{u}\\n\\n{a}⟨eos⟩{u2}\\n\\n... |

The response segments are `{a}` with the text the recipe glues to it (vicuna " {a}", llama2 " {a} ") and the end
token (eos, chatml's `<|im_end|>`, lima's eot); everything else is prompt. ⟨bos⟩ appears when the tokenizer has a
bos token and `data.add_bos` is on. The orca layout is the one of the public Orca reproductions (the paper does
not publish a string); gpt4all and plain put a system message first, as shown. Chat templates without an input
slot show alpaca's `input` / dolly's `context` after the instruction, separated by a blank line.

`tokenizer` renders with the tokenizer's own `chat_template` (transformers `apply_chat_template`): a message's text
is the difference between rendering the dialogue up to it and up to the message before; an assistant message's
header (the generation prompt) is prompt, the rest (content and end tokens) response. The template must render
dialogue prefixes as prefixes of the whole dialogue (all common chat templates do); if not, an error says so.
"""

from dataclasses import dataclass

from jaxalign.data.formats import Conversation, Message, PreferencePair, Prompt, Text
from jaxalign.errors import JaxalignError

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_INPUT_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
DOLLY_SYSTEM = ALPACA_SYSTEM
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ORCA_SYSTEM = "You are an AI assistant that follows instruction extremely well. Help as much as you can."

TEMPLATES = (
    "tokenizer", "alpaca", "dolly", "vicuna_v1.1", "koala", "llama2_chat", "chatml", "orca", "lima", "gpt4all", "plain"
)


@dataclass(frozen=True)
class Segment:
    """`text` (for a special segment: the token's string); `response`: part of an assistant answer; `turn`:
    index of the assistant turn it belongs to or precedes (0, 1, ...)."""

    text: str
    response: bool
    turn: int
    special: bool = False


@dataclass(frozen=True)
class SpecialTokens:
    bos: str | None
    eos: str
    eot: str


def special_tokens(tokenizer, add_bos: bool, eot: str) -> SpecialTokens:
    if tokenizer.eos_token is None:
        raise JaxalignError("the tokenizer has no eos token; templates end answers with it")
    bos = tokenizer.bos_token if add_bos else None
    return SpecialTokens(bos=bos, eos=tokenizer.eos_token, eot=eot)


def render_text(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments)


def render(example, template: str, tokens: SpecialTokens, system_message: str | None = None, tokenizer=None):
    """Segments of a `Conversation`, `Text` or `Prompt` (ends with the assistant header, ready to generate)."""
    if template not in TEMPLATES:
        raise JaxalignError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    if isinstance(example, Text):
        segments = [Segment(example.text, True, 0), Segment(tokens.eos, True, 0, special=True)]
        return ([Segment(tokens.bos, False, 0, special=True)] if tokens.bos else []) + segments
    if isinstance(example, (Conversation, Prompt)):
        messages = example.messages
    elif isinstance(example, PreferencePair):
        raise JaxalignError(f"{example.origin}: render a preference pair with render_pair")
    else:
        raise TypeError(f"cannot render {type(example).__name__}")
    system, dialogue = _split_system(messages, system_message)
    if template == "tokenizer":
        return _render_chat_template(system, dialogue, tokenizer, example.origin)
    return _BUILTINS[template](system, dialogue, tokens)


def render_pair(pair: PreferencePair, template: str, tokens: SpecialTokens, system_message=None, tokenizer=None):
    """(chosen segments, rejected segments); only the continuation after the shared prompt is `response`."""
    prompt_turns = sum(m.role == "assistant" for m in pair.prompt)
    out = []
    for continuation in (pair.chosen, pair.rejected):
        conversation = Conversation(pair.prompt + continuation, pair.origin)
        segments = render(conversation, template, tokens, system_message, tokenizer)
        out.append([Segment(s.text, s.response and s.turn >= prompt_turns, s.turn, s.special) for s in segments])
    return out[0], out[1]


def _split_system(messages: tuple[Message, ...], system_message: str | None):
    if messages and messages[0].role == "system":
        return messages[0].content, messages[1:]
    return system_message, messages


def _pairs(dialogue):
    """(user message, assistant message or None) per turn."""
    return [(dialogue[i], dialogue[i + 1] if i + 1 < len(dialogue) else None) for i in range(0, len(dialogue), 2)]


class _Builder:
    def __init__(self, tokens: SpecialTokens):
        self.tokens = tokens
        self.segments: list[Segment] = []
        self.turn = 0

    def prompt(self, text: str):
        if text:
            self.segments.append(Segment(text, False, self.turn))

    def response(self, text: str):
        if text:
            self.segments.append(Segment(text, True, self.turn))

    def special(self, token: str, response: bool):
        self.segments.append(Segment(token, response, self.turn, special=True))

    def bos(self):
        if self.tokens.bos:
            self.special(self.tokens.bos, False)

    def end_turn(self):
        self.turn += 1


def _alpaca(system, dialogue, tokens):
    b = _Builder(tokens)
    b.bos()
    first_context = dialogue[0].context if dialogue else ""
    preamble = system if system is not None else (ALPACA_INPUT_SYSTEM if first_context else ALPACA_SYSTEM)
    for i, (user, answer) in enumerate(_pairs(dialogue)):
        lead = (preamble + "\n\n" if preamble else "") if i == 0 else "\n\n"
        context = f"### Input:\n{user.context}\n\n" if user.context else ""
        b.prompt(f"{lead}### Instruction:\n{user.content}\n\n{context}### Response:\n")
        if answer is not None:
            b.response(answer.content)
            b.special(tokens.eos, True)
            b.end_turn()
    return b.segments


def _dolly(system, dialogue, tokens):
    b = _Builder(tokens)
    b.bos()
    preamble = system if system is not None else DOLLY_SYSTEM
    for i, (user, answer) in enumerate(_pairs(dialogue)):
        lead = (preamble + "\n" if preamble else "") if i == 0 else "\n"
        instruction = f"{user.content}\n{user.context}" if user.context else user.content
        b.prompt(f"{lead}### Instruction:\n{instruction}\n### Response:\n")
        if answer is not None:
            b.response(answer.content)
            b.special(tokens.eos, True)
            b.end_turn()
    return b.segments


def _vicuna(system, dialogue, tokens):
    b = _Builder(tokens)
    b.bos()
    system = VICUNA_SYSTEM if system is None else system
    for i, (user, answer) in enumerate(_pairs(dialogue)):
        lead = f"{system} " if i == 0 and system else ""
        b.prompt(f"{lead}USER: {user.text()} ASSISTANT:")
        if answer is not None:
            b.response(f" {answer.content}")
            b.special(tokens.eos, True)
            b.end_turn()
    return b.segments


def _koala(system, dialogue, tokens):
    b = _Builder(tokens)
    b.bos()
    for i, (user, answer) in enumerate(_pairs(dialogue)):
        lead = "BEGINNING OF CONVERSATION: " + (f"{system} " if system else "") if i == 0 else ""
        b.prompt(f"{lead}USER: {user.text()} GPT:")
        if answer is not None:
            b.response(answer.content)
            b.special(tokens.eos, True)
            b.end_turn()
    return b.segments


def _llama2_chat(system, dialogue, tokens):
    b = _Builder(tokens)
    for i, (user, answer) in enumerate(_pairs(dialogue)):
        b.bos()
        sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if i == 0 and system else ""
        b.prompt(f"[INST] {sys_block}{user.text()} [/INST]")
        if answer is not None:
            b.response(f" {answer.content} ")
            b.special(tokens.eos, True)
            b.end_turn()
    return b.segments


def _chatml(system, dialogue, tokens):
    b = _Builder(tokens)
    b.bos()
    if system:
        b.prompt(f"<|im_start|>system\n{system}<|im_end|>\n")
    for user, answer in _pairs(dialogue):
        b.prompt(f"<|im_start|>user\n{user.text()}<|im_end|>\n<|im_start|>assistant\n")
        if answer is not None:
            b.response(f"{answer.content}<|im_end|>")
            b.end_turn()
            b.prompt("\n")
    return b.segments


def _orca(system, dialogue, tokens):
    b = _Builder(tokens)
    b.bos()
    system = ORCA_SYSTEM if system is None else system
    for i, (user, answer) in enumerate(_pairs(dialogue)):
        lead = (f"### System:\n{system}\n\n" if system else "") if i == 0 else "\n\n"
        b.prompt(f"{lead}### User:\n{user.text()}\n\n### Response:\n")
        if answer is not None:
            b.response(answer.content)
            b.special(tokens.eos, True)
            b.end_turn()
    return b.segments


def _lima(system, dialogue, tokens):
    b = _Builder(tokens)
    b.bos()
    if system:
        b.prompt(system)
        b.special(tokens.eot, False)
    for user, answer in _pairs(dialogue):
        b.prompt(user.text())
        b.special(tokens.eot, False)
        if answer is not None:
            b.response(answer.content)
            b.special(tokens.eot, True)
            b.end_turn()
    return b.segments


def _separated(separator: str):
    """Templates that only join the (system +) prompt and the response with `separator`: gpt4all, plain."""

    def build(system, dialogue, tokens):
        b = _Builder(tokens)
        b.bos()
        for i, (user, answer) in enumerate(_pairs(dialogue)):
            lead = f"{system}{separator}" if i == 0 and system else ""
            b.prompt(f"{lead}{user.text()}{separator}")
            if answer is not None:
                b.response(answer.content)
                b.special(tokens.eos, True)
                b.end_turn()
        return b.segments

    return build


_BUILTINS = {
    "alpaca": _alpaca,
    "dolly": _dolly,
    "vicuna_v1.1": _vicuna,
    "koala": _koala,
    "llama2_chat": _llama2_chat,
    "chatml": _chatml,
    "orca": _orca,
    "lima": _lima,
    "gpt4all": _separated("\n"),
    "plain": _separated("\n\n"),
}


def _render_chat_template(system, dialogue, tokenizer, origin: str) -> list[Segment]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise JaxalignError(
            "config key 'data.template' is 'tokenizer' but the tokenizer has no chat_template; "
            "choose a built-in template (alpaca, vicuna_v1.1, chatml, ...)"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": m.role, "content": m.text()} for m in dialogue
    ]

    def apply(upto: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:  # jinja raises its own exception types for template-side errors
            raise JaxalignError(f"{origin}: the tokenizer's chat_template failed: {err}") from None

    segments: list[Segment] = []
    rendered = ""
    turn = 0
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = apply(i, True)
            _check_prefix(rendered, header, origin)
            segments.append(Segment(header[len(rendered) :], False, turn))
            rendered = header
        full = apply(i + 1, False)
        _check_prefix(rendered, full, origin)
        segments.append(Segment(full[len(rendered) :], message["role"] == "assistant", turn))
        rendered = full
        turn += message["role"] == "assistant"
    if messages and messages[-1]["role"] == "user":
        header = apply(len(messages), True)
        _check_prefix(rendered, header, origin)
        segments.append(Segment(header[len(rendered) :], False, turn))
    return [s for s in segments if s.text]


def _check_prefix(prefix: str, text: str, origin: str):
    if not text.startswith(prefix):
        raise JaxalignError(
            f"{origin}: the tokenizer's chat_template does not render a dialogue prefix as a prefix of the longer "
            "dialogue, so the trained spans cannot be found; choose a built-in template"
        )
