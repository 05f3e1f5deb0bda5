"""`jaxalign score`: per-text log-probabilities equal a direct transformers computation, in input order."""

import json
import math

import numpy as np
import pytest

from jaxalign.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = [f"w{i}" for i in range(90)]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("score_model")
    config = transformers.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                        sliding_window=8)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1:
                param.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *WORDS])}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    return folder, model.eval()


def reference_logprob(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return float(logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())


def test_scores_match_transformers_in_input_order(hf_folder, tmp_path, capsys):
    folder, model = hf_folder
    rng = np.random.default_rng(0)
    lengths = [5, 1, 23, 12, 2, 40, 7]
    texts = [" ".join(rng.choice(WORDS, size=n)) for n in lengths]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(folder), "--data", str(data), "--out", str(out), "--batch-size", "3"]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["num_tokens"] for r in results] == lengths
    for text, result in zip(texts, results):
        ids = [WORDS.index(w) + 1 for w in text.split()]
        if len(ids) == 1:
            assert result["logprob"] == 0.0 and result["perplexity"] is None
            continue
        expected = reference_logprob(model, ids)
        assert result["logprob"] == pytest.approx(expected, rel=1e-4)
        assert result["perplexity"] == pytest.approx(math.exp(-expected / (len(ids) - 1)), rel=1e-4)
    assert "scored 7 texts, 83 predicted tokens" in capsys.readouterr().err

    checkpoint = tmp_path / "checkpoint"
    assert main(["convert", str(folder), str(checkpoint)]) == 0
    assert main(["score", "--model", str(checkpoint), "--data", str(data), "--batch-size", "4"]) == 0
    from_checkpoint = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for ours, again in zip(results, from_checkpoint):
        assert again["num_tokens"] == ours["num_tokens"]
        assert again["logprob"] == pytest.approx(ours["logprob"], rel=1e-5, abs=1e-5)


def test_bad_lines_and_too_long_texts_are_reported(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "w1 w2"}\n{"txt": "w3"}\n')
    assert main(["score", "--model", str(folder), "--data", str(data)]) == 2
    assert "bad.jsonl:2: expected an object with a string 'text'" in capsys.readouterr().err
    data.write_text(json.dumps({"text": " ".join(["w1"] * 10)}) + "\n")
    assert main(["score", "--model", str(folder), "--data", str(data), "--max-length", "8"]) == 2
    assert "text 1 has 10 tokens, more than --max-length 8" in capsys.readouterr().err
