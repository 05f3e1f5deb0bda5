import json
import re

import numpy as np
import pytest

from jaxalign.config import from_dict
from jaxalign.data import DataConfig, build_loader, make_global_batch
from jaxalign.data.loader import DataLoader
from jaxalign.errors import JaxalignError


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """37 alpaca records whose texts carry their number, of varied lengths."""
    path = tmp_path_factory.mktemp("data") / "numbered.jsonl"
    return _write_jsonl(path, [{"instruction": f"item {i}" + " x" * (i % 7), "output": f"ok {i}"} for i in range(37)])


def _config(**values):
    return from_dict(DataConfig, {"template": "gpt4all", **values})


def _example_numbers(byte_tok, batch) -> list[int]:
    """The record numbers of the examples of an LM batch, row by row, segment by segment."""
    out = []
    for ids, segments in zip(batch["input_ids"], batch["segment_ids"]):
        for segment in range(1, int(segments.max()) + 1):
            text = byte_tok.decode(ids[segments == segment].tolist())
            out.append(int(re.search(r"item (\d+)", text).group(1)))
    return out


def _equal_batches(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("pack, overlong, seq_len", [(False, "truncate", 48), (True, "truncate", 48),
                                                     (True, "split", 12), (False, "split", 12)])
def test_resume_continues_with_identical_batches(byte_tok, numbered, pack, overlong, seq_len):
    config = _config(train=str(numbered), pack=pack, seed=5, truncation={"overlong": overlong}, mask="full")
    loader = build_loader(config, byte_tok, batch_size=4, seq_len=seq_len)
    reference = [next(loader) for _ in range(25)]  # several epochs of 37 examples
    for k in (3, 11, 15, 19):  # with split, 11 and 15 stop inside an example (part 1, 2)
        first = build_loader(config, byte_tok, batch_size=4, seq_len=seq_len)
        for _ in range(k):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = build_loader(config, byte_tok, batch_size=4, seq_len=seq_len)
        resumed.load_state_dict(state)
        for expected in reference[k : k + 5]:
            assert _equal_batches(next(resumed), expected)


def test_state_dict_is_json_and_counts(byte_tok, numbered):
    loader = build_loader(_config(train=str(numbered)), byte_tok, batch_size=4, seq_len=48)
    next(loader)
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["epoch"] == 0 and state["position"] == 4 and state["stats"]["examples"] == 4


def test_two_processes_cover_the_epoch_exactly_without_overlap(byte_tok, numbered):
    config = _config(train=str(numbered), pack=True, seed=1)
    shares = []
    for p in range(2):
        loader = build_loader(config, byte_tok, batch_size=4, seq_len=48, process_index=p, process_count=2)
        share_size = loader.shard(0).size
        seen = []
        while len(seen) < share_size:
            seen += _example_numbers(byte_tok, next(loader))
        shares.append(seen[:share_size])
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(37))
    assert abs(len(shares[0]) - len(shares[1])) <= 1


def test_epochs_are_reshuffled_deterministically(byte_tok, numbered):
    loader = build_loader(_config(train=str(numbered), seed=2), byte_tok, batch_size=4, seq_len=48)
    again = build_loader(_config(train=str(numbered), seed=2), byte_tok, batch_size=4, seq_len=48)
    other = build_loader(_config(train=str(numbered), seed=3), byte_tok, batch_size=4, seq_len=48)
    assert (loader.epoch_order(0) == again.epoch_order(0)).all()
    assert not (loader.epoch_order(0) == loader.epoch_order(1)).all()
    assert not (loader.epoch_order(0) == other.epoch_order(0)).all()
    assert sorted(loader.epoch_order(1)) == list(range(37))
    unshuffled = build_loader(_config(train=str(numbered), shuffle=False), byte_tok, batch_size=4, seq_len=48)
    assert _example_numbers(byte_tok, next(unshuffled)) == [0, 1, 2, 3]


def test_mixture_weights(byte_tok, tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"item {i}", "output": "a"} for i in range(10)])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"item {100 + i}", "output": "b"} for i in range(20)])
    config = _config(train=[{"path": str(a), "weight": 2.0}, {"path": str(b), "weight": 0.5}])
    loader = build_loader(config, byte_tok, batch_size=4, seq_len=48)
    for epoch in (0, 1):
        order = loader.epoch_order(epoch)
        counts = np.bincount(order, minlength=30)
        assert (counts[:10] == 2).all() and counts[10:].sum() == 10 and counts[10:].max() == 1
    drawn = [set(order[order >= 10]) for order in (loader.epoch_order(0), loader.epoch_order(1))]
    assert drawn[0] != drawn[1]


