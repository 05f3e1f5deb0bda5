"""A recipe of several training commands run in order, each stage reading an earlier stage's export, and a report of
them all (`jaxalign pipeline`).

A pipeline file is YAML:

    output_dir: runs/llama2-chat-tiny
    stages:
      sft:                                  # the stage's name: its outputs go to OUTPUT_DIR/sft/
        command: sft                        # sft | rm | dpo | ppo | grpo | rs | gatt
        base: ../tiny/sft.yaml              # optional: a config file (relative to the pipeline file) ...
        config:                             # ... with these keys merged over it ({} clears a mapping)
          train: {steps: 120}
      rm_helpful:
        command: rm
        base: ../tiny/rm.yaml
        config:
          model: {path: ${sft}, config: {}}   # ${NAME}: the export (OUTPUT_DIR/NAME/hf) of the earlier stage NAME

Stages run in the order written. A stage's `output_dir` is always OUTPUT_DIR/<name>. A stage that finished is
recorded in OUTPUT_DIR/stages.jsonl and skipped on a rerun; a stage stopped in the middle resumes (every command
resumes from its own checkpoints). `write_report` renders OUTPUT_DIR/report.md with a PNG figure per stage in
OUTPUT_DIR/report/.
"""

import copy
import dataclasses
import importlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from jaxalign import storage
from jaxalign.config import load_yaml
from jaxalign.errors import JaxalignError

