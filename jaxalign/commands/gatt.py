"""`jaxalign gatt CONFIG.yaml [key.sub=value ...]`: Ghost Attention fine-tuning (LLaMA-2-Chat, Touvron et al. 2023,
§3.3; the transform is `jaxalign.gatt`).

1. Every training dialogue of `data.train` with at least two user turns gets an instruction: 1 to
   `gatt.max_combined` instructions of different kinds from `gatt.instructions` (`builtin`: personas, hobbies,
   styles, languages; or a JSONL file), drawn from the seed.
2. The policy (`model.path`) samples the assistant replies turn by turn (its own earlier replies in the context) with
   the instruction appended to every user turn, at `generation.temperature`, `gatt.prompts_per_batch` dialogues at a
   time, `gatt.samples_per_turn` replies per turn of which the first that follows the instruction is kept. With
   `gatt.require_following` (default) a dialogue is cut at a turn where none does (instructions without a check
   always pass).
3. The training set `OUTPUT_DIR/gatt_train.jsonl` gets, for every answered user turn t >= 2, the dialogue up to turn
   t with the instruction in the first user turn only and the sampled replies as the assistant turns; the policy is
   fine-tuned on it with the loss on the last assistant turn only (`data.mask: last_turn`) through the one loop, in
   `OUTPUT_DIR/finetune/` (`train.*`, `optimizer.*`, `model.lora` apply), and copied to `OUTPUT_DIR/hf/`.
4. With eval dialogues (`data.eval` or `data.eval_fraction`), the policy before and after answers them greedily with
   a checkable instruction in the first user turn only; `OUTPUT_DIR/gatt_eval.jsonl` holds per model (`before`,
   `after`) and user turn the share of replies that follow it (`following`), and the console prints them.

A rerun skips what is done: the training set once written, the (resumable) fine-tuning, the evaluations.
"""

import argparse
import dataclasses
import random
from dataclasses import dataclass, field

from jaxalign import storage
from jaxalign.config import ModelSection, RunConfig
from jaxalign.data.config import DataConfig
from jaxalign.errors import JaxalignError
from jaxalign.rollouts import GenerationConfig
from jaxalign.train.command import (add_run_arguments, export_model, on_primary, run_tokenizer,
                                    run_training_command, say, write_jsonl)


@dataclass(frozen=True)
class GAttSettings:
    """`instructions` (`builtin` or a JSONL file of `{kind, instruction, check?}`), `max_combined` instructions per
    dialogue, `prompts_per_batch` dialogues sampled together, `samples_per_turn` replies drawn per turn (the first
    that follows is kept), `require_following`: cut a dialogue at a turn where no sampled reply passes the
    instruction's check; `eval_turns`: the user turns answered in the evaluation."""

    instructions: str = "builtin"
    max_combined: int = 2
    prompts_per_batch: int = 16
    samples_per_turn: int = 1
    require_following: bool = True
    eval_turns: int = 3


