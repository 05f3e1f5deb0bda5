"""Chat templates: a conversation -> a list of `Segment`s (text pieces that know whether they are response text).

Built-ins reproduce the recipes (`RECIPES.md`) exactly; `render_text` joins the segments into the exact string.
Special tokens (bos, eos, LIMA's end-of-turn, chatml's ⟨s⟩ ⟨e⟩) are their own segments and must each be one token
of the tokenizer (`data.added_tokens` adds them). Segment boundaries sit before a space, after a newline or at a
special token, where tokenizers split anyway (see `tokenizer.py`).

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
bos token and `data.add_bos` is on, unless the template opens with that very token (a tokenizer whose bos is
`<|im_start|>` gets no second one before chatml's). The orca layout is the one of the public Orca reproductions
(the paper does not publish a string); gpt4all and plain put a system message first, as shown. Chat templates
without an input slot show alpaca's `input` / dolly's `context` after the instruction, separated by a blank line.

`chat_template` writes each built-in as a Jinja chat template (for `tokenizer_config.json`) that renders the same
string for `messages` (`{role, content}` dicts, optionally `context` on a user message) as `render` does for the
conversation, and ends with the assistant header when `add_generation_prompt` is set, so transformers'
`apply_chat_template` and other servers prompt a trained model in its own format.

`tokenizer` renders with the tokenizer's own `chat_template` (transformers `apply_chat_template`): a message's text
is the difference between rendering the dialogue up to it and up to the message before; an assistant message's
header (the generation prompt) is prompt, its text up to and including the first special token after its content
(the end of its turn) is response, and what follows that token (chatml's newline) is prompt. The template must
render dialogue prefixes as prefixes of the whole dialogue (all common chat templates do); if not, an error says so.
"""

from dataclasses import dataclass

from jaxalign.data.formats import Conversation, Message, PreferencePair, Prompt, Text, UnpairedExample
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
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ORCA_SYSTEM = "You are an AI assistant that follows instruction extremely well. Help as much as you can."

TEMPLATES = (
    "tokenizer", "alpaca", "dolly", "vicuna_v1.1", "koala", "llama2_chat", "chatml", "orca", "lima", "gpt4all", "plain"
)
BUILTIN_TEMPLATES = TEMPLATES[1:]

# The fixed text a template opens with (llama2_chat: every turn); a bos token it starts with is not added again.
_OPENINGS = {"koala": "BEGINNING OF CONVERSATION: ", "llama2_chat": "[INST] ", "chatml": IM_START}


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
    """The tokenizer's bos (None when `add_bos` is off or it has none) and eos, and LIMA's end-of-turn `eot`."""
    if tokenizer.eos_token is None:
        raise JaxalignError("the tokenizer has no eos token; templates end answers with it")
    bos = tokenizer.bos_token if add_bos else None
    return SpecialTokens(bos=bos, eos=tokenizer.eos_token, eot=eot)


def template_tokens(template: str, tokens: SpecialTokens) -> SpecialTokens:
    """`tokens` as `template` uses them: without a bos that the template's own opening already starts with."""
    if tokens.bos and _OPENINGS.get(template, "").startswith(tokens.bos):
        return SpecialTokens(bos=None, eos=tokens.eos, eot=tokens.eot)
    return tokens


def end_of_turn(template: str, tokens: SpecialTokens, tokenizer=None) -> str:
    """The token string that ends an answer in `template`: chatml's `<|im_end|>`, lima's eot, eos for the other
    built-ins; for `tokenizer`, the special token its chat template puts after an answer (eos if it puts none, or
    if it cannot render a user turn and an answer as the data pipeline does)."""
    if template == "tokenizer":
        probe = Conversation((Message("user", "Hi"), Message("assistant", "Hello")), "end-of-turn probe")
        try:
            segments = render(probe, template, tokens, tokenizer=tokenizer)
        except JaxalignError:
            return tokens.eos
        answer = render_text([s for s in segments if s.response])
        ends = [t for t in tokenizer.all_special_tokens if t and answer.endswith(t)]
        return max(ends, key=len) if ends else tokens.eos
    return {"chatml": IM_END, "lima": tokens.eot}.get(template, tokens.eos)


