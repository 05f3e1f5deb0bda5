"""Every recipe in configs/ loads, matches its published hyperparameters, and runs at tiny scale exactly as the
README documents it."""

import json
import shlex
from pathlib import Path

import pytest

from jaxalign.cli import main
from jaxalign.commands.dpo import DPOConfig
from jaxalign.commands.grpo import GRPOConfig
from jaxalign.commands.ppo import PPOConfig
from jaxalign.commands.rm import RMConfig
from jaxalign.commands.sft import SFTConfig
from jaxalign.config import load_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

# recipe -> (published lr, global batch, max length); reward-model recipes run with `jaxalign rm`
RM_RECIPES = {
    "llama2_chat_rm_helpful": (1e-5, 512, 4096),
    "llama2_chat_rm_safety": (1e-5, 512, 4096),
}
# preference-optimisation recipes run with `jaxalign dpo`, RL recipes with `jaxalign ppo`
DPO_RECIPES = {
    "dpo": (5e-7, 64, 1024),
}
PPO_RECIPES = {
    "llama2_chat_ppo": (1e-6, 64, 2048),
}
GRPO_RECIPES = {
    "grpo_math": (1e-6, 1024, 1536),
}
RECIPES = {
    **RM_RECIPES,
    **DPO_RECIPES,
    **PPO_RECIPES,
    **GRPO_RECIPES,
    "alpaca": (2e-5, 128, 512),
    "vicuna": (2e-5, 128, 2048),
    "koala": (2e-5, 64, 2048),
    "gpt4all": (5e-5, 128, 1024),
    "false_promise": (2e-3, 32, 2048),
    "orca_stage1": (2e-5, 128, 2048),
    "orca_stage2": (2e-5, 128, 2048),
    "lima": (1e-5, 32, 2048),
    "dolly": (1e-5, 64, 2048),
    "llama2_chat_sft": (2e-5, 64, 4096),
}


def command(recipe: str) -> str:
    if recipe in PPO_RECIPES:
        return "ppo"
    if recipe in GRPO_RECIPES:
        return "grpo"
    return "rm" if recipe in RM_RECIPES else "dpo" if recipe in DPO_RECIPES else "sft"


def config_class(recipe: str) -> type:
    return {"rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig, "grpo": GRPOConfig, "sft": SFTConfig}[command(recipe)]


def readme_tiny_commands() -> dict[str, list[str]]:
    """The README's tiny-scale block: `tiny="..."` then one `jaxalign COMMAND configs/NAME.yaml $tiny ...` line per
    recipe, as argv lists (after `jaxalign`) keyed by recipe name, with `$tiny` expanded as the shell splits it."""
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index('```bash\ntiny="') + len("```bash\n"):]
    lines = block[: block.index("```")].strip().splitlines()
    tiny = shlex.split(lines[0])[0].removeprefix("tiny=").split()
    commands = {}
    for line in lines[1:]:
        words = shlex.split(line)
        assert words[:2] == ["jaxalign", command(Path(words[2]).stem)], line
        argv = [word for part in words[1:] for word in (tiny if part == "$tiny" else [part])]
        commands[Path(argv[1]).stem] = argv
    return commands


TINY = readme_tiny_commands()


def in_output_dir(argv: list[str], output_dir: Path) -> list[str]:
    """`argv` writing to `output_dir` instead of its documented `output_dir=runs/...`."""
    assert sum(arg.startswith("output_dir=") for arg in argv) == 1
    return [f"output_dir={output_dir}" if arg.startswith("output_dir=") else arg for arg in argv]


