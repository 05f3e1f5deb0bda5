import json
import random
import re
from collections import Counter

import pytest

from jaxalign.data.config import SourceSpec
from jaxalign.data.sources import DEMO_DIR, load_source
from jaxalign.demo_data.generate import (CAPITALS, OPPOSITES, PLURALS, arithmetic, arithmetic_direct,
                                         arithmetic_scratchpad, render_all)

EXPECTED = {
    "instructions": ("alpaca", 480),
    "dialogues_sharegpt": ("sharegpt", 320),
    "dialogues_messages": ("messages", 320),
    "preferences": ("preference", 420),
    "prompts": ("prompt", 320),
    "arithmetic": ("prompt", 400),
    "arithmetic_sft": ("alpaca", 7200),
    "instruction_following": ("messages", 480),
    "preferences_safety": ("preference", 168),
}


def _records(name):
    return [json.loads(line) for line in (DEMO_DIR / f"{name}.jsonl").read_text().splitlines()]


def test_committed_files_equal_the_generator_output():
    rendered = render_all()
    assert sorted(rendered) == sorted(f"{name}.jsonl" for name in EXPECTED)
    for name, text in rendered.items():
        assert (DEMO_DIR / name).read_text() == text, f"{name} is stale: run python -m jaxalign.demo_data.generate"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_dataset_loads_in_its_format(name):
    data = load_source(SourceSpec(f"demo:{name}"))
    assert (data.format, len(data.examples)) == EXPECTED[name]
    assert not data.skipped


def _check_answer(instruction: str, given: str, output: str):
    """Recomputes the answer of a generated instruction and compares."""
    if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", instruction):
        a, op, b = int(m[1]), m[2], int(m[3])
        assert output == f"{a} {op} {b} = {eval(f'{a} {op} {b}')}."
    elif instruction == "Add the two numbers.":
        a, b = map(int, given.split(" and "))
        assert output == f"The sum is {a + b}."
    elif instruction == "Reverse the letters of the word.":
        assert output == given[::-1]
    elif instruction == "Write the word in capital letters.":
        assert output == given.upper()
    elif m := re.fullmatch(r'How many letters are in the word "(\w+)"\?', instruction):
        assert output == f'The word "{m[1]}" has {len(m[1])} letters.'
    elif m := re.fullmatch(r"What is the capital of (.+)\?", instruction):
        assert output == f"The capital of {m[1]} is {CAPITALS[m[1]]}."
    elif instruction == "Sort these words alphabetically.":
        assert output == ", ".join(sorted(given.split(", ")))
    elif instruction == "Give the plural of the noun.":
        assert output == PLURALS[given]
    elif m := re.fullmatch(r'What is the opposite of "(\w+)"\?', instruction):
        assert output == f'The opposite of "{m[1]}" is "{OPPOSITES[m[1]]}".'
    elif m := re.fullmatch(r"Is (\d+) even or odd\?", instruction):
        assert output == f"{m[1]} is {'even' if int(m[1]) % 2 == 0 else 'odd'}."
    elif m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", instruction):
        a, b = int(m[1]), int(m[2])
        assert output == f"{max(a, b)} is larger than {min(a, b)}."
    elif instruction == "Continue the sequence with the next number.":
        seq = [int(x) for x in given.split(", ")]
        assert int(output) == seq[-1] + (seq[1] - seq[0])
    else:
        raise AssertionError(f"unexpected instruction {instruction!r}")


def test_instruction_answers_are_correct():
    records = _records("instructions")
    for record in records:
        _check_answer(record["instruction"], record["input"], record["output"])
    assert 0.25 < sum(bool(r["input"]) for r in records) / len(records) <= 0.5
    assert len({r["instruction"] + r["input"] for r in records}) > 430


def test_preferences_strengths_safety_and_correct_chosen():
    records = _records("preferences")
    assert Counter(r["strength"] for r in records).keys() == {
        "significantly better", "better", "slightly better", "negligibly better"
    }
    assert sum(r["safety"] for r in records) == len(records) // 5
    for record in records:
        assert record["chosen"] != record["rejected"]
        if not record["safety"]:
            instruction, _, given = record["prompt"].partition("\n\n")
            _check_answer(instruction, given, record["chosen"])


def test_prompt_answers_are_short_and_right():
    for record in _records("prompts"):
        if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", record["prompt"]):
            assert int(record["answer"]) == eval(f"{m[1]} {m[2]} {m[3]}")
        assert len(record["answer"]) <= 20


def test_dialogue_later_turns_follow_from_earlier_ones():
    for record in _records("dialogues_sharegpt"):
        turns = [t for t in record["conversations"] if t["from"] != "system"]
        first = re.fullmatch(r"What is (\d+) \+ (\d+)\?", turns[0]["value"])
        if first and turns[2]["value"].startswith("Now multiply that by"):
            total = int(first[1]) + int(first[2])
            k = int(turns[2]["value"].rstrip(".").split()[-1])
            assert turns[3]["value"] == f"{total} * {k} = {total * k}."


def _operands(prompt: str) -> tuple[int, str, int]:
    """(a, op, b) of an arithmetic prompt in one of demo:arithmetic's phrasings."""
    words = {"plus": "+", "minus": "-", "times": "*"}
    if m := re.fullmatch(r"(?:What is|Calculate) (\d+) ([-+*]|plus|minus|times) (\d+)[?.]", prompt):
        return int(m[1]), words.get(m[2], m[2]), int(m[3])
    m = re.fullmatch(r"Add the two numbers\.\n\n(\d+) and (\d+)", prompt)
    assert m, prompt
    return int(m[1]), "+", int(m[2])