def test_eval_fraction_splits_disjointly(byte_tok, numbered):
    config = _config(train=str(numbered), eval_fraction=0.2)
    train = build_loader(config, byte_tok, batch_size=4, seq_len=48)
    evaluation = build_loader(config, byte_tok, batch_size=4, seq_len=48, split="eval")
    train_items = {e.origin for e in train.examples}
    eval_items = {e.origin for e in evaluation.examples}
    assert len(eval_items) == 7 and len(train_items) == 30 and not train_items & eval_items


def test_eval_loader_is_one_padded_pass_the_same_length_on_every_process(byte_tok, numbered):
    config = _config(train=str(numbered), eval=str(numbered), pack=True)
    lengths, numbers = [], []
    for p in range(2):
        loader = build_loader(config, byte_tok, batch_size=4, seq_len=48, split="eval", process_index=p,
                              process_count=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(_equal_batches(x, y) for x, y in zip(batches, list(loader)))  # a second pass is the same
        lengths.append(len(batches))
        numbers += [n for b in batches for n in _example_numbers(byte_tok, b)]
    assert lengths[0] == lengths[1]
    assert sorted(numbers) == list(range(37))


def test_preference_loader(byte_tok):
    config = from_dict(DataConfig, {"train": "demo:preferences", "template": "vicuna_v1.1", "margin": "small",
                                    "system_message": ""})
    loader = build_loader(config, byte_tok, batch_size=8, seq_len=256)
    batch = next(loader)
    assert loader.kind == "preference"
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (8, 256)
    assert set(batch["safety"].tolist()) <= {0, 1} and (batch["strength"] >= 0).all()
    np.testing.assert_allclose(batch["margin"], np.array([1.0, 2 / 3, 1 / 3, 0.0])[batch["strength"]], rtol=1e-6)
    for b in range(8):
        chosen = batch["chosen_input_ids"][b][batch["chosen_loss_mask"][b] == 0]
        rejected = batch["rejected_input_ids"][b][batch["rejected_loss_mask"][b] == 0]
        prompt_len = int(np.argmax(batch["chosen_loss_mask"][b]))
        assert (chosen[:prompt_len] == rejected[:prompt_len]).all()
        assert batch["chosen_loss_mask"][b].sum() > 0 and batch["rejected_loss_mask"][b].sum() > 0
    assert batch["example_index"].dtype == np.int32 and batch["example_index"].shape == (8,)
    for b, index in enumerate(batch["example_index"]):
        pair = loader.examples[index]
        chosen = byte_tok.decode(batch["chosen_input_ids"][b][batch["chosen_segment_ids"][b] > 0].tolist())
        assert chosen.endswith(f" {pair.chosen[-1].content}</s>")


def test_preference_eval_padding_rows_have_example_index_minus_one(byte_tok):
    config = from_dict(DataConfig, {"train": "demo:preferences", "eval": "demo:preferences", "template": "plain"})
    loader = build_loader(config, byte_tok, batch_size=8, seq_len=512, split="eval")
    indices = np.concatenate([b["example_index"] for b in loader])
    masks = np.concatenate([b["pair_mask"] for b in loader])
    n = len(loader.examples)
    assert n % 8, "the eval set should end with padding rows"
    assert sorted(indices[masks == 1].tolist()) == list(range(n)) and (indices[masks == 0] == -1).all()


def _unpaired_records(n: int) -> list[dict]:
    """TRL-style unpaired records, every third a two-turn LLaMA-Factory one; even numbers desirable."""
    records = []
    for i in range(n):
        if i % 3 == 2:
            messages = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"},
                        {"role": "user", "content": f"more {i}?"}, {"role": "assistant", "content": f"b{i}"}]
            records.append({"messages": messages, "label": i % 2 == 0})
        else:
            records.append({"prompt": f"q{i}", "completion": f"c{i}" + "!" * (i % 4), "label": str(i % 2 == 0)})
    return records


def _unpaired_text(byte_tok, batch, prefix, b, trained=False):
    ids = batch[f"{prefix}input_ids"][b][batch[f"{prefix}segment_ids"][b] > 0]
    if trained:  # the tokens predicted where the loss mask is on
        ids = batch[f"{prefix}targets"][b][batch[f"{prefix}loss_mask"][b] == 1]
    return byte_tok.decode(ids.tolist())