def losses(output_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Runs a recipe's documented tiny command (once per module) from the repository root; its output folder."""
    done = {}

    def run(name: str) -> Path:
        if name not in done:
            output_dir = tmp_path_factory.mktemp(name)
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(REPO)
                assert main(in_output_dir(TINY[name], output_dir)) == 0
            done[name] = output_dir
        return done[name]

    return run


def test_every_recipe_config_is_listed_and_has_a_documented_tiny_run():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(RECIPES) == sorted(TINY)
    assert all(argv[1] == f"configs/{name}.yaml" for name, argv in TINY.items())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_with_published_hyperparameters(name):
    config = load_config(config_class(name), CONFIGS / f"{name}.yaml")
    lr, batch_size, seq_len = RECIPES[name]
    assert config.optimizer.lr == lr
    assert config.train.batch_size == batch_size
    assert config.train.seq_len == seq_len
    assert config.model.path is not None and config.model.dtype == "bfloat16"


def test_reward_model_recipes_carry_llama2_settings():
    for kind in ("helpful", "safety"):
        config = load_config(RMConfig, CONFIGS / f"llama2_chat_rm_{kind}.yaml")
        optimizer = config.optimizer
        assert (config.loss.margin, config.data.template, config.data.truncation.overlong) == (
            "small", "llama2_chat", "drop")
        assert (optimizer.b1, optimizer.b2, optimizer.eps, optimizer.weight_decay, optimizer.clip) == (
            0.9, 0.95, 1e-5, 0.1, 1.0)
        assert (optimizer.schedule, optimizer.min_lr_ratio, optimizer.warmup_ratio) == ("cosine", 0.1, 0.03)


def test_recipe_specifics():
    alpaca = load_config(SFTConfig, CONFIGS / "alpaca.yaml")
    assert (alpaca.data.pad_token, alpaca.data.mask, alpaca.optimizer.warmup_ratio) == ("[PAD]", "prompt", 0.03)
    lima = load_config(SFTConfig, CONFIGS / "lima.yaml")
    assert lima.model.config["residual_dropout"] == [0.0, 0.3]
    assert (lima.data.template, lima.optimizer.schedule, lima.optimizer.min_lr_ratio) == ("lima", "linear", 0.1)
    assert (lima.optimizer.b2, lima.optimizer.weight_decay, lima.optimizer.warmup_steps) == (0.95, 0.1, 0)
    imitation = load_config(SFTConfig, CONFIGS / "false_promise.yaml").optimizer
    assert (imitation.name, imitation.factored, imitation.parameter_scale) == ("adafactor", False, True)
    assert (imitation.b1, imitation.decay, imitation.clip, imitation.warmup_steps) == (0.9, 0.95, 1.0, 1000)
    gpt4all = load_config(SFTConfig, CONFIGS / "gpt4all.yaml")
    assert gpt4all.data.truncation.max_prompt_fraction == 0.5 and gpt4all.optimizer.warmup_steps == 100
    assert gpt4all.model.lora.projections() == ("q_proj", "v_proj") and gpt4all.model.param_dtype == "bfloat16"
    stage1 = load_config(SFTConfig, CONFIGS / "orca_stage1.yaml")
    stage2 = load_config(SFTConfig, CONFIGS / "orca_stage2.yaml")
    assert stage2.model.path == f"{stage1.output_dir}/hf"
    dpo = load_config(DPOConfig, CONFIGS / "dpo.yaml")
    assert (dpo.loss.type, dpo.loss.beta, dpo.optimizer.schedule, dpo.optimizer.warmup_ratio) == (
        "sigmoid", 0.1, "linear", 0.1)
    assert dpo.optimizer.weight_decay == 0.0 and dpo.reference.precompute


# One recipe runs in the default selection; the others (10-30 s each) run with `-m slow`.
ALWAYS_RUN = "alpaca"


@pytest.mark.parametrize("name", [name if name == ALWAYS_RUN else pytest.param(name, marks=pytest.mark.slow)
                                  for name in sorted(RECIPES)])
def test_recipe_runs_at_tiny_scale_as_documented(name, tiny_run):
    output_dir = tiny_run(name)
    low = -10 if name in PPO_RECIPES or name in GRPO_RECIPES else 0  # a policy-gradient loss may be negative
    assert len(losses(output_dir)) == 2 and all(low < loss < 10 for loss in losses(output_dir))
    assert (output_dir / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_orca_stage2_starts_from_stage1_export(tiny_run, tmp_path):
    stage1 = tiny_run("orca_stage1")
    argv = [arg for arg in in_output_dir(TINY["orca_stage2"], tmp_path)
            if not arg.startswith(("model.path=", "model.config."))]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        assert main([*argv, f"model.path={stage1 / 'hf'}"]) == 0
    assert losses(tmp_path)[0] < losses(stage1)[0]


def test_quickstart_config_trains_from_scratch(quickstart_run):
    """configs/tiny/sft.yaml as the Quickstart runs it, shortened to 3 steps (shorter than its warmup: a warning)."""
    config = load_config(SFTConfig, CONFIGS / "tiny" / "sft.yaml")
    assert config.model.path is None and config.data.tokenizer == "byte"
    out, stderr = quickstart_run
    assert "'optimizer.warmup_steps': 12 warmup steps exceed train.steps=3" in stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 3]
    assert lines[-1]["eval_perplexity"] > 1
    assert (out / "hf" / "tokenizer.json").is_file()
