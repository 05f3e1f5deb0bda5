"""`jaxalign convert`: HF folder -> jaxalign checkpoint -> HF folder is byte-identical, tokenizer travels along."""

import json

import pytest
from safetensors.numpy import load_file

from jaxalign.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def save_word_tokenizer(folder, words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(["[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convert_model")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True, rope_theta=50000.0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    save_word_tokenizer(folder, [f"w{i}" for i in range(90)])
    return folder


def test_hf_to_checkpoint_to_hf_is_byte_identical(hf_folder, tmp_path, capsys):
    checkpoint, back = tmp_path / "ckpt", tmp_path / "back"
    assert main(["convert", str(hf_folder), str(checkpoint)]) == 0
    assert (checkpoint / "jaxalign_model.json").is_file() and (checkpoint / "tokenizer.json").is_file()
    assert main(["convert", str(checkpoint), str(back)]) == 0
    assert "jaxalign checkpoint -> Hugging Face folder" in capsys.readouterr().err
    original, again = load_file(hf_folder / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(original) == set(again)
    assert all(original[name].tobytes() == again[name].tobytes() for name in original)
    config = json.loads((back / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 50000.0 and config["tie_word_embeddings"] is True
    tokenizer = transformers.AutoTokenizer.from_pretrained(back)
    assert tokenizer("w3 w7")["input_ids"] == [4, 8]


def test_bad_paths_exit_2_with_a_message(hf_folder, tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["convert", str(hf_folder), str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "full"), str(tmp_path / "out")]) == 2
    assert "neither a Hugging Face model folder" in capsys.readouterr().err


def test_a_score_model_is_not_exported_as_a_causal_lm(hf_folder, tmp_path, capsys):
    from jaxalign.models.checkpoint import save_model_checkpoint
    from jaxalign.models.loading import load_model

    model, params = load_model(hf_folder, head="score")
    save_model_checkpoint(tmp_path / "rm", model.config, params, head="score")
    assert main(["convert", str(tmp_path / "rm"), str(tmp_path / "out")]) == 2
    assert "holds a score model" in capsys.readouterr().err
