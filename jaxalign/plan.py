"""What a run config needs per device, before anything is allocated: `jaxalign plan CONFIG`.

Parameters and optimiser state are sized exactly, from the shardings the training loop would give them on the
config's mesh (an abstract mesh, so a pod is planned on a laptop). The rest is modelled from the architecture:

- gradients: one per trained parameter, laid out like it;
- activations kept for the backward pass, per layer and token, by `model.config.remat`:
  "none" keeps the layer's inputs, norms, q / k / v, the attention output and the MLP's three `[mlp]` tensors,
  plus the float32 attention scores and probabilities `[heads, keys]` per token with dense attention (blockwise keeps only a
  log-sum-exp per head); "dots_no_batch" keeps the projections' outputs; "dots" those plus the attention scores;
  "full" and "nothing_saveable" keep only the layer's input;
- the backward pass, whichever is larger: the logits, float32 `[rows, chunk, vocab]` slices
  (`model.config.logits_chunk_length`), three alive at once; or one layer at a time, its activations recomputed
  (with remat) and their gradients, and for dense attention two float32 `[rows, heads, length, keys]` tensors
  (blockwise: two `[block, block]` tiles per head);
- with fsdp, the whole embedding, LM head and current layer's weights as gathered for the matmuls (or their whole
  gradients before the reduce-scatter);
- frozen models (a LoRA base, DPO's and PPO's reference, PPO's reward model): their parameters;
- sampling (PPO, GRPO): the KV cache of a rollout batch and one forward pass of it.

FLOPs per step follow the usual accounting (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022): 6 per trained
matmul weight and token (2 for a frozen forward pass), plus 12 · layers · length · hidden per token for attention
(4 · ... without a backward pass). The step time is those FLOPs at `--mfu` of the chips' bf16 peak.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from jaxalign.errors import JaxalignError
from jaxalign.models import attention
from jaxalign.models.llama import LlamaConfig
from jaxalign.objectives.logprobs import logits_slice_length

GiB = 2**30
# bf16 peak FLOP/s and memory per chip (vendor figures).
CHIPS = {
    "v4": (275e12, 32 * GiB),
    "v5e": (197e12, 16 * GiB),
    "v5p": (459e12, 95 * GiB),
    "v6e": (918e12, 32 * GiB),
    "a100": (312e12, 80 * GiB),
    "h100": (989e12, 80 * GiB),
}
COMMANDS = ("sft", "rm", "dpo", "ppo", "grpo")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Term:
    """One line of the plan: `bytes` per device, what it is."""

    name: str
    bytes: int
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Model:
    """A model of the run: its architecture, whether it trains, and on how many rows of which length it runs
    forward (and backward when trained) in one train step."""

    name: str
    config: LlamaConfig
    trained: bool
    rows: int
    length: int
    lm_head: bool = True  # False: a score head (reward model, critic), no logits


def detect_command(data: Mapping[str, Any]) -> str:
    """Which training command a run-config dict is for, from its sections."""
    if "ppo" in data or "value" in data:
        return "ppo"
    if "grpo" in data or "rewards" in data:
        return "grpo"
    loss = data.get("loss") or {}
    if "reference" in data or "type" in loss or "beta" in loss:
        return "dpo"
    if "margin" in loss or "center_coefficient" in loss:
        return "rm"
    return "sft"


def layer_saved_bytes_per_token(cfg: LlamaConfig, keys: int, dense: bool) -> int:
    """Bytes one layer keeps per token for the backward pass under `cfg.remat` (see the module docstring)."""
    c = DTYPE_BYTES[cfg.dtype]
    e, m, h, k, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    projections = c * ((h + 2 * k) * d + e + 2 * m + e)
    scores = 8 * h * keys if dense else 4 * h  # dense: float32 scores and probabilities
    if cfg.remat == "none":
        return c * (4 * e + (h + 2 * k) * d + h * d + 3 * m) + 8 + scores
    if cfg.remat == "dots_no_batch":
        return c * e + projections
    if cfg.remat == "dots":
        return c * e + projections + (c * h * keys if dense else 0) + c * h * d
    return c * e


def layer_backward_bytes(cfg: LlamaConfig, rows: int, length: int, dense: bool) -> int:
    """Bytes alive while one layer's backward pass runs: its activations (recomputed under remat) and their
    gradients, and the attention's transients."""
    c = DTYPE_BYTES[cfg.dtype]
    e, m, h, k, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_token = c * (4 * e + (h + 2 * k) * d + h * d + 3 * m)
    tokens = rows * length
    if dense:
        attention_bytes = 2 * 4 * rows * h * length * length
    else:
        block = min(cfg.attention_block, length)
        attention_bytes = 2 * 4 * rows * h * block * block + 4 * tokens * h * d
    return 2 * per_token * tokens + attention_bytes


