"""Optimisers and learning-rate schedules from `OptimizerConfig`."""

import jax
import optax

from jaxalign.config import OptimizerConfig

NO_DECAY_NAMES = ("norm", "bias")
EMBEDDING_NAMES = ("embed",)


def warmup_steps(config: OptimizerConfig, total_steps: int) -> int:
    """`optimizer.warmup_steps`, or `optimizer.warmup_ratio` of `total_steps` rounded; never more than the run."""
    steps = config.warmup_steps or int(round(config.warmup_ratio * total_steps))
    return min(steps, total_steps)


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then constant, linear or cosine decay down to `lr * min_lr_ratio`."""
    warmup = warmup_steps(config, total_steps)
    floor = config.lr * config.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if config.schedule == "constant":
        main = optax.constant_schedule(config.lr)
    elif config.schedule == "linear":
        main = optax.linear_schedule(config.lr, floor, decay_steps)
    else:
        main = optax.cosine_decay_schedule(config.lr, decay_steps, alpha=config.min_lr_ratio)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), main], [warmup])


def decay_mask(params, decay_embeddings: bool = False):
    """True for the weights that get weight decay: not norms, not biases, and embeddings only when asked.

    Decided by parameter path names, so it also holds for layer-stacked (scanned) parameters.
    """

    def wants_decay(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
        if any(excluded in name for name in names for excluded in NO_DECAY_NAMES):
            return False
        if not decay_embeddings and any(e in name for name in names for e in EMBEDDING_NAMES):
            return False
        return True

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """The optax chain: global-norm clipping, then the named optimiser driven by the schedule."""
    schedule = make_schedule(config, total_steps)
    mask = lambda params: decay_mask(params, config.decay_embeddings)  # noqa: E731
    if config.name == "adamw":
        core = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=mask)
    elif config.name == "adafactor":
        core = _adafactor(config, schedule, mask)
    else:
        core = optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask) if config.weight_decay else optax.identity(),
            optax.sgd(schedule, momentum=config.b1 or None),
        )
    clip = optax.clip_by_global_norm(config.clip) if config.clip > 0 else optax.identity()
    return optax.chain(clip, core)


def _adafactor(config: OptimizerConfig, schedule, mask) -> optax.GradientTransformation:
    """Adafactor with a fixed second-moment decay (`decay`), optional factoring, update clipping, parameter
    scaling, momentum `b1` and decoupled weight decay scaled by the learning rate."""
    fixed_decay = lambda step, rate: rate  # noqa: E731
    parts = [
        optax.scale_by_factored_rms(factored=config.factored, decay_rate=config.decay, epsilon=1e-30,
                                    decay_rate_fn=fixed_decay),
    ]
    if config.update_clip is not None:
        parts.append(optax.clip_by_block_rms(config.update_clip))
    if config.parameter_scale:
        parts.append(optax.scale_by_param_block_rms())
    if config.b1 is not None:
        parts.append(optax.ema(config.b1, debias=False))
    if config.weight_decay:
        parts.append(optax.add_decayed_weights(config.weight_decay, mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)
