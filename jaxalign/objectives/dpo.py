"""Direct preference optimisation and its relatives, on summed sequence log-probabilities.

With sequence log-probs `π` of the policy and `ref` of the reference model (sums of log p over the response tokens;
prompt and response tokenized as separate segments, so no token straddles the boundary) and
`z = (π_c - π_r) - (ref_c - ref_r)`, the per-pair losses of `preference_loss`:

| `loss_type` | per-pair loss | source |
|---|---|---|
| `sigmoid` | `(1-ε)·(-log σ(βz)) + ε·(-log σ(-βz))`, ε = `label_smoothing` (> 0: cDPO) | Rafailov 2023; Mitchell 2023 |
| `robust` | `[(1-ε)·(-log σ(βz)) - ε·(-log σ(-βz))] / (1-2ε)` | Chowdhury et al. 2024 |
| `hinge` | `relu(1 - βz)` | SLiC, Zhao et al. 2023 |
| `ipo` | `(z - 1/(2β))²` with per-token average log-probs in z | Azar et al. 2023 |
| `simpo` | `-log σ(β(π̄_c - π̄_r) - γ)`, π̄ = average log-prob per token, no reference | Meng et al. 2024 |
| `orpo` | `-π̄_c + β·(-log σ(lo_c - lo_r))`, lo = π̄ - log(1 - exp π̄), no reference; β is λ | Hong et al. 2024 |

KTO (Ethayarajh et al. 2024) trains on unpaired examples: `kto_loss`. Implicit rewards are `β(π - ref)` (for the
reference-free losses `β·π̄`): `rewards/chosen`, `rewards/rejected`, their margin and accuracy are the metrics TRL
reports under the same names. At initialisation (policy = reference) sigmoid DPO is exactly ln 2.
"""

import dataclasses
import io
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import storage
from jaxalign.errors import JaxalignError
from jaxalign.objectives.logprobs import model_token_log_probs, sequence_log_probs
from jaxalign.train.algorithm import Algorithm, DataSource, Frozen, Mean, Trainable

PAIR_LOSSES = ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo")
LOSS_TYPES = PAIR_LOSSES + ("kto",)
REFERENCE_FREE = ("simpo", "orpo")
PER_TOKEN_AVERAGE = ("ipo", "simpo", "orpo")
DEFAULT_BETA = {"sigmoid": 0.1, "robust": 0.1, "hinge": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}


def needs_reference(loss_type: str) -> bool:
    """Whether `loss_type` compares with a reference model (SimPO and ORPO do not)."""
    return loss_type not in REFERENCE_FREE


def _average(logps, count):
    return logps / jnp.maximum(count, 1.0)


def preference_loss(
    loss_type: str,
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array | None,
    ref_rejected: jax.Array | None,
    beta: float,
    *,
    chosen_count: jax.Array | None = None,
    rejected_count: jax.Array | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> jax.Array:
    """Per-pair losses `[B]` float32 of one of `PAIR_LOSSES` (see the module docstring for the formulas).

    policy_chosen, policy_rejected, ref_chosen, ref_rejected: summed response log-probs `[B]` (natural log); the
      reference is ignored (and may be None) for `simpo` and `orpo`.
    chosen_count, rejected_count: response token counts `[B]`, required by the per-token averaging losses `ipo`,
      `simpo` and `orpo`.
    beta: β (for `orpo` the weight λ of the odds-ratio term); label_smoothing: ε of `sigmoid` (cDPO) and `robust`,
      in [0, 0.5); simpo_gamma: SimPO's target margin γ.
    Log-sigmoids are computed as softplus, so large margins give no inf or NaN.
    Raises JaxalignError for an unknown loss type or a missing count / reference.
    """
    if loss_type not in PAIR_LOSSES:
        raise JaxalignError(f"unknown preference loss type {loss_type!r}; expected one of {', '.join(PAIR_LOSSES)}")
    if loss_type in PER_TOKEN_AVERAGE and (chosen_count is None or rejected_count is None):
        raise JaxalignError(
            f"loss type {loss_type!r} averages log-probs per token: pass chosen_count and rejected_count")
    if needs_reference(loss_type) and (ref_chosen is None or ref_rejected is None):
        raise JaxalignError(f"loss type {loss_type!r} needs the reference log-probs ref_chosen and ref_rejected")
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    pc, pr = f32(policy_chosen), f32(policy_rejected)
    if loss_type == "simpo":
        return jax.nn.softplus(-(beta * (_average(pc, chosen_count) - _average(pr, rejected_count)) - simpo_gamma))
    if loss_type == "orpo":
        mean_c, mean_r = _average(pc, chosen_count), _average(pr, rejected_count)
        log_odds = (mean_c - jnp.log1p(-jnp.exp(mean_c))) - (mean_r - jnp.log1p(-jnp.exp(mean_r)))
        return -mean_c + beta * jax.nn.softplus(-log_odds)
    rc, rr = f32(ref_chosen), f32(ref_rejected)
    if loss_type == "ipo":
        pc, rc = _average(pc, chosen_count), _average(rc, chosen_count)
        pr, rr = _average(pr, rejected_count), _average(rr, rejected_count)
    z = (pc - pr) - (rc - rr)
    if loss_type == "ipo":
        return (z - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * z)
    eps = label_smoothing
    if loss_type == "sigmoid":
        return (1.0 - eps) * jax.nn.softplus(-beta * z) + eps * jax.nn.softplus(beta * z)
    return ((1.0 - eps) * jax.nn.softplus(-beta * z) - eps * jax.nn.softplus(beta * z)) / (1.0 - 2.0 * eps)


def kto_loss(policy: jax.Array, ref: jax.Array, desirable: jax.Array, kl: jax.Array, beta: float, *,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> jax.Array:
    """Per-example KTO losses `[B]` float32 (Ethayarajh et al. 2024): with ρ = `policy - ref` (summed response
    log-probs `[B]`), a desirable example (`desirable` 1) costs `w_d (1 - σ(β(ρ - KL)))`, an undesirable one (0)
    `w_u (1 - σ(β(KL - ρ)))`. `kl` is the reference point, a scalar estimate of KL(π‖ref) that the caller detaches
    and clips at 0 (`kto_reference_point`)."""
    rho = jnp.asarray(policy, jnp.float32) - jnp.asarray(ref, jnp.float32)
    desirable = jnp.asarray(desirable, jnp.float32)
    good = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (rho - kl)))
    bad = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - rho)))
    return desirable * good + (1.0 - desirable) * bad


