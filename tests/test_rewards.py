"""RL rewards: LLaMA-2's two-model combination and whitening against hand-computed values; Python reward functions."""

import sys

import numpy as np
import pytest

from jaxalign.errors import JaxalignError
from jaxalign.rewards import combine_llama2, function_reward, llama2_final_reward, whiten

from tests.params import init_params

HELPFUL = [2.0, 0.0, -1.0, 3.0]
SAFETY = [1.0, -3.0, 0.5, 2.0]
IS_SAFETY = [0, 0, 1, 0]


def test_combine_llama2_picks_safety_for_safety_prompts_and_unsafe_answers():
    # sigma(safety) = .7311, .0474 (< .15: unsafe), .6225 (safety prompt), .8808 -> safety for rows 1 and 2
    combined = combine_llama2(HELPFUL, SAFETY, IS_SAFETY)
    np.testing.assert_allclose(combined, [0.880797, 0.047426, 0.622459, 0.952574], atol=1e-6)


def test_final_reward_whitens_the_logit_of_the_combination():
    final = llama2_final_reward(HELPFUL, SAFETY, IS_SAFETY)
    np.testing.assert_allclose(final, [0.604615, -1.593984, -0.054965, 1.044334], atol=1e-5)
    combined = combine_llama2(HELPFUL, SAFETY, IS_SAFETY)
    np.testing.assert_allclose(final, whiten(np.log(combined / (1 - combined))), atol=1e-4)


def test_whiten_of_one_value_is_zero():
    assert whiten([3.0]).tolist() == [0.0]


def test_function_reward_from_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, responses, metadata):\n    return [len(r) for r in responses]\n"
        "def wrong(prompts, responses, metadata):\n    return [1.0]\n"
        "def one_argument(responses):\n    return responses\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = function_reward("my_rewards:length")
    assert reward(["a", "b"], ["xy", "xyz"], [{}, {}]).tolist() == [2.0, 3.0]
    with pytest.raises(JaxalignError, match="returned 1 scores for 2 responses"):
        function_reward("my_rewards:wrong")(["a", "b"], ["x", "y"], [{}, {}])
    with pytest.raises(JaxalignError, match="must take \\(prompts, responses, metadata\\)"):
        function_reward("my_rewards:one_argument")
    with pytest.raises(JaxalignError, match="has no function 'missing'"):
        function_reward("my_rewards:missing")
    with pytest.raises(JaxalignError, match="cannot import module 'no_such_module'"):
        function_reward("no_such_module:f")
    with pytest.raises(JaxalignError, match="expected 'module:function'"):
        function_reward("my_rewards")
    sys.modules.pop("my_rewards", None)


def test_llama2_reward_combines_two_reward_functions_with_the_safety_flag():
    from jaxalign.rewards import Llama2Reward

    reward = Llama2Reward(lambda p, r, m: np.array(HELPFUL), lambda p, r, m: np.array(SAFETY))
    metadata = [{"safety": bool(flag)} for flag in IS_SAFETY]
    np.testing.assert_allclose(reward(["q"] * 4, ["a"] * 4, metadata), llama2_final_reward(HELPFUL, SAFETY, IS_SAFETY))
    raw = Llama2Reward(lambda p, r, m: np.array(HELPFUL), lambda p, r, m: np.array(SAFETY), whitened=False)
    # the chosen model's raw score: helpful for rows 0 and 3, safety for the unsafe row 1 and the safety prompt row 2
    np.testing.assert_allclose(raw(["q"] * 4, ["a"] * 4, metadata), [2.0, -3.0, 0.5, 3.0])