@dataclass(frozen=True)
class ChatFormat:
    """How a trained model is prompted: `template`, a Jinja chat template (None: the tokenizer's own), and
    `end_of_turn`, the token string that ends its answers (generation stops there)."""

    template: str | None
    end_of_turn: str


def chat_format(data, tokenizer) -> ChatFormat:
    """The format a model trained on `data` (a `DataConfig`: template, add_bos, eot_token, system_message) with
    `tokenizer` answers in, for its export."""
    tokens = special_tokens(tokenizer, data.add_bos, data.eot_token)
    if data.template != "tokenizer":
        return ChatFormat(chat_template(data.template, tokens, data.system_message), end_of_turn(data.template, tokens))
    return ChatFormat(None, end_of_turn("tokenizer", tokens, tokenizer))


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
    elif isinstance(example, UnpairedExample):
        raise JaxalignError(f"{example.origin}: render an unpaired example with render_unpaired")
    else:
        raise TypeError(f"cannot render {type(example).__name__}")
    system, dialogue = _split_system(messages, system_message)
    if template == "tokenizer":
        return _render_chat_template(system, dialogue, tokenizer, example.origin)
    return _BUILTINS[template](system, dialogue, template_tokens(template, tokens))


def render_pair(pair: PreferencePair, template: str, tokens: SpecialTokens, system_message=None, tokenizer=None):
    """(chosen segments, rejected segments); only the continuation after the shared prompt is `response`."""
    return _continuations(pair.prompt, (pair.chosen, pair.rejected), pair.origin, template, tokens, system_message,
                          tokenizer)


def render_unpaired(example: UnpairedExample, template: str, tokens: SpecialTokens, system_message=None,
                    tokenizer=None):
    """(completion segments, mismatched segments): the prompt continued by its own completion and by the
    `mismatched` one (KTO's reference point), as `render_pair` renders a pair."""
    if not example.mismatched:
        raise JaxalignError(f"{example.origin}: the unpaired example has no mismatched completion (the loader sets it)")
    return _continuations(example.prompt, (example.completion, example.mismatched), example.origin, template, tokens,
                          system_message, tokenizer)


def _continuations(prompt, continuations, origin, template, tokens, system_message, tokenizer):
    """The segments of `prompt` + each continuation; only the continuation after the prompt is `response`."""
    prompt_turns = sum(m.role == "assistant" for m in prompt)
    out = []
    for continuation in continuations:
        segments = render(Conversation(prompt + continuation, origin), template, tokens, system_message, tokenizer)
        out.append([Segment(s.text, s.response and s.turn >= prompt_turns, s.turn, s.special) for s in segments])
    return tuple(out)


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

    def block(role: str, text: str):
        b.special(IM_START, False)
        b.prompt(f"{role}\n{text}")
        b.special(IM_END, False)
        b.prompt("\n")

    if system:
        block("system", system)
    for user, answer in _pairs(dialogue):
        block("user", user.text())
        b.special(IM_START, False)
        b.prompt("assistant\n")
        if answer is not None:
            b.response(answer.content)
            b.special(IM_END, True)
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

    specials = [t for t in tokenizer.all_special_tokens if t]
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
        text = full[len(rendered) :]
        if message["role"] == "assistant":
            end = _answer_end(text, message["content"], specials)
            segments.append(Segment(text[:end], True, turn))
            turn += 1
            segments.append(Segment(text[end:], False, turn))
        else:
            segments.append(Segment(text, False, turn))
        rendered = full
    if messages and messages[-1]["role"] == "user":
        header = apply(len(messages), True)
        _check_prefix(rendered, header, origin)
        segments.append(Segment(header[len(rendered) :], False, turn))
    return [s for s in segments if s.text]