def kto_reference_point(policy_mismatched: jax.Array, ref_mismatched: jax.Array, mask: jax.Array) -> jax.Array:
    """KTO's reference point: the mean of `policy - ref` over the real rows (`mask`) of mismatched
    prompt / completion pairs (each prompt with another example's completion), clipped at 0 and detached."""
    rho = jnp.asarray(policy_mismatched, jnp.float32) - jnp.asarray(ref_mismatched, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    mean = jnp.sum(rho * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """`type` (one of `LOSS_TYPES`), `beta`, and the settings of single losses (see `preference_loss`,
    `kto_loss`)."""

    type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


def stacked_sequence_log_probs(model, params, batch: Mapping[str, jax.Array], prefixes: tuple[str, ...],
                               rng: jax.Array | None = None) -> list[tuple[jax.Array, jax.Array]]:
    """`(summed log-probs [B], response token counts [B])` of each `prefix` half of a batch (e.g. `chosen_` and
    `rejected_` of a preference batch), all halves stacked into one forward pass; log-probs are summed over
    `loss_mask` (the response tokens). With `rng` the pass runs in training mode (dropout)."""
    keys = ("input_ids", "targets", "positions", "segment_ids")
    stacked = {k: jnp.concatenate([batch[f"{p}{k}"] for p in prefixes], axis=0) for k in keys}
    mask = jnp.concatenate([batch[f"{p}loss_mask"] for p in prefixes], axis=0)
    sums, counts = sequence_log_probs(model_token_log_probs(model, params, stacked, rng=rng, needed=mask), mask)
    rows = batch[f"{prefixes[0]}input_ids"].shape[0]
    return [(sums[i * rows:(i + 1) * rows], counts[i * rows:(i + 1) * rows]) for i in range(len(prefixes))]


REFERENCE_KEYS = {"preference": ("ref_chosen_logps", "ref_rejected_logps"),
                  "unpaired": ("ref_completion_logps", "ref_kl_logps")}
HALVES = {"preference": ("chosen_", "rejected_"), "unpaired": ("completion_", "kl_")}


def reference_log_probs(model, params, batch: Mapping[str, jax.Array], kind: str) -> dict[str, jax.Array]:
    """The reference model's summed response log-probs of a `kind` batch ("preference" or "unpaired"), under the
    names `REFERENCE_KEYS[kind]` (each `[B]` float32, no gradient): what `make_loss_fn` reads from the batch when
    the reference was computed before training."""
    values = stacked_sequence_log_probs(model, params, batch, HALVES[kind])
    return {key: jax.lax.stop_gradient(logps) for key, (logps, _) in zip(REFERENCE_KEYS[kind], values)}


def pair_metrics(loss_type: str, beta: float, policy, ref, counts, losses, mask) -> dict[str, Mean]:
    """TRL's metrics over the real pairs (`mask`): `rewards/chosen`, `rewards/rejected` (β(π - ref), for the
    reference-free losses β·π̄), `rewards/margins`, `rewards/accuracies` (chosen strictly above rejected),
    `logps/chosen`, `logps/rejected` (summed, per-token averaged for the averaging losses)."""
    (pc, pr), (cc, cr) = policy, counts
    if loss_type in PER_TOKEN_AVERAGE:
        pc, pr = _average(pc, cc), _average(pr, cr)
    if ref is None:
        reward_c, reward_r = beta * pc, beta * pr
    else:
        rc, rr = ref
        if loss_type in PER_TOKEN_AVERAGE:
            rc, rr = _average(rc, cc), _average(rr, cr)
        reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
    return {
        "rewards/chosen": Mean.of(reward_c, mask),
        "rewards/rejected": Mean.of(reward_r, mask),
        "rewards/margins": Mean.of(reward_c - reward_r, mask),
        "rewards/accuracies": Mean.of((reward_c > reward_r).astype(jnp.float32), mask),
        "logps/chosen": Mean.of(pc, mask),
        "logps/rejected": Mean.of(pr, mask),
    }


def make_loss_fn(model, settings: LossSettings, kind: str = "preference", reference_model=None) -> Callable:
    """The loss `(params, reference_params, batch, rng) -> (objective, metrics)` of `model` (a `LlamaForCausalLM`).

    kind: "preference" (pairs; `preference_loss`) or "unpaired" (KTO; `kto_loss`). The reference log-probs come
    from a forward pass of `reference_model` with `reference_params` when both are given, and otherwise from the
    batch (`REFERENCE_KEYS[kind]`, precomputed by `reference_log_probs`). The objective is the mean loss over the
    real rows of the global batch (`pair_mask` / `example_mask`)."""
    loss_type, beta = settings.type, settings.beta

    def reference(reference_params, batch):
        if reference_model is not None and reference_params is not None:
            return reference_log_probs(reference_model, reference_params, batch, kind)
        return {key: batch[key] for key in REFERENCE_KEYS[kind]}

    def preference(params, reference_params, batch, rng):
        (pc, cc), (pr, cr) = stacked_sequence_log_probs(model, params, batch, HALVES["preference"], rng)
        ref = None
        if needs_reference(loss_type):
            values = reference(reference_params, batch)
            ref = tuple(values[key] for key in REFERENCE_KEYS["preference"])
        losses = preference_loss(loss_type, pc, pr, *(ref or (None, None)), beta, chosen_count=cc, rejected_count=cr,
                                 label_smoothing=settings.label_smoothing, simpo_gamma=settings.simpo_gamma)
        mask = batch["pair_mask"]
        return Mean.of(losses, mask), pair_metrics(loss_type, beta, (pc, pr), ref, (cc, cr), losses, mask)

    def unpaired(params, reference_params, batch, rng):
        (policy, _), (policy_kl, _) = stacked_sequence_log_probs(model, params, batch, HALVES["unpaired"], rng)
        values = reference(reference_params, batch)
        ref, ref_kl = (values[key] for key in REFERENCE_KEYS["unpaired"])
        mask = batch["example_mask"]
        kl = kto_reference_point(policy_kl, ref_kl, mask)
        desirable = batch["desirable"].astype(jnp.float32)
        losses = kto_loss(policy, ref, desirable, kl, beta, desirable_weight=settings.desirable_weight,
                          undesirable_weight=settings.undesirable_weight)
        rewards = beta * (policy - ref)
        good, bad = mask * desirable, mask * (1.0 - desirable)
        metrics = {
            "rewards/chosen": Mean.of(rewards, good),
            "rewards/rejected": Mean.of(rewards, bad),
            "logps/chosen": Mean.of(policy, good),
            "logps/rejected": Mean.of(policy, bad),
            "kl": Mean.of(jnp.broadcast_to(kl, mask.shape), mask),
        }
        return Mean.of(losses, mask), metrics

    if kind not in HALVES:
        raise JaxalignError(f"unknown preference data kind {kind!r}; expected 'preference' or 'unpaired'")
    if (kind == "unpaired") != (loss_type == "kto"):
        raise JaxalignError(f"config key 'loss.type': {loss_type!r} does not train on {kind} examples; KTO takes "
                            "unpaired examples (with a desirable / undesirable label), the other losses pairs")
    return unpaired if kind == "unpaired" else preference


def make_algorithm(model, optimizer, train_source, settings: LossSettings, *, kind: str = "preference", init=None,
                   reference: Frozen | None = None, base_reference=None, eval_data=None) -> Algorithm:
    """DPO-family training as the loop runs it: one trainable policy `model` starting from `init(shardings)`,
    a frozen `reference` (live reference log-probs) or none (reference log-probs in the batches, or a
    reference-free loss), batches from `train_source` (a `BatchSource`, or a loader wrapped in `DataSource`).
    `base_reference`: with LoRA (`jaxalign.train.adapters.adapt`), the module without adapters whose forward pass
    on the frozen base weights gives the reference log-probs (no second copy of the weights)."""
    from jaxalign.train.adapters import BASE

    reference_model = reference.model if reference is not None else base_reference
    reference_key = "reference" if reference is not None else BASE
    loss_fn = make_loss_fn(model, settings, kind, reference_model)
    source = train_source if hasattr(train_source, "next_batch") else DataSource(train_source)
    return Algorithm(
        trainables={"model": Trainable(model, optimizer, init)},
        loss=lambda params, frozen, batch, rng: loss_fn(params["model"], frozen.get(reference_key), batch, rng),
        source=source,
        frozen={"reference": reference} if reference is not None else {},
        eval_batches=eval_data,
    )


def precompute_reference(config, reference: Frozen, loader, kind: str) -> dict[str, np.ndarray]:
    """The reference model's summed response log-probs of every example of `loader` (one pass over
    `loader.examples` in index order, sharded over the processes): `{key: float32 [N]}` for the keys
    `REFERENCE_KEYS[kind]`, NaN for the examples the data pipeline drops. Runs on `config.mesh`; the reference
    weights are loaded for this pass only and released when it returns."""
    from flax import linen as nn
    from jax.experimental import multihost_utils

    from jaxalign.data.loader import DataLoader, make_global_batch
    from jaxalign.train.loop import plan

    layout = plan(config, {}, {"reference": reference})
    one_pass = DataLoader(loader.config, loader.preprocessor.tokenizer, batch_size=loader.batch_size,
                          seq_len=loader.seq_len, split="eval", process_index=loader.process_index,
                          process_count=loader.process_count, sources=loader.sources)
    tables = {key: np.full(len(one_pass.examples), np.nan, np.float32) for key in REFERENCE_KEYS[kind]}
    with jax.set_mesh(layout.mesh), nn.logical_axis_rules(layout.rules):
        params = reference.load(layout.frozen_shardings["reference"])
        compute = jax.jit(lambda p, b: reference_log_probs(reference.model, p, b, kind))
        for batch in one_pass:
            global_batch = make_global_batch(batch, layout.mesh)
            values = compute(params, global_batch)
            index = np.asarray(multihost_utils.process_allgather(global_batch["example_index"], tiled=True))
            real = index >= 0
            for key, value in values.items():
                tables[key][index[real]] = np.asarray(multihost_utils.process_allgather(value, tiled=True))[real]
        del params
    return tables


def with_reference(batch: dict, tables: Mapping[str, np.ndarray], origin: str) -> dict:
    """`batch` with its rows' precomputed reference log-probs (`tables[key][example_index]`, 0 on padding rows).
    Raises JaxalignError when a real row has no stored value (the stored file does not match the data)."""
    index = batch["example_index"]
    real = index >= 0
    out = dict(batch)
    for key, table in tables.items():
        if np.any(index[real] >= table.size) or np.isnan(table[index[real]]).any():
            raise JaxalignError(f"{origin}: no stored reference log-probs for some examples of this batch; the file "
                                "was made for other data; delete it to recompute")
        out[key] = np.where(real, table[np.maximum(index, 0)], 0.0).astype(np.float32)
    return out


class ReferenceSource(DataSource):
    """The loop's batch source over a loader whose batches gain their precomputed reference log-probs."""

    def __init__(self, data, tables: Mapping[str, np.ndarray], origin: str):
        super().__init__(data)
        self.tables, self.origin = tables, origin

    def next_batch(self, context):
        batch, host_metrics = super().next_batch(context)
        return with_reference(batch, self.tables, self.origin), host_metrics


def stored_reference(path, splits: Mapping[str, Callable[[], dict[str, np.ndarray]]],
                     sizes: Mapping[str, int]) -> dict[str, dict[str, np.ndarray]]:
    """Per split, the reference tables stored in `path` (an `.npz` of `<split>/<key>` arrays) when they are there
    with `sizes[split]` entries; otherwise computes them with `splits[split]()` and stores them (process 0 writes
    the file in one step, `storage.write_bytes`, so an interrupted write leaves no partial file)."""
    path = storage.location(path)
    stored = {}
    if path.is_file():
        with path.open("rb") as handle, np.load(handle) as archive:
            for name in archive.files:
                split, key = name.split("/", 1)
                stored.setdefault(split, {})[key] = archive[name]
    tables, computed = {}, False
    for split, compute in splits.items():
        have = stored.get(split)
        if have and all(t.size == sizes[split] for t in have.values()):
            tables[split] = have
        else:
            tables[split] = compute()
            computed = True
    if computed and jax.process_index() == 0:
        archive = io.BytesIO()
        np.savez(archive, **{f"{split}/{key}": t for split, split_tables in tables.items()
                             for key, t in split_tables.items()})
        storage.write_bytes(path, archive.getvalue())
    return tables
