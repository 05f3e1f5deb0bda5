"""`jaxalign` itself: the version, and options and overrides in any order."""

import importlib.metadata
from pathlib import Path

import pytest

from jaxalign.cli import build_parser, main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"jaxalign {importlib.metadata.version('jaxalign')}\n"


@pytest.mark.parametrize("argv, expected", [
    (["plan", "c.yaml", "--devices", "16", "model.path=/m"], {"devices": 16, "overrides": ["model.path=/m"]}),
    (["plan", "c.yaml", "a=1", "--devices", "16", "b=2"], {"devices": 16, "overrides": ["a=1", "b=2"]}),
    (["plan", "--devices", "16", "c.yaml", "a=1"], {"devices": 16, "overrides": ["a=1"]}),
    (["data", "inspect", "c.yaml", "--color", "never", "data.pack=false"],
     {"color": "never", "overrides": ["data.pack=false"]}),
    (["data", "inspect", "c.yaml", "-n", "1", "a=1", "--split", "eval", "b=2"],
     {"num_examples": 1, "split": "eval", "overrides": ["a=1", "b=2"]}),
    (["sft", "c.yaml", "train.steps=2", "optimizer.lr=1e-5"], {"overrides": ["train.steps=2", "optimizer.lr=1e-5"]}),
])
def test_overrides_may_come_before_and_after_options(argv, expected):
    args = build_parser().parse_args(argv)
    assert str(args.config) == "c.yaml"
    assert {key: getattr(args, key) for key in expected} == expected


def test_unknown_option_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["plan", "c.yaml", "--devicez", "16", "a=1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --devicez" in capsys.readouterr().err


def test_override_after_an_option_reaches_the_config(capsys):
    argv = ["plan", str(CONFIGS / "vicuna.yaml"), "--devices", "16", "model.path=null", "model.config.preset=tiny"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fsdp=16" in out and "106,816 trained" in out