def logits_bytes(cfg: LlamaConfig, rows: int, length: int, global_rows: int) -> int:
    """Float32 logit slices alive at once on a device holding `rows` of the step's `global_rows` (the slice length
    is chosen from the global batch, see `jaxalign.objectives.logprobs.model_token_statistics`)."""
    return 3 * 4 * rows * min(logits_slice_length(cfg, global_rows), length) * cfg.vocab_size


def matmul_weights(cfg: LlamaConfig, lm_head: bool = True) -> int:
    e, m, h, k, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = e * (h + 2 * k) * d + h * d * e + 3 * e * m
    return cfg.num_layers * per_layer + (e * cfg.vocab_size if lm_head else e)


def step_flops(models: list[Model]) -> float:
    """Model FLOPs of one train step over all devices (see the module docstring)."""
    total = 0.0
    for model in models:
        cfg, tokens = model.config, model.rows * model.length
        passes = 3 if model.trained else 1
        total += passes * tokens * (2 * matmul_weights(cfg, model.lm_head) + 4 * cfg.num_layers * model.length * cfg.hidden_size)
    return total


def activation_terms(model: Model, shards: int) -> list[Term]:
    """Activation, backward and logits bytes per device of `model` with its rows split over `shards` devices."""
    cfg = model.config
    rows = max(1, model.rows // shards)
    dense = attention.choose(cfg.attention, model.length) == "dense"
    kind = "dense" if dense else "blockwise"
    logits = logits_bytes(cfg, rows, model.length, model.rows) if model.lm_head else 0
    if not model.trained:
        forward = layer_backward_bytes(cfg, rows, model.length, dense) // 2
        return [Term(f"{model.name} forward pass", forward + logits // 3,
                     f"{rows} rows x {model.length}, one layer at a time")]
    saved = cfg.num_layers * rows * model.length * layer_saved_bytes_per_token(cfg, model.length, dense)
    layer = layer_backward_bytes(cfg, rows, model.length, dense)
    peak = f"one layer's backward pass ({kind} attention) {human_bytes(layer)}"
    if model.lm_head:
        peak += f", the logit slices (vocab {cfg.vocab_size}) {human_bytes(logits)}: the larger"
    return [
        Term(f"{model.name} activations", saved,
             f"{cfg.num_layers} layers x {rows} rows x {model.length}, remat {cfg.remat}, {kind} attention"),
        Term(f"{model.name} backward pass", max(layer, logits), peak),
    ]


def gathered_bytes(cfg: LlamaConfig, mesh_shape: Mapping[str, int], lm_head: bool = True) -> int:
    """With parameters sharded over `fsdp`: the whole weights XLA gathers for the matmuls, or the whole gradients it
    computes before reducing them back to shards (not both at once), of the embedding, the LM head and the layer
    at work."""
    if mesh_shape.get("fsdp", 1) == 1:
        return 0
    e = cfg.hidden_size
    layer = (matmul_weights(cfg, lm_head=False) - e) // cfg.num_layers
    tables = cfg.vocab_size * e * (2 if lm_head and not cfg.tie_word_embeddings else 1)
    return DTYPE_BYTES[cfg.param_dtype] * (tables + layer) // mesh_shape.get("tensor", 1)


def kv_cache_bytes(cfg: LlamaConfig, rows: int, length: int) -> int:
    return 2 * cfg.num_layers * rows * cfg.num_kv_heads * length * cfg.head_dim * DTYPE_BYTES[cfg.dtype]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device terms (largest first), FLOPs per step, and the memory and speed of the chips planned for."""

    command: str
    mesh: str
    devices: int
    terms: list[Term]
    flops: float
    device_memory: int | None
    peak_flops: float | None
    mfu: float
    sampling: list[Term] = dataclasses.field(default_factory=list)
    hints: list[str] = dataclasses.field(default_factory=list)  # what would shrink it, most effective first

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    def report(self) -> str:
        lines = [f"{self.command} on mesh {self.mesh} ({self.devices} devices); per device, largest first:"]
        width = max(len(t.name) for t in self.terms + self.sampling)
        for term in sorted(self.terms, key=lambda t: -t.bytes):
            lines.append(f"  {term.name:<{width}}  {human_bytes(term.bytes):>11}  {term.detail}")
        lines.append(f"  {'train step total':<{width}}  {human_bytes(self.total):>11}")
        peak = self.total
        if self.sampling:
            held = sum(t.bytes for t in self.terms if t.name.endswith("parameters") or t.name == "optimizer state")
            sampling = held + sum(t.bytes for t in self.sampling)
            lines.append("  sampling (with the parameters and optimizer state held):")
            for term in self.sampling:
                lines.append(f"  {term.name:<{width}}  {human_bytes(term.bytes):>11}  {term.detail}")
            lines.append(f"  {'sampling total':<{width}}  {human_bytes(sampling):>11}")
            peak = max(peak, sampling)
        lines.append(f"model FLOPs per step: {self.flops:.3g}")
        if self.peak_flops:
            seconds = self.flops / (self.devices * self.peak_flops * self.mfu)
            lines.append(f"expected step time at {self.mfu:.0%} MFU of {self.peak_flops / 1e12:.0f} TFLOP/s per chip: "
                         f"{seconds:.3g} s")
        if self.device_memory:
            lines.append(self.verdict(peak))
        return "\n".join(lines)

    def verdict(self, peak: int) -> str:
        if peak <= 0.9 * self.device_memory:
            return (f"fits: {human_bytes(peak)} of {human_bytes(self.device_memory)} per device "
                    f"({peak / self.device_memory:.0%})")
        over = peak - 0.9 * self.device_memory
        return (f"does not fit: {human_bytes(peak)} per device against {human_bytes(self.device_memory)} "
                f"(over by {human_bytes(int(over))}, keeping 10% for XLA); try " + ", ".join(self.hints))


def human_bytes(nbytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


def parse_bytes(text: str, where: str) -> int:
    """`16GiB`, `95 GiB`, `512MiB`, `32GB` or a number of bytes."""
    units = {"gib": 2**30, "mib": 2**20, "kib": 2**10, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1, "": 1}
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("gmkib")
    unit = value[len(number):]
    try:
        if unit not in units:
            raise ValueError(unit)
        return int(float(number) * units[unit])
    except ValueError:
        raise JaxalignError(f"{where}: expected a size such as 16GiB or 512MiB, got {text!r}") from None


def mesh_shards(mesh_shape: Mapping[str, int], rules) -> int:
    """How many ways the batch rows split: the product of the mesh axes the `batch` logical axis maps to."""
    axes = dict(rules).get("batch")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh_shape[a] for a in axes)


def workload(command: str, config, policy: LlamaConfig, extra: Mapping[str, LlamaConfig]) -> tuple[list, list]:
    """The models one train step runs (`Model`s) and, for PPO / GRPO, the rollout batch sampled per iteration."""
    micro = config.train.batch_size // config.train.grad_accum
    length = config.train.seq_len
    if command == "dpo":
        models = [Model("policy", policy, True, 2 * micro, length)]
        if "reference" in extra:
            models.append(Model("reference", extra["reference"], False, 2 * micro, length))
        return models, []
    if command == "ppo":
        models = [Model("policy", policy, True, micro, length),
                  Model("value", extra["value"], True, micro, length, lm_head=False)]
        return models, [config.ppo.rollout_size]
    if command == "grpo":
        return [Model("policy", policy, True, micro, length)], [config.grpo.rollout_size]
    return [Model("model", policy, True, micro, length, lm_head=command != "rm")], []