@dataclass(frozen=True)
class GAttConfig(RunConfig):
    """The loop's sections (the fine-tuning) plus `model` (the policy), `data` (multi-turn dialogues and the
    template the policy was trained with), `generation` and `gatt`."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    gatt: GAttSettings = field(default_factory=GAttSettings)

    def __post_init__(self):
        for key in ("max_combined", "prompts_per_batch", "samples_per_turn"):
            if getattr(self.gatt, key) < 1:
                raise JaxalignError(f"config key 'gatt.{key}': expected >= 1, got {getattr(self.gatt, key)}")
        if self.gatt.eval_turns < 2:
            raise JaxalignError(f"config key 'gatt.eval_turns': later turns are what GAtt is about; expected >= 2, "
                                f"got {self.gatt.eval_turns}")
        self.generation.check_room(self.train.seq_len)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "configs/tiny/gatt.yaml")


def run(args: argparse.Namespace) -> int:
    return run_training_command(args, GAttConfig, train_gatt)


def train_gatt(config: GAttConfig, allow_config_change: bool = False) -> int:
    """Builds the GAtt training set, fine-tunes on it and evaluates before / after; 0 when done."""
    from jaxalign import gatt
    from jaxalign.commands.sft import SFTConfig, train_sft
    from jaxalign.rollouts import prompt_messages
    from jaxalign.train import run_dir
    from jaxalign.train.command import build_loaders

    run_dir.check_config(config, allow_config_change)
    run_dir.save_config(config)
    out = storage.location(config.output_dir)
    instructions = gatt.load_instructions(config.gatt.instructions)
    tokenizer, added = run_tokenizer(config)
    train_loader, eval_data = build_loaders(config.data, tokenizer, config.train)
    dialogues = [prompt_messages(e) for e in train_loader.examples if _is_dialogue(e)]
    if not dialogues:
        raise JaxalignError("config key 'data.train': no dialogue with two or more user turns (GAtt needs multi-turn "
                            "conversations, e.g. demo:dialogues_messages)")
    responder = Responder(config, tokenizer, added)
    training_set = out / "gatt_train.jsonl"
    if not training_set.is_file():
        rng = random.Random(config.seed)
        combinations = [gatt.combine(rng, instructions, config.gatt.max_combined) for _ in dialogues]
        records = sample_training_set(responder, config.model, dialogues, combinations, config.gatt.require_following,
                                      config.gatt.samples_per_turn)
        if not records:
            raise JaxalignError("no GAtt training example: every first reply failed its instruction's check (set "
                                "gatt.require_following=false, or start from a policy that follows instructions)")
        on_primary(lambda: write_jsonl(training_set, records), "gatt_train")
        say("gatt", f"{len(records)} training examples from {len(dialogues)} dialogues in {training_set}")
    finetune = out / "finetune"
    data = dataclasses.replace(config.data, train=str(training_set), eval=None, eval_fraction=0.0, format="messages",
                               mask="last_turn")
    train_sft(SFTConfig(output_dir=str(finetune), seed=config.seed, train=config.train, optimizer=config.optimizer,
                        checkpoint=config.checkpoint, mesh=config.mesh, model=config.model, data=data))
    evaluation = out / "gatt_eval.jsonl"
    if eval_data is not None and not evaluation.is_file():
        eval_dialogues = [prompt_messages(e) for e in eval_data().examples if _is_dialogue(e)]
        rng = random.Random(config.seed + 1)
        checkable = [i for i in instructions if i.check]
        if not checkable:
            raise JaxalignError("config key 'gatt.instructions': no instruction has a check to evaluate")
        combinations = [gatt.combine(rng, checkable, config.gatt.max_combined) for _ in eval_dialogues]
        after = dataclasses.replace(config.model, path=str(finetune / "hf"), config={}, lora=None)
        lines = []
        for name, section in (("before", config.model), ("after", after)):
            rates = following_by_turn(responder, section, eval_dialogues, combinations, config.gatt.eval_turns)
            lines.extend({"model": name, "turn": turn, **rate} for turn, rate in rates.items())
            say("gatt", f"{name}: replies following the first turn's instruction, by turn: " + ", ".join(
                f"{turn}: {rate['following']:.2f} of {rate['replies']}" for turn, rate in rates.items()))
        on_primary(lambda: write_jsonl(evaluation, lines), "gatt_eval")
    final = export_model(config, lambda folder: on_primary(lambda: storage.copy_folder(finetune / "hf", folder),
                                                            "gatt_export"))
    say("gatt", f"finished. Outputs in {out}/:\n"
                f"  gatt_train.jsonl              the GAtt training set\n"
                f"  gatt_eval.jsonl               instruction following by turn, before and after\n"
                f"  finetune/                     the fine-tuning run (metrics, checkpoints, hf)\n"
                f"  hf/                           the policy with its tokenizer ({final})")
    return 0


def sample_training_set(responder, section, dialogues, combinations, require_following: bool,
                        samples: int = 1) -> list[dict]:
    """The GAtt training records (`jaxalign.gatt.training_example`) of every answered turn t >= 2 of `dialogues`,
    replies sampled by the policy `section` (`samples` per turn) with each dialogue's instruction in every user
    turn."""
    from jaxalign import gatt

    texts = [gatt.text_of(c) for c in combinations]
    replies = responder.converse(section, dialogues, texts, every_turn=True, greedy=False,
                                 keep=(lambda i, reply: gatt.follows(reply, combinations[i])) if require_following
                                 else None, samples=samples)
    return [gatt.training_example(dialogues[i], replies[i][:t], texts[i])
            for i in range(len(dialogues)) for t in range(2, len(replies[i]) + 1)]


def following_by_turn(responder, section, dialogues, combinations, turns: int) -> dict[int, dict]:
    """`{turn: {"following": share, "replies": count}}` of the policy `section`'s greedy replies that follow each
    dialogue's instruction, given in the first user turn only, for turns 1..`turns`."""
    from jaxalign import gatt

    texts = [gatt.text_of(c) for c in combinations]
    replies = responder.converse(section, dialogues, texts, every_turn=False, greedy=True, turns=turns)
    out = {}
    for turn in range(1, turns + 1):
        judged = [gatt.follows(r[turn - 1], combinations[i]) for i, r in enumerate(replies) if len(r) >= turn]
        if judged:
            out[turn] = {"following": sum(judged) / len(judged), "replies": len(judged)}
    return out