COMMANDS = {
    "sft": ("jaxalign.commands.sft", "SFTConfig", "train_sft"),
    "rm": ("jaxalign.commands.rm", "RMConfig", "train_rm"),
    "dpo": ("jaxalign.commands.dpo", "DPOConfig", "train_dpo"),
    "ppo": ("jaxalign.commands.ppo", "PPOConfig", "train_ppo"),
    "grpo": ("jaxalign.commands.grpo", "GRPOConfig", "train_grpo"),
    "rs": ("jaxalign.commands.rs", "RSConfig", "train_rs"),
    "gatt": ("jaxalign.commands.gatt", "GAttConfig", "train_gatt"),
}
REFERENCE = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a pipeline: its `name`, the training `command` and its `config` (the command's config class)."""

    name: str
    command: str
    config: Any


@dataclasses.dataclass(frozen=True)
class Pipeline:
    output_dir: os.PathLike
    stages: tuple[Stage, ...]


def load_pipeline(path: str | Path) -> Pipeline:
    """Reads a pipeline file: each stage's config built and checked by its command's config class (errors name the
    file, the stage and the key), `${NAME}` references resolved to earlier stages' exports."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict) or set(data) - {"output_dir", "stages"} or not isinstance(data.get("stages"), dict):
        raise JaxalignError(f"{path}: expected a mapping with 'output_dir' and 'stages' (a mapping of stage names)")
    out = storage.location(data.get("output_dir") or "runs/pipeline")
    stages = []
    for name, spec in data["stages"].items():
        where = f"{path}: stage '{name}'"
        if not isinstance(spec, dict) or set(spec) - {"command", "base", "config"}:
            raise JaxalignError(f"{where}: expected a mapping with 'command', and 'base' and / or 'config'")
        if spec.get("command") not in COMMANDS:
            raise JaxalignError(f"{where}: 'command' must be one of {', '.join(COMMANDS)}, got {spec.get('command')!r}")
        merged = load_yaml(path.parent / spec["base"]) if spec.get("base") else {}
        merged = _merge(merged, spec.get("config") or {})
        merged["output_dir"] = str(out / name)
        done = [s.name for s in stages]
        merged = _resolve(merged, {n: str(out / n / "hf") for n in done}, where, done)
        module, class_name, _ = COMMANDS[spec["command"]]
        config_class = getattr(importlib.import_module(module), class_name)
        from jaxalign.config import from_dict

        stages.append(Stage(name, spec["command"], from_dict(config_class, merged, where=f"{where}: ")))
    if not stages:
        raise JaxalignError(f"{path}: no stages")
    return Pipeline(out, tuple(stages))


def run_pipeline(pipeline: Pipeline, allow_config_change: bool = False) -> int:
    """Runs the stages not yet recorded as finished in OUTPUT_DIR/stages.jsonl, then writes the report; 0 when all
    finished. A stage's non-zero status (or a stop signal) ends the pipeline there."""
    log = pipeline.output_dir / "stages.jsonl"
    finished = _finished(log)
    for stage in pipeline.stages:
        if stage.name in finished and (pipeline.output_dir / stage.name / "hf").is_dir():
            _say(f"stage {stage.name} ({stage.command}) finished before; skipped")
            continue
        _say(f"stage {stage.name}: jaxalign {stage.command} -> {stage.config.output_dir}")
        module, _, function = COMMANDS[stage.command]
        start = time.time()
        status = getattr(importlib.import_module(module), function)(stage.config,
                                                                      allow_config_change=allow_config_change)
        if status:
            return status
        _append(log, {"stage": stage.name, "command": stage.command, "seconds": round(time.time() - start, 1)})
    report = write_report(pipeline)
    _say(f"finished {len(pipeline.stages)} stages in {pipeline.output_dir}; report: {report}")
    return 0


def write_report(pipeline: Pipeline) -> os.PathLike:
    """OUTPUT_DIR/report.md: per stage what it did, its key numbers and a figure (OUTPUT_DIR/report/<stage>.png)."""
    import matplotlib

    matplotlib.use("Agg")
    seconds = {line["stage"]: line["seconds"] for line in _read_jsonl(pipeline.output_dir / "stages.jsonl")}
    lines = [f"# Pipeline report: {pipeline.output_dir}", ""]
    with storage.staged_folder(pipeline.output_dir / "report") as figures:
        for stage in pipeline.stages:
            folder = storage.location(stage.config.output_dir)
            took = f", {seconds[stage.name]:.0f} s" if stage.name in seconds else ""
            lines += [f"## {stage.name} (`jaxalign {stage.command}`{took})", ""]
            summary = REPORTERS[stage.command](folder, figures / f"{stage.name}.png")
            lines += [*summary, "", f"![{stage.name}](report/{stage.name}.png)", ""]
    return storage.write_text(pipeline.output_dir / "report.md", "\n".join(lines))


def _report_sft(folder: Path, png: Path) -> list[str]:
    metrics = _read_jsonl(folder / "metrics.jsonl")
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    _plot(png, [("loss", [("loss", train), ("eval_loss", evals)])], "step")
    return [f"SFT loss {_first_last(train)}" + (f"; eval loss {_first_last(evals)}" if evals else "") + "."]


def _report_rm(folder: Path, png: Path) -> list[str]:
    import matplotlib.pyplot as plt

    metrics = _read_jsonl(folder / "metrics.jsonl")
    evals = [m for m in metrics if "eval_accuracy" in m]
    last = evals[-1] if evals else next((m for m in reversed(metrics) if "accuracy" in m), {})
    prefix = "eval_" if evals else ""
    buckets = sorted(k[len(prefix) + len("accuracy/"):] for k in last if k.startswith(f"{prefix}accuracy/"))
    figure, axis = plt.subplots(figsize=(6, 3.5))
    values = [last[f"{prefix}accuracy/{b}"] for b in buckets]
    axis.bar([b.replace("_", " ") for b in buckets], values, color="tab:blue")
    axis.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    axis.set_ylim(0, 1)
    axis.set_ylabel(f"{prefix}accuracy")
    axis.set_title(f"reward model accuracy by preference strength (step {last.get('step')})")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
    by_bucket = ", ".join(f"{b.replace('_', ' ')} {v:.2f}" for b, v in zip(buckets, values))
    return [f"{'Eval' if evals else 'Train'} accuracy {last.get(prefix + 'accuracy', float('nan')):.3f} at step "
            f"{last.get('step')}; by strength: {by_bucket}."]


def _report_rs(folder: Path, png: Path) -> list[str]:
    rounds = _read_jsonl(folder / "rounds.jsonl")
    series = {key: [(r["round"], r[key]) for r in rounds if key in r]
              for key in ("sample_score_mean", "best_score_mean", "best_minus_median", "eval_reward_mean")}
    _plot(png, [("reward score", [(k, series[k]) for k in ("sample_score_mean", "best_score_mean",
                                                          "eval_reward_mean")]),
                ("best - median", [("best_minus_median", series["best_minus_median"])])], "round")
    out = [f"Round {r['round']}: samples {r['sample_score_mean']:.3f} on average, best of K {r['best_score_mean']:.3f} "
           f"(gain over the median {r['best_minus_median']:.3f}); pool {r['pool_size']} prompts."
           for r in rounds if "sample_score_mean" in r]
    evals = series["eval_reward_mean"]
    if evals:
        out.append("Greedy eval reward by round: " + ", ".join(f"{n}: {v:.3f}" for n, v in evals) + " (round 0: the "
                   "starting policy).")
    return out


def _report_ppo(folder: Path, png: Path) -> list[str]:
    metrics = _read_jsonl(folder / "metrics.jsonl")
    reward = [(m["step"], m["reward_mean"]) for m in metrics if "reward_mean" in m]
    kl = [(m["step"], m["kl"]) for m in metrics if "kl" in m]
    eval_reward = [(m["step"], m["eval_reward_mean"]) for m in metrics if "eval_reward_mean" in m]
    eval_kl = [(m["step"], m["eval_kl"]) for m in metrics if "eval_kl" in m]
    _plot(png, [("reward", [("eval_reward_mean (greedy)", eval_reward), ("reward_mean (trained on)", reward)]),
                ("KL to the reference", [("eval_kl (greedy)", eval_kl), ("kl (samples)", kl)])], "step")
    out = [f"Reward trained on {_first_last(reward)} (LLaMA-2's pair whitens it over each iteration); KL of the "
           f"samples to the reference {_first_last(kl)}."]
    if eval_reward:
        out.append(f"Greedy eval reward {_first_last(eval_reward)}; its KL {_first_last(eval_kl)}.")
    return out


def _report_grpo(folder: Path, png: Path) -> list[str]:
    metrics = _read_jsonl(folder / "metrics.jsonl")
    reward = [(m["step"], m["reward_mean"]) for m in metrics if "reward_mean" in m]
    accuracy = [(m["step"], m["eval_accuracy"]) for m in metrics if "eval_accuracy" in m]
    _plot(png, [("reward", [("reward_mean", reward)]), ("accuracy", [("eval_accuracy", accuracy)])], "step")
    return [f"Reward {_first_last(reward)}" + (f"; eval accuracy {_first_last(accuracy)}" if accuracy else "") + "."]


def _report_dpo(folder: Path, png: Path) -> list[str]:
    metrics = _read_jsonl(folder / "metrics.jsonl")
    loss = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    accuracy = [(m["step"], m["eval_rewards/accuracies"]) for m in metrics if "eval_rewards/accuracies" in m]
    _plot(png, [("loss", [("loss", loss)]), ("reward accuracy", [("eval_rewards/accuracies", accuracy)])], "step")
    return [f"Loss {_first_last(loss)}" + (f"; eval reward accuracy {_first_last(accuracy)}" if accuracy else "")
            + "."]


def _report_gatt(folder: Path, png: Path) -> list[str]:
    import matplotlib.pyplot as plt

    rows = _read_jsonl(folder / "gatt_eval.jsonl")
    examples = len(_read_jsonl(folder / "gatt_train.jsonl"))
    turns = sorted({r["turn"] for r in rows})
    figure, axis = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for offset, model in ((-width / 2, "before"), (width / 2, "after")):
        rates = {r["turn"]: r["following"] for r in rows if r["model"] == model}
        axis.bar([t + offset for t in turns], [rates.get(t, 0.0) for t in turns], width, label=model)
    axis.set_xticks(turns, [f"turn {t}" for t in turns])
    axis.set_ylim(0, 1)
    axis.set_ylabel("replies following the instruction")
    axis.set_title("instruction given in the first user turn only")
    axis.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
    out = [f"{examples} GAtt training examples."]
    for model in ("before", "after"):
        rates = ", ".join(f"turn {r['turn']}: {r['following']:.2f} of {r['replies']}" for r in rows
                          if r["model"] == model)
        out.append(f"Following the first turn's instruction {model} GAtt: {rates}.")
    return out


REPORTERS = {"sft": _report_sft, "rm": _report_rm, "rs": _report_rs, "ppo": _report_ppo, "grpo": _report_grpo,
             "dpo": _report_dpo, "gatt": _report_gatt}


def _plot(png: Path, panels: list[tuple[str, list[tuple[str, list]]]], x_label: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for axis, (title, series) in zip(axes[0], panels):
        for label, points in series:
            if points:
                xs, ys = zip(*points)
                axis.plot(xs, ys, marker="o" if len(points) < 12 else None, label=label)
        axis.set_xlabel(x_label)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def _first_last(points: list) -> str:
    if not points:
        return "not logged"
    return f"{points[0][1]:.3f} (step {points[0][0]}) -> {points[-1][1]:.3f} (step {points[-1][0]})"


def _merge(base: Any, override: Any) -> Any:
    """`override` merged into `base` key by key; an empty mapping or any other value replaces what is there."""
    if isinstance(base, dict) and isinstance(override, dict) and override:
        out = copy.deepcopy(base)
        for key, value in override.items():
            out[key] = _merge(out.get(key), value)
        return out
    return copy.deepcopy(override)


def _resolve(value: Any, exports: dict[str, str], where: str, done: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, exports, where, done) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, exports, where, done) for v in value]
    if isinstance(value, str):
        def export(match):
            if match[1] not in exports:
                raise JaxalignError(f"{where}: ${{{match[1]}}} is not an earlier stage (earlier: "
                                    f"{', '.join(done) or 'none'})")
            return exports[match[1]]

        return REFERENCE.sub(export, value)
    return value


def _finished(log: Path) -> set[str]:
    return {line["stage"] for line in _read_jsonl(log)}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: os.PathLike, line: dict) -> None:
    storage.append_lines(path, [json.dumps(line)])


def _say(message: str) -> None:
    print(f"jaxalign pipeline: {message}", flush=True)


def dump(pipeline: Pipeline) -> str:
    """The resolved stage configs as YAML (what each stage runs with)."""
    from jaxalign.config import to_dict

    return yaml.safe_dump({s.name: {"command": s.command, "config": to_dict(s.config)} for s in pipeline.stages},
                          sort_keys=False)