def _answer_end(text: str, content: str, specials: list[str]) -> int:
    """Length of the answer in an assistant message's rendered `text`: up to and including the first special token
    after its content (the end of its turn); all of `text` when no special token follows."""
    content = content.strip()
    at = text.find(content) if content else -1
    after = at + len(content) if at >= 0 else 0
    found = [(i, -len(t)) for t in specials if (i := text.find(t, after)) >= 0]
    if not found:
        return len(text)
    i, minus_length = min(found)
    return i - minus_length


def _check_prefix(prefix: str, text: str, origin: str):
    if not text.startswith(prefix):
        raise JaxalignError(
            f"{origin}: the tokenizer's chat_template does not render a dialogue prefix as a prefix of the longer "
            "dialogue, so the trained spans cannot be found; choose a built-in template"
        )


def chat_template(template: str, tokens: SpecialTokens, system_message: str | None = None) -> str:
    """The built-in `template` as a Jinja chat template with `tokens` and the default system message
    (`system_message`, else the template's own) written in: for `messages` and `add_generation_prompt` it renders
    what `render` renders for the conversation, or for the `Prompt` (ending with the assistant header).

    Raises `JaxalignError` for `tokenizer` (its template is the tokenizer's own) and unknown names.
    """
    if template not in BUILTIN_TEMPLATES:
        raise JaxalignError(f"no built-in template {template!r}; expected one of {', '.join(BUILTIN_TEMPLATES)}")
    tokens = template_tokens(template, tokens)
    bos = _quote(tokens.bos or "")
    eos = _quote(tokens.eos)
    text = "m.content + ('\\n\\n' + m.context if m.context is defined and m.context else '')"
    context = "m.context is defined and m.context"
    defaults = {"dolly": DOLLY_SYSTEM, "vicuna_v1.1": VICUNA_SYSTEM, "orca": ORCA_SYSTEM}
    default = system_message if system_message is not None else defaults.get(template)
    prelude = (
        "{% if messages and messages[0].role == 'system' %}{% set system = messages[0].content %}"
        "{% set dialogue = messages[1:] %}{% else %}"
        f"{{% set system = {'none' if default is None else _quote(default)} %}}{{% set dialogue = messages %}}"
        "{% endif %}"
    )
    if template == "alpaca" and system_message is None:
        prelude += (
            "{% if system is none %}{% if dialogue and dialogue[0].context is defined and dialogue[0].context %}"
            f"{{% set system = {_quote(ALPACA_INPUT_SYSTEM)} %}}{{% else %}}"
            f"{{% set system = {_quote(ALPACA_SYSTEM)} %}}"
            "{% endif %}{% endif %}"
        )
    first, user, header, answer = {
        "alpaca": (
            "{% if system %}{{ system + '\\n\\n' }}{% endif %}",
            "{{ '### Instruction:\\n' + m.content + '\\n\\n' }}"
            f"{{% if {context} %}}{{{{ '### Input:\\n' + m.context + '\\n\\n' }}}}{{% endif %}}",
            "'### Response:\\n'", f"m.content + {eos}",
        ),
        "dolly": (
            "{% if system %}{{ system + '\\n' }}{% endif %}",
            f"{{{{ '### Instruction:\\n' + m.content + ('\\n' + m.context if {context} else '') + '\\n' }}}}",
            "'### Response:\\n'", f"m.content + {eos}",
        ),
        "vicuna_v1.1": (
            "{% if system %}{{ system + ' ' }}{% endif %}", f"{{{{ 'USER: ' + {text} + ' ' }}}}", "'ASSISTANT:'",
            f"' ' + m.content + {eos}",
        ),
        "koala": (
            "{{ 'BEGINNING OF CONVERSATION: ' }}{% if system %}{{ system + ' ' }}{% endif %}",
            f"{{{{ 'USER: ' + {text} + ' ' }}}}", "'GPT:'", f"m.content + {eos}",
        ),
        "llama2_chat": (
            "",
            f"{{{{ {bos} + '[INST] ' }}}}{{% if loop.first and system %}}{{{{ '<<SYS>>\\n' + system + "
            f"'\\n<</SYS>>\\n\\n' }}}}{{% endif %}}{{{{ {text} + ' ' }}}}",
            "'[/INST]'", f"' ' + m.content + ' ' + {eos}",
        ),
        "chatml": (
            "", f"{{{{ '<|im_start|>user\\n' + {text} + '<|im_end|>\\n' }}}}", "'<|im_start|>assistant\\n'",
            "m.content + '<|im_end|>\\n'",
        ),
        "orca": (
            "{% if system %}{{ '### System:\\n' + system + '\\n\\n' }}{% endif %}",
            f"{{{{ '### User:\\n' + {text} + '\\n\\n' }}}}", "'### Response:\\n'", f"m.content + {eos}",
        ),
        "lima": ("", f"{{{{ {text} + {_quote(tokens.eot)} }}}}", "''", f"m.content + {_quote(tokens.eot)}"),
        "gpt4all": ("{% if system %}{{ system + '\\n' }}{% endif %}", f"{{{{ {text} + '\\n' }}}}", "''",
                    f"m.content + {eos}"),
        "plain": ("{% if system %}{{ system + '\\n\\n' }}{% endif %}", f"{{{{ {text} + '\\n\\n' }}}}", "''",
                  f"m.content + {eos}"),
    }[template]
    later = {"alpaca": "{{ '\\n\\n' }}", "dolly": "{{ '\\n' }}", "orca": "{{ '\\n\\n' }}"}.get(template, "")
    opening = {
        "chatml": "{% if system %}{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{% endif %}",
        "lima": f"{{% if system %}}{{{{ system + {_quote(tokens.eot)} }}}}{{% endif %}}",
    }.get(template, "")
    start = "" if template == "llama2_chat" else f"{{{{ {bos} }}}}"
    return (
        f"{prelude}{start}{opening}{{% for m in dialogue %}}{{% if m.role == 'user' %}}"
        f"{{% if loop.first %}}{first}{{% else %}}{later}{{% endif %}}{user}"
        f"{{% else %}}{{{{ {header} + {answer} }}}}{{% endif %}}{{% endfor %}}"
        f"{{% if add_generation_prompt %}}{{{{ {header} }}}}{{% endif %}}"
    )