class Responder:
    """Multi-turn replies of a policy on the training mesh, turn by turn for a batch of dialogues."""

    def __init__(self, config: GAttConfig, tokenizer, added):
        self.config, self.tokenizer, self.added = config, tokenizer, added

    def converse(self, section: ModelSection, dialogues, instructions, *, every_turn: bool, greedy: bool,
                 turns: int | None = None, keep=None, samples: int = 1) -> list[list[str]]:
        """The replies of the policy `section` to the user turns of each dialogue (its own earlier replies in the
        context; at most `turns`), `instructions[i]` appended to the first user turn of dialogue i or to every one.
        Each turn draws `samples` replies and keeps the first that is not blank and that `keep(i, reply)` accepts;
        a dialogue stops at a turn with none, and when it has no more user turns."""
        import jax

        from jaxalign import gatt
        from jaxalign.data.formats import Message, Prompt
        from jaxalign.data.sources import SourceData
        from jaxalign.data.config import SourceSpec
        from jaxalign.data.loader import DataLoader
        from jaxalign.models.loading import model_source, seeded
        from jaxalign.rollouts import Sampler, check_rows, respond, stop_token_ids
        from jaxalign.train.algorithm import Frozen
        from jaxalign.train.loop import inference

        c = self.config
        source = seeded(model_source(section, self.tokenizer, mesh=c.mesh, new_tokens=self.added), c.seed)
        policy = source.module()
        sampler = Sampler(policy, c.generation, stop_token_ids(c, self.tokenizer), self.tokenizer.pad_token_id)
        replies = [[] for _ in dialogues]
        active = list(range(len(dialogues)))
        limit = turns or max(gatt.user_turns(d) for d in dialogues)
        key = jax.random.PRNGKey(c.seed)
        with inference(c, {"policy": Frozen(policy, source.load)}) as context:
            check_rows(context, c.gatt.prompts_per_batch * samples, "gatt.prompts_per_batch")
            for turn in range(1, limit + 1):
                active = [i for i in active if gatt.user_turns(dialogues[i]) >= turn]
                if not active:
                    break
                examples = [Prompt(tuple(Message(m["role"], m["content"]) for m in gatt.sampling_prompt(
                    dialogues[i], replies[i], instructions[i], every_turn)), None, f"dialogue {i}") for i in active]
                loader = DataLoader(c.data, self.tokenizer, batch_size=c.gatt.prompts_per_batch,
                                    seq_len=c.train.seq_len - c.generation.max_new_tokens, split="eval",
                                    sources=[SourceData(SourceSpec("gatt"), "prompt", examples)])
                dialogue_of = {id(example): i for example, i in zip(examples, active)}
                answered: dict[int, list[str]] = {}
                for index, local in enumerate(loader):
                    answers = respond(sampler, context.frozen["policy"], self.tokenizer, loader, local, context,
                                      jax.random.fold_in(key, turn * 100_003 + index), repeat=samples, greedy=greedy)
                    for example, text in zip(answers.examples, answers.texts):
                        answered.setdefault(dialogue_of[id(example)], []).append(text)
                still = []
                for i in active:
                    kept = [r for r in answered.get(i, []) if r.strip() and (keep is None or keep(i, r))]
                    if kept:
                        replies[i].append(kept[0])
                        still.append(i)
                active = still
        return replies


def _is_dialogue(example) -> bool:
    return hasattr(example, "messages") and sum(m.role == "user" for m in example.messages) >= 2
