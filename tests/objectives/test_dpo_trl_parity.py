"""Parity with TRL's DPOTrainer (trl 1.16): per-sequence log-probs and per-pair losses on the same weights and tokens.

Two tiny random transformers LLaMA models (float32; a policy and a different reference, so z != 0) are saved as
Hugging Face folders and loaded into jaxalign. TRL gets the pairs as text over a word-level vocabulary in which word
`w{i}` is token i, so its own dataset preparation (`_prepare_dataset`: appending EOS to the completions, tokenizing,
splitting off the prompt) yields exactly the integer ids below plus one EOS per completion; the test checks that and
builds jaxalign's preference batch from the same final ids. TRL's side runs through its own code:
`DataCollatorForPreference` (the trainer's collator), `DPOTrainer.compute_ref_log_probs` (summed completion log-probs
from the fused LM head, called with the policy and with the reference) and `DPOTrainer.compute_loss`.
"""

import numpy as np
import pytest

pytest.importorskip("trl")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

import jax.numpy as jnp  # noqa: E402

from jaxalign.data.packing import preference_batch  # noqa: E402
from jaxalign.models.loading import load_model  # noqa: E402
from jaxalign.objectives.dpo import preference_loss, stacked_sequence_log_probs  # noqa: E402
from tests.test_hf import TINY, build_hf_model  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
BETA = 0.1
RTOL = 1e-5

# (prompt ids, chosen completion ids, rejected completion ids) before TRL appends EOS to each completion
PAIRS = [
    ([17, 42, 256, 9], [88, 31, 7], [120, 5, 66, 301, 12]),
    ([3, 250], [44], [45, 46]),
    ([200, 201, 202, 203, 204, 205, 206], [99, 98, 97, 96, 95, 94], [11]),
    ([311, 4, 8, 15, 16, 23, 42, 108], [73, 74, 75, 76, 77, 78, 79, 80, 81], [150, 151, 152, 153]),
    ([60], [61, 62], [63, 64, 65, 66, 67, 68, 69]),
]

