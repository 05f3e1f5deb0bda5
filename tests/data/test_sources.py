import importlib.util
import json

import numpy as np
import pytest

from jaxalign.data.config import SourceSpec
from jaxalign.data.sources import demo_path, load_source, resolve_files
from jaxalign.errors import JaxalignError

RECORDS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_json_and_parquet_give_the_same_examples(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow
    import pyarrow.parquet

    _jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in RECORDS])
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(RECORDS), tmp_path / "a.parquet")
    loaded = [load_source(SourceSpec(str(tmp_path / f"a.{ext}"))) for ext in ("jsonl", "json", "parquet")]
    contents = [[e.messages for e in data.examples] for data in loaded]
    assert contents[0] == contents[1] == contents[2] and len(contents[0]) == 5
    assert [d.format for d in loaded] == ["alpaca"] * 3
    assert loaded[0].examples[2].origin == f"{tmp_path / 'a.jsonl'}:3"
    assert loaded[1].examples[2].origin == f"{tmp_path / 'a.json'}: record 2"
    assert loaded[2].examples[2].origin == f"{tmp_path / 'a.parquet'}: row 2"


def test_globs_and_folders_are_sorted(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        _jsonl(tmp_path / name, [json.dumps(RECORDS[0])])
    assert [p.name for p in resolve_files(str(tmp_path / "*.jsonl"))] == ["a.jsonl", "b.jsonl"]
    assert [p.name for p in resolve_files(str(tmp_path))] == ["a.jsonl", "b.jsonl"]
    assert len(load_source(SourceSpec(str(tmp_path / "*.jsonl"))).examples) == 2


def test_demo_sources_and_limit():
    assert demo_path("instructions").name == "instructions.jsonl"
    assert len(load_source(SourceSpec("demo:instructions", limit=7)).examples) == 7


def test_blank_lines_are_ignored(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [json.dumps(RECORDS[0]), "", "   ", json.dumps(RECORDS[1])])
    data = load_source(SourceSpec(str(path)))
    assert [e.origin.rsplit(":", 1)[1] for e in data.examples] == ["1", "4"]


def test_per_source_format_overrides_detection(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [json.dumps({"prompt": "q", "text": "t"})])
    assert load_source(SourceSpec(str(path))).format == "prompt"
    assert load_source(SourceSpec(str(path), format="text")).examples[0].text == "t"
    assert load_source(SourceSpec(str(path)), default_format="text").format == "text"


def test_on_error_skip_counts_and_reports_lines(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [
        json.dumps(RECORDS[0]), "{not json", json.dumps({"instruction": "x"}), json.dumps(RECORDS[1]),
        json.dumps({"instruction": 1, "output": "y"}),
    ])
    data = load_source(SourceSpec(str(path)), on_error="skip")
    assert len(data.examples) == 2
    assert len(data.skipped) == 3
    assert data.skipped[0].startswith(f"{path}:2: malformed JSON")
    assert data.skipped[1] == f"{path}:3: missing field 'output'"
    assert data.skipped[2].startswith(f"{path}:5: field 'instruction' must be a str")


# ---- CSV and TSV ----

ALPACA_CSV = (
    "instruction,input,output\n"
    "q0,,a0\n"
    '"Add, then explain.","2, 3","5.\nBecause 2 + 3 = 5."\n'
    "\n"
    'What is 2+2?,,4\n'
    '"Say ""hi"".",,"""hi"""\n'
)
ALPACA_TSV = (
    "instruction\tinput\toutput\n"
    "q0\t\ta0\n"
    '"Add, then explain."\t2, 3\t"5.\nBecause 2 + 3 = 5."\n'
    "\n"
    "What is 2+2?\t\t4\n"
    'Say "hi".\t\t"""hi"""\n'
)
ALPACA_ROWS = [("q0", "", "a0"), ("Add, then explain.", "2, 3", "5.\nBecause 2 + 3 = 5."), ("What is 2+2?", "", "4"),
               ('Say "hi".', "", '"hi"')]


@pytest.mark.parametrize("name, text", [("a.csv", ALPACA_CSV), ("a.tsv", ALPACA_TSV)])
def test_csv_and_tsv_columns_are_fields_with_format_detection_and_line_origins(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    data = load_source(SourceSpec(str(path)))
    assert data.format == "alpaca"
    assert [(e.messages[0].content, e.messages[0].context, e.messages[1].content) for e in data.examples] == ALPACA_ROWS
    assert [e.origin for e in data.examples] == [f"{path}:{line}" for line in (2, 3, 6, 7)]


def test_csv_gives_the_same_examples_as_jsonl_and_reads_other_formats(tmp_path):
    (tmp_path / "a.csv").write_text("\ufeffinstruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n"
                                                                          for r in RECORDS))
    jsonl = _jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in RECORDS])
    assert [e.messages for e in load_source(SourceSpec(str(tmp_path / "a.csv"))).examples] == [
        e.messages for e in load_source(SourceSpec(str(jsonl))).examples
    ]
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected,strength,safety\nq,good,bad,1,false\nq2,good,bad,,\n")
    data = load_source(SourceSpec(str(tmp_path / "p.csv")))
    assert data.format == "preference"
    assert [(p.chosen[0].content, p.strength, p.safety) for p in data.examples] == [("good", 1, 0), ("good", -1, -1)]
    (tmp_path / "d.tsv").write_text("instruction\tcontext\tresponse\tcategory\nq\tc\tr\topen_qa\n")
    assert load_source(SourceSpec(str(tmp_path / "d.tsv"))).format == "dolly"


