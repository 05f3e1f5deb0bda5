"""`jaxalign generate`: JSONL in and out, chat template, samples, and clear errors for bad input."""

import json
import shutil

import pytest

from jaxalign.cli import main
from jaxalign.hf import load_tokenizer
from jaxalign.sampling import generate

from tests.params import init_params

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
    model, params = jaxalign.load_pretrained(model_dir, scan_layers=False)  # unrolled, as the command decodes
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


def export_trained_format(folder, template: str):
    """A random tiny model exported with the byte tokenizer as `jaxalign sft` exports a model trained with
    `data.template=template` (no training: the export's format is what is tested)."""
    import jax

    from jaxalign.data import DataConfig, prepare_tokenizer
    from jaxalign.data.templates import chat_format
    from jaxalign.data.tokenizer import byte_tokenizer
    from jaxalign.hf import save_pretrained
    from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    data = DataConfig(template=template)
    prepare_tokenizer(data, tokenizer)
    model = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=264, hidden_size=32, intermediate_size=64,
                                              max_position_embeddings=320))
    params = init_params(model, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda p: p * 20.0, params)
    save_pretrained(model, params, folder, tokenizer=tokenizer, chat_format=chat_format(data, tokenizer))
    return folder


def prompt_ids(template: str, tokenizer, messages) -> list[int]:
    """The ids jaxalign trains on for `messages` up to the assistant header, with `data.template=template`."""
    from jaxalign.data.formats import Message, Prompt
    from jaxalign.data.masking import tokenize_segments
    from jaxalign.data.templates import render, special_tokens
    from jaxalign.data.tokenizer import SegmentEncoder

    prompt = Prompt(tuple(Message(m["role"], m["content"]) for m in messages), None, "t")
    segments = render(prompt, template, special_tokens(tokenizer, True, "<|eot|>"))
    return tokenize_segments([segments], SegmentEncoder(tokenizer))[0].ids.tolist()


@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_an_export_is_prompted_in_the_format_it_was_trained_in(template, tmp_path):
    import jaxalign

    folder = export_trained_format(tmp_path / "hf", template)
    tokenizer = load_tokenizer(folder)
    prompts = write_lines(tmp_path / "prompts.jsonl", RECORDS[:2])
    assert run_generate(folder, prompts, tmp_path / "out.jsonl", "--temperature", "0") == 0
    chats = [[{"role": "user", "content": RECORDS[0]["prompt"]}], RECORDS[1]["messages"]]
    encoded = [prompt_ids(template, tokenizer, chat) for chat in chats]
    if template == "alpaca":
        assert tokenizer.decode(encoded[0]).startswith("<s>Below is an instruction that describes a task.")
        assert tokenizer.decode(encoded[0]).endswith("### Instruction:\nWhat is the capital of France?\n\n"
                                                     "### Response:\n")
    model, params = jaxalign.load_pretrained(folder)
    stops = (2,) if template == "alpaca" else (2, 5)
    assert model.config.eos_token_id == (2 if template == "alpaca" else (2, 5))
    expected = generate(model, params, encoded, 8, stop_token_ids=stops)
    assert [line["tokens"] for line in read_lines(tmp_path / "out.jsonl")] == expected.completions()


def test_template_option_renders_prompts_in_a_builtin_template(model_dir, tmp_path):
    import jaxalign

    prompts = write_lines(tmp_path / "prompts.jsonl", RECORDS[:2])
    assert run_generate(model_dir, prompts, tmp_path / "out.jsonl", "--temperature", "0",
                        "--template", "vicuna_v1.1") == 0
    tokenizer = load_tokenizer(model_dir)
    chats = [[{"role": "user", "content": RECORDS[0]["prompt"]}], RECORDS[1]["messages"]]
    encoded = [prompt_ids("vicuna_v1.1", tokenizer, chat) for chat in chats]
    assert tokenizer.decode(encoded[1]) == "<|im_start|>Be brief. USER: Hi ASSISTANT:"
    model, params = jaxalign.load_pretrained(model_dir)
    expected = generate(model, params, encoded, 8, stop_token_ids=(tokenizer.eos_token_id,))
    assert [line["tokens"] for line in read_lines(tmp_path / "out.jsonl")] == expected.completions()