def test_model_reward_scores_a_response_as_the_pair_pipeline_does():
    import jax

    from jaxalign.data.config import DataConfig
    from jaxalign.data.formats import parse_record
    from jaxalign.data.tokenizer import load_tokenizer
    from jaxalign.models.heads import LlamaForScore
    from jaxalign.models.llama import LlamaConfig
    from jaxalign.rewards import ModelReward

    tokenizer = load_tokenizer("byte")
    model = LlamaForScore(LlamaConfig.tiny(vocab_size=len(tokenizer), max_position_embeddings=320))
    params = init_params(model, jax.random.PRNGKey(0))
    reward = ModelReward(model, params, tokenizer, DataConfig(template="alpaca"), batch_size=2)
    singles = reward(["What is 2+2?", "Say hi."], ["4.", "Hi!"], [{}, {}])
    pair = parse_record({"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}, "preference", "pair")
    np.testing.assert_allclose(reward.score([pair])[0, 0], singles[0], rtol=1e-5)
    with pytest.raises(JaxalignError, match=r"response 0: \d+ tokens, more than the maximum length 320"):
        reward(["x" * 400], ["y"], [{}])


def test_contains_reference_scores_exact_answers_and_blank_responses_are_scored():
    from jaxalign.rewards import contains_reference, response_example

    scores = contains_reference(["q"] * 4, ["The answer is 42.", "forty-two", "  THE   Capital is ROME", ""],
                                [{"reference": "42"}, {"reference": "42"}, {"reference": "the capital is rome"},
                                 {"reference": None}])
    np.testing.assert_array_equal(scores, [1.0, 0.0, 1.0, 0.0])
    example = response_example("Say nothing.", " ", "response 0")
    assert example.messages[-1].content == " " and example.messages[-1].role == "assistant"


def test_extract_answer_prefers_the_last_box_then_the_last_number():
    from jaxalign.rewards import extract_answer

    assert extract_answer("12 + 7 = 19.") == "19"
    assert extract_answer(r"First \boxed{3}, then \boxed{ \frac{1}{2} } is final.") == r"\frac{1}{2}"
    assert extract_answer(r"So \boxed{42 and 7 is 49") == "49"  # an unclosed box is not an answer
    assert extract_answer("It dropped to -3 degrees, then 2.5 more.") == "2.5"
    assert extract_answer("x = -3") == "-3"
    assert extract_answer("82 - 74 = 8") == "8"
    assert extract_answer("10-4") == "4"  # a minus between numbers is not a sign
    assert extract_answer("The total is 1,234,567 people.") == "1234567"
    assert extract_answer("1,2,3") == "3"
    assert extract_answer("No digits here.") is None
    assert extract_answer("") is None


def test_correct_answer_compares_numbers_as_numbers_and_text_as_stripped_strings():
    from jaxalign.rewards import correct_answer

    cases = [
        ("12 + 7 = 19.", "19", 1.0),
        ("The answer is 19.0", "19", 1.0),
        (r"\boxed{1,000}", "1000", 1.0),
        ("12 + 7 = 20.", "19", 0.0),
        ("19 is wrong, it is 18", "19", 0.0),  # the last number counts
        (r"\boxed{-5} (not 7)", "-5", 1.0),
        (r"The capital is \boxed{ Paris }", " Paris", 1.0),
        (r"\boxed{paris}", "Paris", 0.0),
        ("no number", "19", 0.0),
        ("19", None, 0.0),
        ("19", "  ", 0.0),
    ]
    scores = correct_answer(["q"] * len(cases), [c[0] for c in cases], [{"reference": c[1]} for c in cases])
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, [c[2] for c in cases])
    np.testing.assert_array_equal(correct_answer(["q"], ["19"], [{}]), [0.0])


def test_boxed_format_wants_exactly_one_box():
    from jaxalign.rewards import boxed_format

    responses = [r"\boxed{19}", r"so \boxed{\frac{1}{2}}.", "19", r"\boxed{1} \boxed{2}", r"\boxed{19", ""]
    np.testing.assert_array_equal(boxed_format(["q"] * 6, responses, [{}] * 6), [1, 1, 0, 0, 0, 0])


def test_correct_answer_by_name_on_the_arithmetic_demo_set():
    from jaxalign.data.config import SourceSpec
    from jaxalign.data.sources import load_source

    reward = function_reward("jaxalign.rewards:correct_answer")
    examples = load_source(SourceSpec("demo:arithmetic")).examples[:8]
    metadata = [{"reference": e.reference} for e in examples]
    right = [f"The answer is {e.reference}." for e in examples]
    wrong = [f"The answer is {int(e.reference) + 1}." for e in examples]
    np.testing.assert_array_equal(reward([None] * 8, right, metadata), [1.0] * 8)
    np.testing.assert_array_equal(reward([None] * 8, wrong, metadata), [0.0] * 8)
