"""`jaxalign generate`: JSONL in and out, chat template, samples, and clear errors for bad input."""

import json
import shutil

import pytest

from jaxalign.cli import main
from jaxalign.hf import load_tokenizer
from jaxalign.sampling import generate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONTEXT = 96


@pytest.fixture(scope="module")
def model_dir(tiny_chat_model):
    return tiny_chat_model(CONTEXT)


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_generate(model_dir, prompts_path, out_path, *extra):
    return main(["generate", "--model", str(model_dir), "--prompts", str(prompts_path), "--out", str(out_path),
                 "--max-new-tokens", "8", *extra])


RECORDS = [
    {"id": "a", "prompt": "What is the capital of France?"},
    {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    {"id": "c", "prompt": "Name three colours."},
]


def test_greedy_lines_keep_their_fields_and_match_the_library(model_dir, tmp_path, capsys):
    import jaxalign

    prompts = write_lines(tmp_path / "prompts.jsonl", RECORDS)
    assert run_generate(model_dir, prompts, tmp_path / "out.jsonl", "--temperature", "0") == 0
    assert "3/3" in capsys.readouterr().err
    lines = read_lines(tmp_path / "out.jsonl")
    assert [line["id"] for line in lines] == ["a", "b", "c"]
    assert lines[1]["messages"] == RECORDS[1]["messages"]

    tokenizer = load_tokenizer(model_dir)
    model, params = jaxalign.load_pretrained(model_dir)
    chats = [[{"role": "user", "content": RECORDS[0]["prompt"]}], RECORDS[1]["messages"],
             [{"role": "user", "content": RECORDS[2]["prompt"]}]]
    encoded = [
        tokenizer(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]
        for c in chats
    ]
    expected = generate(model, params, encoded, 8, stop_token_ids=(tokenizer.eos_token_id,))
    for line, tokens, logprobs in zip(lines, expected.completions(), expected.completion_logprobs()):
        assert line["tokens"] == tokens
        assert line["logprobs"] == pytest.approx(logprobs, abs=1e-6)
        assert line["completion"] == tokenizer.decode(tokens, skip_special_tokens=True)


def test_no_chat_template_tokenizes_the_plain_prompt(model_dir, tmp_path):
    import jaxalign

    prompts = write_lines(tmp_path / "prompts.jsonl", [RECORDS[0], RECORDS[2]])
    assert run_generate(model_dir, prompts, tmp_path / "out.jsonl", "--temperature", "0", "--no-chat-template") == 0
    tokenizer = load_tokenizer(model_dir)
    model, params = jaxalign.load_pretrained(model_dir)
    encoded = [tokenizer(r["prompt"])["input_ids"] for r in (RECORDS[0], RECORDS[2])]
    expected = generate(model, params, encoded, 8, stop_token_ids=(tokenizer.eos_token_id,))
    assert [line["tokens"] for line in read_lines(tmp_path / "out.jsonl")] == expected.completions()


def test_num_samples_writes_one_line_per_sample_and_the_seed_reproduces(model_dir, tmp_path):
    prompts = write_lines(tmp_path / "prompts.jsonl", RECORDS[:2])
    args = ("--temperature", "1.0", "--top-k", "50", "--num-samples", "3", "--seed", "5")
    assert run_generate(model_dir, prompts, tmp_path / "a.jsonl", *args) == 0
    assert run_generate(model_dir, prompts, tmp_path / "b.jsonl", *args) == 0
    lines = read_lines(tmp_path / "a.jsonl")
    assert [(line["id"], line["sample"]) for line in lines] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1),
                                                                ("b", 2)]
    assert lines == read_lines(tmp_path / "b.jsonl")
    assert len({tuple(line["tokens"]) for line in lines[:3]}) > 1


def test_too_long_prompt_names_the_line_unless_truncation_is_asked(model_dir, tmp_path, capsys):
    long_text = " ".join(["word"] * CONTEXT)
    prompts = write_lines(tmp_path / "prompts.jsonl", [RECORDS[0], {"prompt": long_text}])
    assert run_generate(model_dir, prompts, tmp_path / "out.jsonl", "--temperature", "0") == 2
    err = capsys.readouterr().err
    assert f"{prompts}:2: the prompt has" in err and "--truncate-prompts" in err and "Traceback" not in err
    assert run_generate(model_dir, prompts, tmp_path / "out.jsonl", "--temperature", "0", "--truncate-prompts") == 0
    assert len(read_lines(tmp_path / "out.jsonl")) == 2


@pytest.mark.parametrize(
    "lines,message",
    [
        ([], "contains no prompts"),
        (["", "   "], "contains no prompts"),
        ([RECORDS[0], "{not json"], "prompts.jsonl:2: not valid JSON"),
        ([RECORDS[0], {"text": "hi"}], "prompts.jsonl:2: expected a 'prompt' string or a 'messages' list"),
        ([{"messages": [{"role": "user"}]}], "prompts.jsonl:1: every entry of 'messages' needs"),
        ([[1, 2]], "prompts.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_prompt_files_are_reported_without_traceback(model_dir, tmp_path, capsys, lines, message):
    prompts = write_lines(tmp_path / "prompts.jsonl", lines)
    assert run_generate(model_dir, prompts, tmp_path / "out.jsonl") == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("jaxalign generate: error:") and "Traceback" not in err


def test_bad_options_and_paths_are_reported(model_dir, tmp_path, capsys):
    prompts = write_lines(tmp_path / "prompts.jsonl", RECORDS[:1])
    with pytest.raises(SystemExit) as exit_info:
        run_generate(model_dir, prompts, tmp_path / "out.jsonl", "--temprature", "0")
    assert exit_info.value.code == 2 and "unrecognized arguments: --temprature" in capsys.readouterr().err
    assert run_generate(tmp_path / "missing", prompts, tmp_path / "out.jsonl") == 2
    assert "model folder" in capsys.readouterr().err
    assert run_generate(tmp_path, prompts, tmp_path / "out.jsonl") == 2
    assert "neither a Hugging Face model folder (config.json) nor a jaxalign" in capsys.readouterr().err
    assert run_generate(model_dir, tmp_path / "none.jsonl", tmp_path / "out.jsonl") == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err
    assert run_generate(model_dir, prompts, tmp_path / "out.jsonl", "--top-p", "1.5") == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    no_template = tmp_path / "no_template"
    shutil.copytree(model_dir, no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    assert run_generate(no_template, prompts, tmp_path / "out.jsonl") == 2
    assert "no chat template" in capsys.readouterr().err


def test_a_jaxalign_model_checkpoint_generates_like_its_hugging_face_folder(model_dir, tmp_path):
    import jaxalign
    from jaxalign.models.checkpoint import save_model_checkpoint

    model, params = jaxalign.load_pretrained(model_dir)
    save_model_checkpoint(tmp_path / "ckpt", model.config, params)
    prompts = write_lines(tmp_path / "prompts.jsonl", RECORDS)
    assert run_generate(model_dir, prompts, tmp_path / "hf.jsonl", "--temperature", "0") == 0
    assert run_generate(tmp_path / "ckpt", prompts, tmp_path / "ckpt.jsonl", "--temperature", "0",
                        "--tokenizer", str(model_dir)) == 0
    assert read_lines(tmp_path / "ckpt.jsonl") == read_lines(tmp_path / "hf.jsonl")