def _quote(text: str) -> str:
    """`text` as a Jinja string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return f"'{escaped}'"


def prompt_template(tokenizer, name: str | None = None) -> int:
    """Makes `tokenizer` prompt in built-in template `name` as `data.template: NAME` trains with its defaults (the
    tokenizer's bos, the template's default system message, LIMA's `<|eot|>`), or keeps its own chat template
    (`name` None). Returns the id of the template's end-of-turn token, where generation stops.

    Raises `JaxalignError` when `name` is None and the tokenizer has no chat template, or when the tokenizer lacks
    a token the template needs.
    """
    if name is None and not getattr(tokenizer, "chat_template", None):
        raise JaxalignError(
            "the tokenizer has no chat template; prompt in a built-in one with --template NAME "
            f"({', '.join(BUILTIN_TEMPLATES)}) or in plain text with --no-chat-template"
        )
    tokens = special_tokens(tokenizer, True, "<|eot|>")
    if name is not None:
        tokenizer.chat_template = chat_template(name, tokens)
    end = end_of_turn(name or "tokenizer", tokens, tokenizer)
    vocab = tokenizer.get_vocab()
    needed = {end, IM_START} if name == "chatml" else {end}
    missing = sorted(t for t in needed if t not in vocab)
    if missing:
        raise JaxalignError(f"template {name}: the tokenizer has no token {missing[0]!r}, which the template needs")
    return vocab[end]