def test_unpaired_loader_pairs_each_prompt_with_the_next_examples_completion(byte_tok, tmp_path):
    path = _write_jsonl(tmp_path / "kto.jsonl", _unpaired_records(7))
    config = _config(train=str(path), shuffle=False)
    loader = build_loader(config, byte_tok, batch_size=4, seq_len=64)
    assert loader.kind == "unpaired" and loader.sources[0].format == "unpaired"
    n = len(loader.examples)
    for i, example in enumerate(loader.examples):
        assert example.mismatched == loader.examples[(i + 1) % n].completion
    first, second = next(loader), next(loader)
    for key in ("input_ids", "targets", "loss_mask", "segment_ids", "positions"):
        for prefix in ("completion_", "kl_"):
            assert first[prefix + key].shape == (4, 64) and first[prefix + key].dtype == np.int32
    assert first["desirable"].dtype == first["example_mask"].dtype == np.float32
    assert first["example_index"].dtype == np.int32
    assert first["example_index"].tolist() == [0, 1, 2, 3] and second["example_index"].tolist() == [4, 5, 6, 0]
    assert first["desirable"].tolist() == [1.0, 0.0, 1.0, 0.0] and second["desirable"].tolist() == [1, 0, 1, 1]
    assert first["example_mask"].tolist() == [1.0] * 4
    records = _unpaired_records(7)

    def prompt_and_answer(i):
        record = records[i]
        if "messages" in record:
            return f"<s>q{i}\na{i}</s>more {i}?\n", f"b{i}"
        return f"<s>q{i}\n", record["completion"]

    for batch in (first, second):
        for b, i in enumerate(batch["example_index"].tolist()):
            prompt, answer = prompt_and_answer(i)
            _, other = prompt_and_answer((i + 1) % n)
            assert _unpaired_text(byte_tok, batch, "completion_", b) == f"{prompt}{answer}</s>"
            assert _unpaired_text(byte_tok, batch, "kl_", b) == f"{prompt}{other}</s>"
            # only the continuation after the prompt is trained, in both halves
            assert _unpaired_text(byte_tok, batch, "completion_", b, trained=True) == f"{answer}</s>"
            assert _unpaired_text(byte_tok, batch, "kl_", b, trained=True) == f"{other}</s>"
            ids = batch["kl_input_ids"][b][batch["kl_segment_ids"][b] > 0]
            expected = byte_tok.encode(f"{prompt}{other}</s>", add_special_tokens=False)
            assert ids.tolist() == expected


def test_unpaired_loader_resumes_and_pads_the_eval_pass(byte_tok, tmp_path):
    path = _write_jsonl(tmp_path / "kto.jsonl", _unpaired_records(11))
    config = _config(train=str(path), eval=str(path), seed=4)
    loader = build_loader(config, byte_tok, batch_size=4, seq_len=64)
    reference = [next(loader) for _ in range(6)]
    for k in (1, 3):
        first = build_loader(config, byte_tok, batch_size=4, seq_len=64)
        for _ in range(k):
            next(first)
        resumed = build_loader(config, byte_tok, batch_size=4, seq_len=64)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert _equal_batches(next(resumed), reference[k])
    stats = loader.state_dict()["stats"]
    assert stats["examples"] == 24
    tokens = sum(int((b["completion_segment_ids"] > 0).sum() + (b["kl_segment_ids"] > 0).sum()) for b in reference)
    trained = sum(int(b["completion_loss_mask"].sum() + b["kl_loss_mask"].sum()) for b in reference)
    assert (stats["tokens"], stats["trained_tokens"]) == (tokens, trained)
    counts = loader.pass_stats()
    assert counts["examples"] == 11 and counts["packing_efficiency"] < 0.5
    evaluation = build_loader(config, byte_tok, batch_size=4, seq_len=64, split="eval")
    batches = list(evaluation)
    assert len(batches) == 3
    last = batches[-1]
    assert last["example_mask"].tolist() == [1, 1, 1, 0] and last["example_index"].tolist() == [8, 9, 10, -1]
    assert last["desirable"][3] == 0 and not last["kl_segment_ids"][3].any()


def test_unpaired_split_of_one_example_is_an_error(byte_tok, tmp_path):
    path = _write_jsonl(tmp_path / "one.jsonl", _unpaired_records(1))
    with pytest.raises(JaxalignError, match="data.train has 1 unpaired example; KTO needs at least 2"):
        build_loader(_config(train=str(path)), byte_tok, batch_size=4, seq_len=64)
    two = _write_jsonl(tmp_path / "two.jsonl", _unpaired_records(2))
    loader = build_loader(_config(train=str(two), format="unpaired"), byte_tok, batch_size=2, seq_len=64)
    assert loader.kind == "unpaired" and loader.examples[1].mismatched == loader.examples[0].completion