def test_csv_rows_that_do_not_fit_the_header_name_file_and_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('instruction,output\n"a\nb",c\nx,y,z\nq,r\n')
    with pytest.raises(JaxalignError, match=rf"^{path}:4: expected 2 cells \(instruction, output\), got 3"):
        load_source(SourceSpec(str(path)))
    data = load_source(SourceSpec(str(path)), on_error="skip")
    assert [e.origin for e in data.examples] == [f"{path}:2", f"{path}:5"] and len(data.skipped) == 1


def test_csv_record_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("instruction,output\nq,a\nq2,\n")
    with pytest.raises(JaxalignError, match=rf"^{path}:3: field 'output' is a blank response"):
        load_source(SourceSpec(str(path)))
    (tmp_path / "b.csv").write_text("instruction,output,output\nq,a,b\n")
    with pytest.raises(JaxalignError, match=r"b.csv:1: the header names columns \['output'\] more than once"):
        load_source(SourceSpec(str(tmp_path / "b.csv")))
    (tmp_path / "c.csv").write_text("")
    with pytest.raises(JaxalignError, match=r"c.csv: empty file; expected a header row"):
        load_source(SourceSpec(str(tmp_path / "c.csv")))
    (tmp_path / "d.csv").write_bytes(b"instruction,output\nq,\xff\n")
    with pytest.raises(JaxalignError, match=r"d.csv: not UTF-8 text"):
        load_source(SourceSpec(str(tmp_path / "d.csv")))


def test_an_unsupported_extension_is_an_error_listing_the_supported_ones(tmp_path):
    supported = r"supported: \.jsonl, \.json, \.parquet, \.csv, \.tsv files, or demo:NAME, hf:NAME, tfds:NAME"
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    with pytest.raises(JaxalignError, match=rf"^data source {tmp_path / 'data.xlsx'}: cannot read '.xlsx' files; "
                                            rf"{supported}$"):
        load_source(SourceSpec(str(tmp_path / "data.xlsx")))
    (tmp_path / "data").write_text(json.dumps(RECORDS[0]))
    with pytest.raises(JaxalignError, match="cannot read files without an extension"):
        load_source(SourceSpec(str(tmp_path / "data")))
    (tmp_path / "glob").mkdir()
    _jsonl(tmp_path / "glob" / "a.jsonl", [json.dumps(RECORDS[0])])
    (tmp_path / "glob" / "notes.txt").write_text("x")
    with pytest.raises(JaxalignError, match=rf"data source {tmp_path / 'glob' / 'notes.txt'}: cannot read '.txt'"):
        load_source(SourceSpec(str(tmp_path / "glob" / "*")))
    (tmp_path / "upper.CSV").write_text("text\nhello\n")
    assert load_source(SourceSpec(str(tmp_path / "upper.CSV"))).examples[0].text == "hello"