# jaxalign loss type, label smoothing, and TRL's loss type that computes the same per-pair loss. TRL 1.16's
# `sigmoid` ignores `label_smoothing` (it is plain DPO), so cDPO is compared against TRL's `aot` loss on one-pair
# batches: `aot` sorts the log-ratio differences over the batch, which is the identity for one pair, and then is
# exactly cDPO's `(1-ε)·(-log σ(βz)) + ε·(-log σ(-βz))`.
LOSSES = {
    "sigmoid": ("sigmoid", 0.0, "sigmoid"),
    "sigmoid_cdpo": ("sigmoid", 0.1, "aot"),
    "hinge": ("hinge", 0.0, "hinge"),
    "ipo": ("ipo", 0.0, "ipo"),
    "robust": ("robust", 0.1, "robust"),
}


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, TINY["vocab_size"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<pad>")


def words(ids):
    return " ".join(f"w{i}" for i in ids)


def relative_error(reference, ours):
    reference, ours = np.asarray(reference, np.float64), np.asarray(ours, np.float64)
    return float(np.max(np.abs(reference - ours) / np.abs(reference)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    root = tmp_path_factory.mktemp("dpo_trl_parity")
    build_hf_model(root / "policy", "LlamaConfig", {}, seed=0)
    build_hf_model(root / "reference", "LlamaConfig", {}, seed=1)
    hf = {name: transformers.AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float32)
          for name in ("policy", "reference")}
    dataset = Dataset.from_dict({
        "prompt": [words(p) for p, _, _ in PAIRS],
        "chosen": [" " + words(c) for _, c, _ in PAIRS],
        "rejected": [" " + words(r) for _, _, r in PAIRS],
    })
    args = DPOConfig(output_dir=str(root / "trl"), report_to="none", use_cpu=True, bf16=False, max_length=None,
                     beta=BETA, precompute_ref_log_probs=False, disable_dropout=True)
    trainer = DPOTrainer(model=hf["policy"], ref_model=hf["reference"], args=args, train_dataset=dataset,
                         processing_class=word_tokenizer())
    trainer.model.eval()

    examples = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    final = [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples]
    seq_len = max(len(p) + max(len(c), len(r)) for p, c, r in final)

    def half(prompt, completion):
        ids = np.asarray(prompt + completion, np.int32)
        return ids, np.asarray([0] * len(prompt) + [1] * len(completion), np.int32)

    batch = preference_batch([(half(p, c), half(p, r), 0, -1) for p, c, r in final], seq_len, PAD)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    ours = {}
    for name in ("policy", "reference"):
        model, params = load_model(root / name, "float32")
        ours[name] = [tuple(np.asarray(x) for x in half_)
                      for half_ in stacked_sequence_log_probs(model, params, batch, ("chosen_", "rejected_"))]
    return {"trainer": trainer, "examples": examples, "ours": ours}


def trl_log_probs(trainer, examples):
    """`{"policy": (chosen [B], rejected [B]), "reference": ...}` from TRL's collator and `compute_ref_log_probs`."""
    batch = trainer.data_collator(examples)
    with torch.no_grad():
        return {name: tuple(x.double().numpy() for x in trainer.compute_ref_log_probs(model, batch))
                for name, model in (("policy", trainer.model), ("reference", trainer.ref_model))}


def test_trl_prepares_the_given_ids_plus_eos(setup):
    for example, (prompt, chosen, rejected) in zip(setup["examples"], PAIRS):
        assert example["prompt_ids"] == prompt
        assert example["chosen_ids"] == chosen + [EOS]
        assert example["rejected_ids"] == rejected + [EOS]


def test_summed_log_probs_match_trl(setup):
    trl = trl_log_probs(setup["trainer"], setup["examples"])
    worst = 0.0
    for name in ("policy", "reference"):
        for (ours, counts), theirs, key in zip(setup["ours"][name], trl[name], ("chosen_ids", "rejected_ids")):
            np.testing.assert_array_equal(counts, [len(e[key]) for e in setup["examples"]])
            np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=0)
            worst = max(worst, relative_error(theirs, ours))
    print(f"summed log-probs: max relative difference to TRL {worst:.2e}")
    # the reference differs from the policy, so z != 0 in the loss tests
    policy, reference = setup["ours"]["policy"], setup["ours"]["reference"]
    z = (policy[0][0] - policy[1][0]) - (reference[0][0] - reference[1][0])
    assert np.all(np.abs(z) > 0.5)


@pytest.mark.parametrize("variant", list(LOSSES))
def test_per_pair_losses_match_trl(setup, variant, monkeypatch):
    loss_type, smoothing, trl_type = LOSSES[variant]
    trainer = setup["trainer"]
    monkeypatch.setattr(trainer, "loss_types", [trl_type])
    monkeypatch.setattr(trainer, "loss_weights", [1.0])
    monkeypatch.setattr(trainer, "label_smoothing", smoothing)
    with torch.no_grad():
        theirs = np.asarray([float(trainer.compute_loss(trainer.model, trainer.data_collator([example])))
                             for example in setup["examples"]])

    (pc, cc), (pr, cr) = setup["ours"]["policy"]
    (rc, _), (rr, _) = setup["ours"]["reference"]
    ours = np.asarray(preference_loss(loss_type, pc, pr, rc, rr, BETA, chosen_count=cc, rejected_count=cr,
                                      label_smoothing=smoothing))
    # the loss formula alone, on TRL's own log-probs
    trl = trl_log_probs(trainer, setup["examples"])
    formula = np.asarray(preference_loss(loss_type, *trl["policy"], *trl["reference"], BETA, chosen_count=cc,
                                         rejected_count=cr, label_smoothing=smoothing))
    print(f"{variant}: TRL {np.round(theirs, 5)}; max relative difference end to end "
          f"{relative_error(theirs, ours):.2e}, formula only {relative_error(theirs, formula):.2e}")
    assert np.all(theirs > 1e-3)  # relative comparison is meaningful (hinge not clipped to 0)
    np.testing.assert_allclose(formula, theirs, rtol=RTOL, atol=0)
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=0)
    if trl_type != "aot":  # TRL's mean over a padded batch of all pairs
        with torch.no_grad():
            batch_mean = float(trainer.compute_loss(trainer.model, trainer.data_collator(setup["examples"])))
        np.testing.assert_allclose(ours.mean(), batch_mean, rtol=RTOL, atol=0)