def test_prompt_loader_for_rl(byte_tok):
    config = from_dict(DataConfig, {"train": "demo:prompts", "template": "vicuna_v1.1", "system_message": ""})
    loader = build_loader(config, byte_tok, batch_size=4, seq_len=64)
    batch = next(loader)
    assert loader.kind == "prompt"
    for b in range(4):
        text = byte_tok.decode(batch["input_ids"][b][batch["segment_ids"][b] == 1].tolist())
        assert text.startswith("<s>USER: ") and text.endswith(" ASSISTANT:")
        assert batch["input_ids"][b][-1] == byte_tok.convert_tokens_to_ids(":")
        example = loader.examples[batch["example_index"][b]]
        assert f"USER: {example.messages[-1].content} ASSISTANT:" in text and example.reference


def test_dropped_and_truncated_are_counted(byte_tok, tmp_path):
    records = [{"instruction": "short", "output": "fine"}, {"instruction": "p" * 100, "output": "lost"},
               {"instruction": "q", "output": "r" * 100}]
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    loader = build_loader(_config(train=str(path), shuffle=False), byte_tok, batch_size=2, seq_len=32)
    next(loader)
    stats = loader.state_dict()["stats"]
    assert stats["dropped"] == 1 and stats["truncated"] == 1 and stats["examples"] == 2
    counts = loader.pass_stats()
    assert (counts["examples"], counts["dropped"], counts["truncated"]) == (2, 1, 1)


def test_make_global_batch_shards_rows_over_the_mesh(byte_tok, numbered):
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    batch = next(build_loader(_config(train=str(numbered)), byte_tok, batch_size=8, seq_len=48))
    arrays = make_global_batch(batch, mesh)
    assert arrays["input_ids"].shape == (8, 48)
    assert len(arrays["input_ids"].addressable_shards) == 8
    assert arrays["input_ids"].addressable_shards[0].data.shape == (1, 48)
    np.testing.assert_array_equal(np.asarray(arrays["loss_mask"]), batch["loss_mask"])


def test_loader_errors(byte_tok, numbered, sp_tok):
    with pytest.raises(JaxalignError, match="train.batch_size"):
        build_loader(_config(train=str(numbered)), byte_tok, batch_size=3, seq_len=48, process_count=2)
    with pytest.raises(JaxalignError, match="process_index 2"):
        build_loader(_config(train=str(numbered)), byte_tok, batch_size=4, seq_len=48, process_index=2,
                     process_count=2)
    with pytest.raises(JaxalignError, match="no pad token.*data.pad_token"):
        build_loader(_config(train=str(numbered)), sp_tok, batch_size=4, seq_len=48)
    with pytest.raises(JaxalignError, match="'epoch' and 'position'"):
        build_loader(_config(train=str(numbered)), byte_tok, batch_size=4, seq_len=48).load_state_dict({"epoch": 0})


def test_mixing_kinds_in_one_split_is_an_error(byte_tok):
    config = from_dict(DataConfig, {"train": ["demo:instructions", "demo:preferences"], "template": "alpaca"})
    with pytest.raises(JaxalignError, match="mixes examples of different kinds"):
        DataLoader(config, byte_tok, batch_size=4, seq_len=64)


def test_every_example_dropped_is_an_error_not_an_endless_loop(byte_tok, numbered):
    loader = build_loader(_config(train=str(numbered), system_message="x" * 80), byte_tok, batch_size=2, seq_len=16)
    with pytest.raises(JaxalignError, match="every example is dropped .*seq_len 16"):
        next(loader)


def test_overlong_split_cuts_examples_into_blocks(byte_tok, tmp_path):
    path = _write_jsonl(tmp_path / "long.jsonl", [{"text": "abcdefghij" * 3}])
    config = from_dict(DataConfig, {"train": str(path), "truncation": {"overlong": "split"}, "shuffle": False})
    loader = build_loader(config, byte_tok, batch_size=4, seq_len=12)
    batch = next(loader)
    rows = [byte_tok.decode(ids[seg > 0].tolist()) for ids, seg in zip(batch["input_ids"], batch["segment_ids"])]
    assert "".join(rows[:3]) == "<s>" + "abcdefghij" * 3 + "</s>"
    assert [len(byte_tok.encode(r, add_special_tokens=False)) for r in rows[:3]] == [12, 12, 8]
    assert rows[3].startswith("<s>abcdefghi")  # the next epoch
    assert loader.pass_stats()["examples"] == 3