# ---- blank responses ----

BLANK_LINES = [
    json.dumps(RECORDS[0]),
    json.dumps({"instruction": "x", "output": "  "}),
    json.dumps(RECORDS[1]),
    json.dumps({"instruction": "y"}),
    json.dumps({"instruction": "z", "output": ""}),
]


def test_a_blank_response_is_an_error_naming_file_line_and_field_by_default(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [json.dumps({"messages": [
        {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": ""}]})])
    with pytest.raises(JaxalignError, match=rf"^{path}:1: field 'messages\[1\].content' is a blank response "
                                            r".*set data.blank_responses=skip"):
        load_source(SourceSpec(str(path)))


def test_blank_responses_skip_drops_and_counts_them_and_other_errors_still_raise(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", BLANK_LINES)
    with pytest.raises(JaxalignError, match=rf"{path}:4: missing field 'output'"):
        load_source(SourceSpec(str(path)), blank_responses="skip")
    data = load_source(SourceSpec(str(path)), on_error="skip", blank_responses="skip")
    assert [e.origin for e in data.examples] == [f"{path}:1", f"{path}:3"]
    assert data.blank == 2
    assert data.skipped == [f"{path}:2: field 'output' is a blank response", f"{path}:4: missing field 'output'",
                            f"{path}:5: field 'output' is a blank response"]


def test_with_blank_responses_error_on_error_skip_skips_them_as_bad_records(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", BLANK_LINES)
    data = load_source(SourceSpec(str(path)), on_error="skip")
    assert len(data.examples) == 2 and len(data.skipped) == 3 and data.blank == 0
    assert data.skipped[0].startswith(f"{path}:2: field 'output' is a blank response (empty or whitespace only)")


def test_pairs_with_identical_answers_are_always_skipped_and_counted(tmp_path):
    lines = [
        json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}),
        json.dumps({"prompt": "2+3?", "chosen": "5", "rejected": "5"}),
        json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: hello"}),
    ]
    path = _jsonl(tmp_path / "pairs.jsonl", lines[:2])
    data = load_source(SourceSpec(str(path)))
    assert [e.origin for e in data.examples] == [f"{path}:1"] and data.identical == 1
    assert data.skipped == [f"{path}:2: chosen and rejected are identical"]
    hh = _jsonl(tmp_path / "hh.jsonl", [lines[2], json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b",
                                                                 "rejected": "\n\nHuman: a\n\nAssistant: c"})])
    assert load_source(SourceSpec(str(hh))).identical == 1


def test_a_pair_may_carry_its_own_numeric_margin(tmp_path):
    from jaxalign.data.packing import preference_batch

    path = _jsonl(tmp_path / "pairs.jsonl", [
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "strength": "better", "margin": 0.25}),
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "d", "strength": "better"}),
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "e", "margin": "wide"}),
    ])
    with pytest.raises(JaxalignError, match=rf"{path}:3: field 'margin': expected a number, got 'wide'"):
        load_source(SourceSpec(str(path)))
    examples = load_source(SourceSpec(str(path)), on_error="skip").examples
    assert [e.margin for e in examples] == [0.25, None]
    pair = ((np.array([1, 2]), np.array([0, 1], bool)), (np.array([1, 3]), np.array([0, 1], bool)))
    batch = preference_batch([(*pair, e.strength, e.safety, e.margin) for e in examples], 4, 0, "large")
    np.testing.assert_allclose(batch["margin"], [0.25, 2.0])


# ---- bad input ----


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [json.dumps(RECORDS[0]), '{"instruction": "x", "output": }'])
    with pytest.raises(JaxalignError, match=rf"^{path}:2: malformed JSON: Expecting value \(column 32\)"):
        load_source(SourceSpec(str(path)))


def test_missing_field_names_file_line_and_field(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [json.dumps(RECORDS[0]), json.dumps({"instruction": "x", "outptu": "y"})])
    with pytest.raises(JaxalignError, match=rf"^{path}:2: missing field 'output'$"):
        load_source(SourceSpec(str(path)))


def test_missing_file(tmp_path):
    with pytest.raises(JaxalignError, match=r"data source .*nope.jsonl: file does not exist"):
        load_source(SourceSpec(str(tmp_path / "nope.jsonl")))