def test_arithmetic_answers_are_right_and_phrased_as_the_instructions():
    records = _records("arithmetic")
    ops = Counter()
    for record in records:
        a, op, b = _operands(record["prompt"])
        assert record["answer"] == str(eval(f"{a} {op} {b}"))
        assert int(record["answer"]) >= 0 and max(a, b) <= (9 if op == "*" else 99)
        ops[op] += 1
    assert (ops["+"], ops["-"], ops["*"]) == (160, 160, 80)
    assert len({r["prompt"] for r in records}) == len(records)
    # most prompts use the phrasings the tiny SFT model learns from demo:instructions
    instruction_like = [r for r in records if re.fullmatch(r"What is \d+ [-+*] \d+\?", r["prompt"])
                        or r["prompt"].startswith("Add the two numbers.")]
    assert len(instruction_like) > len(records) / 2


def _problem(a: int, op: str, b: int) -> tuple:
    return (op, *sorted((a, b))) if op in "+*" else (op, a, b)


def test_arithmetic_sft_answers_unseen_problems_worked_and_directly_both_right():
    pairs = _records("arithmetic_sft")
    records = pairs[::2]
    rl_problems = {_problem(*_operands(r["prompt"])) for r in _records("arithmetic")}
    rl_prompts = {r["prompt"] for r in _records("arithmetic")}
    ops, problems = Counter(), set()
    # each problem twice in a row: the worked answer, then the direct one "a op b = result"
    for record, direct in zip(records, pairs[1::2], strict=True):
        assert set(record) == {"instruction", "input", "output"} and record["input"] == ""
        a, op, b = _operands(record["instruction"])
        result = eval(f"{a} {op} {b}")
        assert result >= 0 and max(a, b) <= 99 and (op != "*" or b <= 9)
        head = f"{a:02d} * {b}" if op == "*" else f"{a} {op} {b}"
        assert direct == {"instruction": record["instruction"], "input": "", "output": f"{head} = {result}"}
        # "a op b: step, step, so result", each step a right single-digit fact (or a carry added to a product)
        m = re.fullmatch(rf"{re.escape(head)}: (.*), so {result}", record["output"])
        assert m, record
        steps = m[1].split(", ")
        assert len(steps) == (3 if op == "*" else 2), record
        for step in steps:
            lhs, rhs = step.split("=")
            assert re.fullmatch(r"\d+(?:[-+*]\d+)+", lhs) and eval(lhs) == int(rhs), record
        assert record["output"] == arithmetic_scratchpad(a, op, b)
        # no problem of demo:arithmetic, in either order of a commutative operation's operands
        assert _problem(a, op, b) not in rl_problems, record
        assert record["instruction"] not in rl_prompts
        ops[op] += 1
        problems.add(_problem(a, op, b))
    assert (ops["+"], ops["-"], ops["*"]) == (1600, 1600, 400)
    # addition and subtraction problems do not repeat; multiplication repeats, in another phrasing
    assert len(problems) == 3200 + len({p for p in problems if p[0] == "*"})
    assert len({r["instruction"] for r in records}) > 0.9 * len(records)
    # the same phrasings as demo:arithmetic, in about the same shares
    phrasing = Counter(re.sub(r"\d+", "N", r["instruction"]).replace("minus", "-").replace("plus", "+")
                       .replace("times", "*").replace("-", "+").replace("*", "+") for r in records)
    assert set(phrasing) == {"What is N + N?", "Calculate N + N.", "Add the two numbers.\n\nN and N"}
    assert phrasing["What is N + N?"] > len(records) / 2


def test_arithmetic_worked_and_direct_answer_examples():
    assert arithmetic_scratchpad(44, "+", 63) == "44 + 63: 4+3=7, 4+6+0=10, so 107"
    assert arithmetic_scratchpad(7, "+", 5) == "7 + 5: 7+5=12, 0+0+1=1, so 12"
    assert arithmetic_scratchpad(92, "-", 46) == "92 - 46: 12-6=6, 9-4-1=4, so 46"
    assert arithmetic_scratchpad(52, "-", 46) == "52 - 46: 12-6=6, 5-4-1=0, so 6"
    assert arithmetic_scratchpad(23, "*", 4) == "23 * 4: 3*4=12, 2*4=8, 8+1=9, so 92"
    assert arithmetic_scratchpad(6, "*", 3) == "06 * 3: 6*3=18, 0*3=0, 0+1=1, so 18"
    assert arithmetic_direct(44, "+", 63) == "44 + 63 = 107"
    assert arithmetic_direct(6, "*", 3) == "06 * 3 = 18"


def test_arithmetic_is_deterministic():
    assert arithmetic(random.Random(7)) == arithmetic(random.Random(7))
    assert render_all()["arithmetic.jsonl"] == render_all()["arithmetic.jsonl"]


def test_instruction_following_answers_follow_the_instructions_of_their_turn():
    from jaxalign import gatt

    checkable = [i for i in gatt.BUILTIN if i.check]
    for record in _records("instruction_following"):
        user, answer = (m["content"] for m in record["messages"])
        given = [i for i in checkable if user.endswith(i.text) or f"{i.text} " in user]
        assert 1 <= len(given) <= 2 and len({i.kind for i in given}) == len(given)
        assert gatt.follows(answer, given), (user, answer)


def test_the_safety_mix_holds_every_safety_pair_and_as_many_helpful_ones():
    pairs, mix = _records("preferences"), _records("preferences_safety")
    safety = [p for p in pairs if p["safety"]]
    assert mix[:len(safety)] == safety and len(mix) == 2 * len(safety)
    assert not any(p["safety"] for p in mix[len(safety):])