def test_resuming_with_other_processes_or_data_is_an_error(byte_tok, numbered, tmp_path):
    config = _config(train=str(numbered))
    state = build_loader(config, byte_tok, batch_size=4, seq_len=48, process_count=2).state_dict()
    with pytest.raises(JaxalignError, match=r"saved with process \[0, 2\], this run has \[0, 1\]"):
        build_loader(config, byte_tok, batch_size=4, seq_len=48).load_state_dict(state)
    smaller = _write_jsonl(tmp_path / "s.jsonl", [{"instruction": "item 1", "output": "x"}])
    with pytest.raises(JaxalignError, match="saved with num_examples 37, this run has 1"):
        build_loader(_config(train=str(smaller)), byte_tok, batch_size=4, seq_len=48,
                     process_count=2).load_state_dict(state)


def test_mixture_of_formats_koala_style(byte_tok):
    config = from_dict(DataConfig, {
        "train": [{"path": "demo:instructions", "weight": 0.25}, {"path": "demo:dialogues_sharegpt", "weight": 0.5},
                  {"path": "demo:dialogues_messages", "weight": 0.5}],
        "template": "koala", "pack": True,
    })
    loader = build_loader(config, byte_tok, batch_size=4, seq_len=512)
    assert [s.format for s in loader.sources] == ["alpaca", "sharegpt", "messages"]
    assert loader.epoch_order(0).size == 120 + 160 + 160
    batch = next(loader)
    text = byte_tok.decode(batch["input_ids"][0][batch["segment_ids"][0] == 1].tolist())
    assert text.startswith("<s>BEGINNING OF CONVERSATION: ")
    assert batch["segment_ids"].max() > 1


WORKER = """
import json, sys
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxalign.config import from_dict
from jaxalign.data import DataConfig, build_loader, byte_tokenizer, make_global_batch

port, process_id, data, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
config = from_dict(DataConfig, {"train": data, "template": "gpt4all", "pack": True, "seed": 1})
loader = build_loader(config, byte_tokenizer(), batch_size=4, seq_len=48, process_index=jax.process_index(),
                      process_count=jax.process_count())
mesh = Mesh(np.array(jax.devices()).reshape(4, 1), ("data", "fsdp"))
batches = [make_global_batch(next(loader), mesh) for _ in range(3)]
gather = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))
rows = [np.asarray(gather(b["input_ids"])).tolist() for b in batches]
json.dump({"rows": rows, "state": loader.state_dict()}, open(out, "w"))
"""


def test_two_real_processes_make_one_global_batch(byte_tok, numbered, tmp_path, cpu_process_env):
    """Two jax.distributed processes (2 CPU devices each): each loads its own share, the global array is the
    concatenation of the shares in process order, identical to what the single-process simulation gives."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(port), str(i), str(numbered), str(tmp_path / f"{i}.json")],
                         env=cpu_process_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    assert results[0]["rows"] == results[1]["rows"]

    config = _config(train=str(numbered), pack=True, seed=1)
    simulated = [build_loader(config, byte_tok, batch_size=4, seq_len=48, process_index=p, process_count=2)
                 for p in range(2)]
    for rows in results[0]["rows"]:
        local = [next(loader)["input_ids"] for loader in simulated]
        assert np.array_equal(np.asarray(rows), np.concatenate(local))
    assert [r["state"] for r in results] == [loader.state_dict() for loader in simulated]


def test_prompt_ids_render_a_chat_for_generation(byte_tok):
    from jaxalign.data.loader import Preprocessor

    config = from_dict(DataConfig, {"template": "vicuna_v1.1", "system_message": "Be brief."})
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "3+3?"}]
    ids = Preprocessor(config, byte_tok, seq_len=64).prompt_ids(messages)
    assert byte_tok.decode(ids.tolist()) == "<s>Be brief. USER: 2+2? ASSISTANT: 4</s>USER: 3+3? ASSISTANT:"
    with pytest.raises(JaxalignError, match="chat: field 'messages' must end with a user turn"):
        Preprocessor(config, byte_tok, seq_len=64).prompt_ids(messages[:2], origin="chat")


def test_first_fit_places_examples_in_the_first_row_with_room():
    from jaxalign.data.loader import first_fit

    assert first_fit([10, 0, 0], 5, 16, pack=True) == 0
    assert first_fit([14, 3, 0], 5, 16, pack=True) == 1
    assert first_fit([14, 13, 12], 5, 16, pack=True) is None
    assert first_fit([14, 0, 0], 1, 16, pack=False) == 1
    assert first_fit([1, 1], 1, 16, pack=False) is None