def test_glob_without_matches(tmp_path):
    with pytest.raises(JaxalignError, match="the glob matched no files"):
        load_source(SourceSpec(str(tmp_path / "*.jsonl")))


def test_folder_without_data_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(JaxalignError, match="the folder has no .jsonl, .json, .parquet, .csv, .tsv files"):
        load_source(SourceSpec(str(tmp_path)))


def test_unknown_demo_dataset():
    with pytest.raises(JaxalignError,
                       match="no such demo dataset; available: arithmetic, arithmetic_sft, dialogues_messages, "
                             "dialogues_sharegpt, instruction_following, instructions"):
        load_source(SourceSpec("demo:nothing"))


def test_json_file_must_hold_a_list(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": RECORDS}))
    with pytest.raises(JaxalignError, match="a .json data file must hold a list of records, got dict"):
        load_source(SourceSpec(str(tmp_path / "a.json")))


def test_malformed_json_file_names_the_line(tmp_path):
    (tmp_path / "a.json").write_text('[\n  {"instruction": "x", "output": "y"},\n  {"instruction": \n]')
    with pytest.raises(JaxalignError, match=r"a.json:4: malformed JSON"):
        load_source(SourceSpec(str(tmp_path / "a.json")))


def test_json_record_error_names_the_record(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([RECORDS[0], {"instruction": "x"}]))
    with pytest.raises(JaxalignError, match=r"a.json: record 1: missing field 'output'"):
        load_source(SourceSpec(str(tmp_path / "a.json")))


def test_unreadable_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "a.parquet").write_bytes(b"definitely not parquet")
    with pytest.raises(JaxalignError, match="not a readable Parquet file"):
        load_source(SourceSpec(str(tmp_path / "a.parquet")))


def test_no_usable_records_after_skipping(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", ["{bad", "[1, 2]"])
    with pytest.raises(JaxalignError, match=r"no usable records \(2 skipped, first: .*a.jsonl:1: malformed JSON"):
        load_source(SourceSpec(str(path)), on_error="skip")


def test_format_mismatch_after_detection_names_the_line(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [json.dumps(RECORDS[0]), json.dumps({"text": "t"})])
    with pytest.raises(JaxalignError, match=rf"{path}:2: missing field 'instruction'"):
        load_source(SourceSpec(str(path)))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_source_without_datasets_says_what_to_install():
    with pytest.raises(JaxalignError, match=r"hf:tatsu-lab/alpaca: needs the Hugging Face `datasets` package"):
        load_source(SourceSpec("hf:tatsu-lab/alpaca"))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_hf_source_reads_local_files(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [json.dumps(r) for r in RECORDS])
    data = load_source(SourceSpec(f"hf:{tmp_path}"))
    assert data.format == "alpaca" and len(data.examples) == 5
    assert data.examples[0].origin == f"hf:{tmp_path}[train] row 0"


@pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is not None, reason="tfds is installed")
def test_tfds_source_without_tfds_says_what_to_install():
    with pytest.raises(JaxalignError, match=r"tfds:mnist: needs tensorflow-datasets"):
        load_source(SourceSpec("tfds:mnist"))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny tensorflow-datasets dataset prepared as array_record (no TensorFlow needed)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")

    class JaxalignTestInstructions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"instruction": tfds.features.Text(), "output": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, record in enumerate(RECORDS):
                yield i, record

    data_dir = tmp_path_factory.mktemp("tfds")
    JaxalignTestInstructions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_data_source_on_array_record(tfds_dir):
    data = load_source(SourceSpec("tfds:jaxalign_test_instructions", data_dir=str(tfds_dir)))
    assert data.format == "alpaca"
    assert sorted((m[0].content, m[1].content) for m in (e.messages for e in data.examples)) == [
        (r["instruction"], r["output"]) for r in RECORDS
    ]
    assert data.examples[0].origin == "tfds:jaxalign_test_instructions[train] row 0"
    with pytest.raises(JaxalignError, match=r"tfds:jaxalign_test_instructions \(split 'test'\)"):
        load_source(SourceSpec("tfds:jaxalign_test_instructions", split="test", data_dir=str(tfds_dir)))
