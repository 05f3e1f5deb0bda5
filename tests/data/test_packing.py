import numpy as np
import pytest

from jaxalign.config import from_dict
from jaxalign.data import DataConfig, build_loader
from jaxalign.data.packing import lm_batch, preference_batch, prompt_batch, unpaired_batch


def _example(ids, trained):
    return np.asarray(ids, np.int32), np.asarray(trained, bool)


def test_lm_batch_packs_two_examples_with_segments_positions_and_masks():
    first = _example([1, 10, 11, 12], [0, 0, 1, 1])
    second = _example([1, 20, 21], [0, 1, 1])
    batch = lm_batch([[first, second], []], seq_len=9, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 12, 1, 20, 21, 0, 0], [0] * 9]
    # targets[t] = the next token inside an example; pad at each example's last token (no cross-example target)
    assert batch["targets"][0].tolist() == [10, 11, 12, 0, 20, 21, 0, 0, 0]
    assert batch["loss_mask"][0].tolist() == [0, 1, 1, 0, 1, 1, 0, 0, 0]
    assert batch["segment_ids"][0].tolist() == [1, 1, 1, 1, 2, 2, 2, 0, 0]
    assert batch["positions"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 0]
    assert not batch["loss_mask"][1].any() and not batch["segment_ids"][1].any()
    assert all(v.dtype == np.int32 and v.shape == (2, 9) for v in batch.values())


def test_lm_batch_rejects_overfull_rows():
    with pytest.raises(ValueError, match="exceed seq_len"):
        lm_batch([[_example([1, 2, 3], [0, 1, 1]), _example([1, 2], [0, 1])]], seq_len=4, pad_id=0)


def test_preference_batch_margins_by_strength():
    pair = (_example([1, 5, 6], [0, 0, 1]), _example([1, 5, 7, 8], [0, 0, 1, 1]))
    batch = preference_batch([pair + (0, 1), pair + (2, 0), pair + (-1, -1), None], seq_len=5, pad_id=0,
                             margin="large")
    assert batch["margin"].tolist() == [3.0, 1.0, 0.0, 0.0]
    assert batch["strength"].tolist() == [0, 2, -1, -1]
    assert batch["safety"].tolist() == [1, 0, -1, -1]
    assert batch["pair_mask"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert batch["chosen_loss_mask"][0].tolist() == [0, 1, 0, 0, 0]
    assert batch["rejected_loss_mask"][0].tolist() == [0, 1, 1, 0, 0]
    assert batch["rejected_targets"][0].tolist() == [5, 7, 8, 0, 0]
    small = preference_batch([pair + (1, 0)], seq_len=5, pad_id=0, margin="small")
    np.testing.assert_allclose(small["margin"], [2.0 / 3.0])


def test_unpaired_batch_has_completion_and_kl_halves_one_example_per_row():
    completion = _example([1, 5, 6], [0, 0, 1])
    kl = _example([1, 5, 7, 8], [0, 0, 1, 1])
    batch = unpaired_batch([(completion, kl, True), (kl, completion, False), None], seq_len=5, pad_id=0)
    assert batch["completion_input_ids"].tolist() == [[1, 5, 6, 0, 0], [1, 5, 7, 8, 0], [0] * 5]
    assert batch["completion_loss_mask"][0].tolist() == [0, 1, 0, 0, 0]
    assert batch["kl_targets"][0].tolist() == [5, 7, 8, 0, 0]
    assert batch["kl_loss_mask"][0].tolist() == [0, 1, 1, 0, 0]
    assert batch["kl_segment_ids"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [0] * 5]
    assert batch["desirable"].tolist() == [1.0, 0.0, 0.0] and batch["desirable"].dtype == np.float32
    assert batch["example_mask"].tolist() == [1.0, 1.0, 0.0] and batch["example_mask"].dtype == np.float32
    assert all(batch[f"{p}_{k}"].shape == (3, 5) and batch[f"{p}_{k}"].dtype == np.int32
               for p in ("completion", "kl") for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions"))


def test_prompt_batch_is_left_padded():
    batch = prompt_batch([np.array([1, 7, 8], np.int32), np.array([1, 9], np.int32), None], seq_len=4, pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 1, 7, 8], [0, 0, 1, 9], [0, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert batch["positions"].tolist() == [[0, 0, 1, 2], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert batch["prompt_length"].tolist() == [3, 2, 0]
    assert batch["prompt_mask"].tolist() == [1.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def tiny_model():
    import jax

    from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=264, max_position_embeddings=128))
    ids = np.zeros((1, 8), np.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), ids)["params"]
    return model, params


def _token_nll(model, params, batch):
    import jax

    from jaxalign.objectives.logprobs import token_log_probs

    @jax.jit
    def nll(params, batch):
        logits = model.apply({"params": params}, batch["input_ids"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"])
        return -token_log_probs(logits, batch["targets"])

    return np.asarray(nll(params, batch))


def test_packed_batch_through_the_model_gives_the_unpacked_per_token_loss(byte_tok, tiny_model):
    model, params = tiny_model
    config = from_dict(DataConfig, {"train": "demo:instructions", "template": "gpt4all",
                                    "pack": True, "seed": 3})
    packed = next(build_loader(config, byte_tok, batch_size=2, seq_len=128))
    rows_segments = [np.unique(s[s > 0]) for s in packed["segment_ids"]]
    count = sum(len(s) for s in rows_segments)
    assert count > 2, "the rows should hold several packed examples"
    unpacked = next(build_loader(config.replace(pack=False), byte_tok, batch_size=count, seq_len=128))

    packed_nll = _token_nll(model, params, packed)
    unpacked_nll = _token_nll(model, params, unpacked)
    k = 0
    for row, segments in enumerate(rows_segments):
        for segment in segments:
            where = packed["segment_ids"][row] == segment
            n = int(where.sum())
            np.testing.assert_array_equal(packed["input_ids"][row][where], unpacked["input_ids"][k][:n])
            mask = packed["loss_mask"][row][where].astype(bool)
            np.testing.assert_array_equal(mask, unpacked["loss_mask"][k][:n].astype(bool))
            assert mask.any()
            np.testing.assert_allclose(packed_nll[row][where][mask], unpacked_nll[k][:n][mask], rtol=1e-5, atol=1e-5)
            k += 1
    assert k == count
