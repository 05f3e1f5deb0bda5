import json

import pytest

from jaxalign.cli import main
from jaxalign.commands.plot import read_metrics
from jaxalign.errors import JaxalignError


def write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_writes_loss_and_lr_pngs(tmp_path, capsys):
    records = [{"step": s, "loss": 5.0 / s, "lr": 1e-3 * s, "grad_norm": 1.0} for s in range(1, 11)]
    records.append({"step": 10, "eval_loss": 0.7, "eval_perplexity": 2.0})
    write_metrics(tmp_path / "metrics.jsonl", records)
    assert main(["plot", str(tmp_path)]) == 0
    for name in ("loss.png", "lr.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert str(tmp_path / "plots" / "loss.png") in capsys.readouterr().out


def test_read_metrics_collects_series_by_name(tmp_path):
    write_metrics(tmp_path / "m.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, "eval_loss": 1.5}])
    series = read_metrics(tmp_path / "m.jsonl")
    assert series["loss"] == ([1, 2], [2.0, 1.0])
    assert series["eval_loss"] == ([2], [1.5])


def test_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"loss": 2.0}\n')
    with pytest.raises(JaxalignError, match=r"metrics.jsonl:2: .*'step'"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_missing_metrics_is_a_cli_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
