import numpy as np
import pytest

from jaxalign.data.formats import Conversation, Message
from jaxalign.data.masking import fit, split_blocks, tokenize_segments, trained_flags
from jaxalign.data.templates import SpecialTokens, render
from jaxalign.data.tokenizer import SegmentEncoder
from jaxalign.errors import JaxalignError

THREE_TURNS = Conversation(
    (
        Message("system", "S"),
        Message("user", "u1"),
        Message("assistant", "a1"),
        Message("user", "u2"),
        Message("assistant", "a2"),
        Message("user", "u3"),
        Message("assistant", "a3"),
    ),
    "t",
)


@pytest.fixture(scope="module")
def lima_tokens(byte_tok):
    """lima renders <s>S<eot>u1<eot>a1<eot>u2<eot>a2<eot>u3<eot>a3<eot>; byte tokens are one per character."""
    segments = render(THREE_TURNS, "lima", SpecialTokens("<s>", "</s>", "<|eot|>"))
    return tokenize_segments([segments], SegmentEncoder(byte_tok))[0]


def _trained_text(byte_tok, tokens, flags) -> list[str]:
    """The trained runs as decoded strings, token by token."""
    runs, current = [], []
    for token_id, flag in zip(tokens.ids.tolist(), flags.tolist()):
        if flag:
            current.append(token_id)
        elif current:
            runs.append(byte_tok.decode(current))
            current = []
    if current:
        runs.append(byte_tok.decode(current))
    return runs


def test_tokens_are_one_per_character_and_special(byte_tok, lima_tokens):
    expected = "<s>S<|eot|>u1<|eot|>a1<|eot|>u2<|eot|>a2<|eot|>u3<|eot|>a3<|eot|>"
    assert byte_tok.decode(lima_tokens.ids.tolist()) == expected
    assert lima_tokens.ids.size == 1 + 2 + 3 * 6


def test_assistant_mask_multi_turn_token_by_token(byte_tok, lima_tokens):
    flags = trained_flags(lima_tokens, "assistant")
    expected = [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1]
    assert flags.astype(int).tolist() == expected
    assert _trained_text(byte_tok, lima_tokens, flags) == ["a1<|eot|>", "a2<|eot|>", "a3<|eot|>"]


def test_last_turn_mask_trains_only_the_final_answer(byte_tok, lima_tokens):
    flags = trained_flags(lima_tokens, "last_turn")
    assert flags.astype(int).tolist() == [0] * 18 + [1, 1, 1]
    assert _trained_text(byte_tok, lima_tokens, flags) == ["a3<|eot|>"]


def test_prompt_mask_trains_everything_after_the_first_prompt(byte_tok, lima_tokens):
    flags = trained_flags(lima_tokens, "prompt")
    assert flags.astype(int).tolist() == [0] * 6 + [1] * 15
    assert _trained_text(byte_tok, lima_tokens, flags) == ["a1<|eot|>u2<|eot|>a2<|eot|>u3<|eot|>a3<|eot|>"]


def test_full_mask_trains_everything(lima_tokens):
    assert trained_flags(lima_tokens, "full").all()


def test_single_turn_prompt_and_assistant_masks_agree(byte_tok):
    single = Conversation(THREE_TURNS.messages[1:3], "t")
    tokens = tokenize_segments([render(single, "vicuna_v1.1", SpecialTokens("<s>", "</s>", "<|eot|>"))],
                               SegmentEncoder(byte_tok))[0]
    assert (trained_flags(tokens, "prompt") == trained_flags(tokens, "assistant")).all()
    assert _trained_text(byte_tok, tokens, trained_flags(tokens, "assistant")) == [" a1</s>"]


def test_unknown_mask_mode_is_an_error(lima_tokens):
    with pytest.raises(JaxalignError, match="data.mask"):
        trained_flags(lima_tokens, "everything")


def test_special_token_missing_from_vocab_names_the_config_key(byte_tok):
    segments = render(THREE_TURNS, "lima", SpecialTokens("<s>", "</s>", "<EOT>"))
    with pytest.raises(JaxalignError, match="'<EOT>'.*data.added_tokens"):
        tokenize_segments([segments], SegmentEncoder(byte_tok))


def _example(prompt: int, answer: int):
    ids = np.arange(prompt + answer, dtype=np.int32)
    trained = np.array([False] * prompt + [True] * answer)
    return ids, trained


def test_fit_keeps_short_examples_unchanged():
    ids, trained = _example(5, 3)
    out = fit(ids, trained, 16)
    assert not out.truncated and out.dropped is None and (out.ids == ids).all()


def test_fit_truncates_the_end():
    ids, trained = _example(5, 10)
    out = fit(ids, trained, 8)
    assert out.truncated and out.dropped is None
    assert out.ids.tolist() == list(range(8)) and out.trained.tolist() == [False] * 5 + [True] * 3


def test_fit_drops_examples_whose_trained_tokens_are_truncated_away():
    ids, trained = _example(10, 4)
    out = fit(ids, trained, 8)
    assert out.dropped == "all trained tokens truncated"


def test_fit_gpt4all_prompt_at_most_half_the_length():
    ids, trained = _example(12, 6)
    out = fit(ids, trained, 16, max_prompt_fraction=0.5)
    assert out.truncated and out.dropped is None
    assert out.ids.tolist() == list(range(8)) + list(range(12, 18))
    assert out.trained.tolist() == [False] * 8 + [True] * 6


def test_fit_overlong_drop():
    ids, trained = _example(5, 10)
    assert fit(ids, trained, 8, overlong="drop").dropped == "longer than seq_len"


def test_fit_drops_examples_without_trained_tokens():
    ids = np.arange(4, dtype=np.int32)
    assert fit(ids, np.zeros(4, bool), 8).dropped == "no trained tokens"
    assert fit(ids, np.array([True, False, False, False]), 8).dropped == "no trained tokens"


def test_split_blocks_leaves_out_blocks_without_targets():
    ids, trained = _example(10, 5)
    blocks = split_blocks(ids, trained, 4)
    assert [b.ids.tolist() for b in blocks] == [[8, 9, 10, 11], [12, 13, 14]]
    assert all(b.dropped is None and not b.truncated for b in blocks)
    assert split_blocks(*_example(10, 0), 4)[0].dropped == "no trained tokens"
