"""configs/pods/: each loads as an SFT config, its mesh covers exactly the chips of the TPU its header names, it is
configs/llama2_chat_sft.yaml but for the mesh, dtypes, batch layout and output_dir, and its memory comment is what
`jaxalign plan` prints for it."""

import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jaxalign.cli import main
from jaxalign.commands.sft import SFTConfig
from jaxalign.config import load_config, to_dict

REPO = Path(__file__).resolve().parent.parent
PODS = sorted((REPO / "configs" / "pods").glob("*.yaml"))
# the keys a pod config may set differently from the recipe it is derived from
LAYOUT_KEYS = {"output_dir", "model.path", "model.dtype", "model.param_dtype", "train.grad_accum", "mesh.data",
               "mesh.fsdp", "mesh.tensor"}


def chips(accelerator_type: str) -> int:
    """Chips of a Cloud TPU accelerator type: v4 and v5p count TensorCores (2 per chip), v5e and v6e count chips."""
    generation, size = accelerator_type.rsplit("-", 1)
    return int(size) // 2 if generation in ("v2", "v3", "v4", "v5p") else int(size)


def flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "config":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_there_are_pod_configs():
    assert [p.stem for p in PODS] == ["llama2_70b_sft_v5p-256", "llama2_7b_sft_v4-8", "llama2_7b_sft_v5e-16",
                                      "llama2_7b_sft_v5p-32"]


@pytest.mark.parametrize("path", PODS, ids=lambda p: p.stem)
def test_mesh_covers_the_chips_named_in_the_file(path):
    config = load_config(SFTConfig, path)
    header = re.search(r"^# TPU: (\S+) = (\d+) chips", path.read_text(), re.MULTILINE)
    assert header, "the header names the TPU: '# TPU: v4-8 = 4 chips ...'"
    accelerator, named = header.group(1), int(header.group(2))
    assert accelerator in path.stem.replace("v5e-", "v5litepod-")
    assert chips(accelerator) == named
    mesh = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    assert -1 not in mesh and math.prod(mesh) == named
    micro_batch = config.train.batch_size // config.train.grad_accum
    assert micro_batch % (config.mesh.data * config.mesh.fsdp) == 0


@pytest.mark.parametrize("path", PODS, ids=lambda p: p.stem)
def test_same_recipe_as_llama2_chat_sft(path):
    recipe = flat(to_dict(load_config(SFTConfig, REPO / "configs" / "llama2_chat_sft.yaml")))
    pod = flat(to_dict(load_config(SFTConfig, path)))
    assert {key for key in recipe if recipe[key] != pod[key]} <= LAYOUT_KEYS
    assert pod["model.dtype"] == "bfloat16" and pod["model.config"]["remat"] == "full"


@pytest.mark.parametrize("path", PODS, ids=lambda p: p.stem)
def test_memory_comment_is_what_jaxalign_plan_prints(path, capsys):
    text = path.read_text()
    command = re.search(r"^# Memory \((jaxalign plan .*)\):$", text, re.MULTILINE).group(1)
    words = shlex.split(command)
    mesh = load_config(SFTConfig, path).mesh
    assert words[2:5] == [f"configs/pods/{path.name}", "--devices", str(mesh.data * mesh.fsdp * mesh.tensor)]
    assert words[5:7] == ["--chip", path.stem.rsplit("_", 1)[1].split("-")[0]]
    shape = yaml.safe_load(words[-1].removeprefix("model.config="))
    assert shape["num_layers"] == (80 if "70b" in path.stem else 32)
    assert main(["plan", str(REPO / words[2]), *words[3:]]) == 0
    lines = capsys.readouterr().out.splitlines()
    total = " ".join(next(line for line in lines if line.strip().startswith("train step total")).split())
    assert f"#   {total}; {lines[-1]}" in text and lines[-1].startswith("fits:")
