"""PPO for language models: the pure per-token functions of one RLHF iteration.

Arrays are `[B, T]` over response tokens, with `mask [B, T]` non-zero on the valid tokens (the response up to and
including its end token) and zero on prompt and padding slots. Every function returns float32, is jittable, takes
masked slots out with `where` (a NaN or inf there reaches neither the outputs nor the gradients) and loops over T
only inside `jax.lax.scan`.

| step | function | source |
|---|---|---|
| KL to the reference, `d = logp - ref` | `kl_penalty`: k1 `d`, k2 `d²/2`, k3 `e^{-d} - 1 + d` | Schulman 2020 (blog) |
| token rewards | `sequence_score_rewards`: `-β KL_t`, plus the score at the last valid token | Ziegler et al. 2019 |
| advantages | `gae`: `δ_t = r_t + γV_{t+1} - V_t`, `A_t = δ_t + γλA_{t+1}` | Schulman et al. 2016 (GAE) |
| normalisation | `whiten`: `(x - mean) / sqrt(var + eps)` over valid tokens | TRL, OpenRLHF |
| policy loss | `policy_loss`: `max(-Aρ, -A clip(ρ, 1-ε_l, 1+ε_h))`, for A < 0 `min(·, -cA)` | Schulman 2017; Ye 2020 |
| value loss | `value_loss`: `½ max((V-R)², (V_old + clip(V-V_old, ±c) - R)²)` | Schulman et al. 2017 (baselines) |
| β | `AdaptiveKLController`, `FixedKLController` | Ziegler et al. 2019; Touvron et al. 2023 §3.2.3 |

Metrics: `masked_mean`, `approx_kl`, `explained_variance`. The KL estimators k1, k2, k3 are
those of Schulman's "Approximating KL divergence" (2020).
"""

import jax
import jax.numpy as jnp

from jaxalign.errors import JaxalignError

KL_KINDS = ("k1", "k2", "k3")


def _valid(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask) != 0


def _clean(x, valid: jax.Array) -> jax.Array:
    """`x` as float32 with its masked slots set to 0 before any arithmetic (so their gradient is 0, not NaN)."""
    return jnp.where(valid, jnp.asarray(x, jnp.float32), 0.0)


def masked_mean(x: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """Mean of `x` over the slots where `mask` (same shape) is non-zero: a float32 scalar, or `[...]` with `axis`
    reduced. The masked slots are dropped with `where` (NaN there reaches neither the value nor its gradient); no
    valid slot gives 0."""
    valid = _valid(mask)
    total = jnp.sum(_clean(x, valid), axis=axis)
    return total / jnp.maximum(jnp.sum(valid, axis=axis, dtype=jnp.float32), 1.0)


def whiten(x: jax.Array, mask: jax.Array | None = None, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """`(x - mean) / sqrt(var + eps)` float32 of the shape of `x`, with the mean and the (biased, 1/n) variance over
    the slots where `mask` is non-zero (all of `x` when `mask` is None); masked slots come out 0.

    shift_mean: False adds the mean back after scaling (`(x - mean) / sqrt(var + eps) + mean`), as TRL and
      OpenRLHF whiten rewards; True (the default) centres, as for advantages.
    A single valid entry gives 0 (its deviation from the mean is 0), never NaN; so does an all-masked array.
    TRL divides by the unbiased (1/(n-1)) variance; over a batch of tokens the two differ by a factor ≈ 1.
    """
    x = jnp.asarray(x, jnp.float32)
    valid = jnp.ones(x.shape, bool) if mask is None else _valid(mask)
    mean = masked_mean(x, valid)
    centred = _clean(x, valid) - mean
    var = masked_mean(jnp.square(centred), valid)
    out = centred * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(valid, out, 0.0)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float | jax.Array,
        lam: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016): `(advantages [B, T], returns [B, T])`, float32.

    rewards, values: `[B, T]` token rewards and value estimates; mask: `[B, T]` (non-zero = valid token).
    gamma: discount γ; lam: GAE's λ (Python floats or scalar arrays).

    Backwards over the valid tokens of each row, as one reverse `lax.scan` over T:

        δ_t = r_t + γ V_next - V_t,    A_t = δ_t + γλ A_next,    R_t = A_t + V_t

    where V_next and A_next belong to the next *valid* token, and are 0 after the last one (the episode ends at
    the end token). A masked slot is skipped: it passes V_next and A_next through unchanged (no step of
    discount), and its own advantage and return are 0; so padding, prompt slots and masked tokens inside a
    response contribute nothing. Example: r = [0, 0, 1], V = [.5, .6, .7], γ = 1, λ = .95 → A = [.46575, .385, .3].
    """
    valid = _valid(mask)
    r, v = _clean(rewards, valid), _clean(values, valid)
    gamma = jnp.asarray(gamma, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)

    def step(carry, xs):
        v_next, a_next = carry
        r_t, v_t, ok = xs
        a_t = r_t + gamma * v_next - v_t + gamma * lam * a_next
        a_t = jnp.where(ok, a_t, 0.0)
        carry = (jnp.where(ok, v_t, v_next), jnp.where(ok, a_t, a_next))
        return carry, a_t

    zeros = jnp.zeros(r.shape[:1], jnp.float32)
    _, advantages = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, valid.T), reverse=True)
    advantages = advantages.T
    return advantages, jnp.where(valid, advantages + v, 0.0)


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: str = "k1") -> jax.Array:
    """Per-token estimate `[B, T]` float32 of KL(π‖π_ref) from tokens sampled from π, with `d = logp - ref_logp`
    (log-probs `[B, T]` of the sampled tokens under the policy and the reference); Schulman, "Approximating KL
    divergence" (2020):

    - `k1`: `d` (unbiased, can be negative; the usual reward penalty);
    - `k2`: `d² / 2` (biased, non-negative, low variance);
    - `k3`: `e^{-d} - 1 + d` (unbiased, non-negative, low variance; the usual loss term, as k1 has zero expected
      gradient). Example: logp = [-1, -2, -.5], ref = [-1.2, -1.5, -.5] → k3 = [.018731, .148721, 0].

    No mask: the caller drops the invalid slots (e.g. `sequence_score_rewards`, `masked_mean`).
    Raises JaxalignError for another `kind`.
    """
    if kind not in KL_KINDS:
        raise JaxalignError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_KINDS)}")
    d = jnp.asarray(logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * jnp.square(d)
    return jnp.expm1(-d) + d


def approx_kl(logp: jax.Array, old_logp: jax.Array) -> jax.Array:
    """Per-token estimate `[B, T]` float32 of KL(π_old‖π), the policy's drift during an iteration, from tokens
    sampled from π_old: k3 with ratio `ρ = exp(logp - old_logp)`, i.e. `(ρ - 1) - log ρ` (= `kl_penalty(old_logp,
    logp, "k3")`). Chosen over k2's `½(logp - old_logp)²` (TRL's `approxkl`) because it is unbiased and still
    non-negative with low variance (Schulman, "Approximating KL divergence"). Average with `masked_mean`."""
    return kl_penalty(old_logp, logp, "k3")


def sequence_score_rewards(kl_per_token: jax.Array, scores: jax.Array, mask: jax.Array,
                           beta: float | jax.Array) -> jax.Array:
    """Token rewards `[B, T]` float32 (Ziegler et al. 2019; Touvron et al. 2023 §3.2.3): `r_t = -β KL_t` on the
    valid tokens, plus the sequence score `scores[b]` (`[B]`) at the row's *last* valid token (the end token, or
    the last token of a response cut at the width), not at the slot after it; 0 on masked slots.

    kl_per_token: `[B, T]` (e.g. `kl_penalty(logp, ref_logp, "k1")`); beta: β, a float or a scalar array (an
    adaptive β can be passed into a jitted step). A row without valid tokens gets no reward at all.
    """
    valid = _valid(mask)
    rewards = -jnp.asarray(beta, jnp.float32) * _clean(kl_per_token, valid)
    width = valid.shape[-1]
    last = width - 1 - jnp.argmax(valid[..., ::-1], axis=-1)
    at_last = (jnp.arange(width) == last[..., None]) & valid
    return jnp.where(at_last, rewards + jnp.asarray(scores, jnp.float32)[..., None], rewards)


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip_low: float = 0.2, clip_high: float | None = None,
                dual_clip: float | None = None) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped surrogate per token (Schulman et al. 2017): `(loss [B, T], clipped [B, T])`, float32.

    logp, old_logp: log-probs `[B, T]` of the sampled tokens under the policy being trained and the policy that
    sampled them; advantages: `[B, T]` (held fixed; no gradient is taken through them); mask: `[B, T]`.
    With `ρ = exp(logp - old_logp)`:

        loss_t = max(-A ρ, -A clip(ρ, 1 - ε_low, 1 + ε_high))
        loss_t = min(loss_t, -c A)    where A < 0, with dual_clip = c > 1 (Ye et al. 2020)

    clip_low, clip_high: ε_low, ε_high (clip_high None = ε_low, the symmetric clip).
    clipped: 1.0 where the loss comes from a clipped branch (the ratio clip, or the dual clip), so that the token
      gives no gradient; its `masked_mean` is the clip fraction. Both outputs are 0 on masked tokens.
    Example: ρ = [1.35, .7, 1.1], A = [1, -1, 1], ε = .2 → loss [-1.2, .8, -1.1], clipped [1, 1, 0].
    Raises JaxalignError for a dual clip c <= 1 given as a number.
    """
    if clip_high is None:
        clip_high = clip_low
    if isinstance(dual_clip, (int, float)) and not dual_clip > 1:
        raise JaxalignError(f"the dual clip constant must be > 1, got {dual_clip}")
    valid = _valid(mask)
    log_ratio = _clean(logp, valid) - _clean(old_logp, valid)
    adv = jax.lax.stop_gradient(_clean(advantages, valid))
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped_loss = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped_loss)
    clipped = clipped_loss > unclipped
    if dual_clip is not None:
        bound = -jnp.asarray(dual_clip, jnp.float32) * adv
        dual = (adv < 0) & (bound < loss)
        loss = jnp.where(dual, bound, loss)
        clipped = clipped | dual
    return jnp.where(valid, loss, 0.0), jnp.where(valid, clipped, False).astype(jnp.float32)


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip: float | None = 0.2) -> jax.Array:
    """Value-head loss per token `[B, T]` float32, 0 on masked tokens:

        ½ max((V - R)², (V_old + clip(V - V_old, -c, c) - R)²)

    values: the value head's `[B, T]` now; old_values: its values when the samples were scored (the ones GAE
    used); returns: GAE's `R [B, T]` (no gradient is taken through them or old_values). clip: c; None gives the
    unclipped `½ (V - R)²`. The clipped form is the one of PPO's reference implementation (OpenAI baselines).
    """
    valid = _valid(mask)
    v = _clean(values, valid)
    target = jax.lax.stop_gradient(_clean(returns, valid))
    loss = jnp.square(v - target)
    if clip is not None:
        old = jax.lax.stop_gradient(_clean(old_values, valid))
        clipped = old + jnp.clip(v - old, -clip, clip)
        loss = jnp.maximum(loss, jnp.square(clipped - target))
    return jnp.where(valid, 0.5 * loss, 0.0)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """`1 - Var(R - V) / Var(R)` over the valid tokens, a float32 scalar: 1 for a perfect value head, 0 for one no
    better than the mean return, negative for worse. When the returns do not vary (Var(R) = 0, or fewer than two
    valid tokens) it is 0, not NaN or inf, so a logged metric never trips a NaN check."""
    valid = _valid(mask)
    v, r = _clean(values, valid), _clean(returns, valid)

    def variance(x):
        return masked_mean(jnp.square(x - masked_mean(x, valid)), valid)

    var_r = variance(r)
    ratio = variance(r - v) / jnp.where(var_r > 0, var_r, 1.0)
    return jnp.where(var_r > 0, 1.0 - ratio, 0.0)


class _KLController:
    """β as `value` (a Python float), saved and restored exactly through a JSON-able state."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def state_dict(self) -> dict:
        """`{"value": β}`, JSON-able."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restores β from `state_dict()`."""
        self.value = float(state["value"])


class FixedKLController(_KLController):
    """A constant KL coefficient β (LLaMA-2: 0.01, 0.005 for 70B), with the interface of `AdaptiveKLController`."""

    def update(self, kl, n_samples: int) -> float:
        """Leaves β as it is; returns it."""
        return self.value


class AdaptiveKLController(_KLController):
    """Ziegler et al. (2019)'s proportional controller of the KL coefficient β towards a target KL.

    After an iteration of `n_samples` sampled responses whose mean KL to the reference (k1 summed over the
    response) was `kl`: `e = clip(kl / target - 1, -0.2, 0.2)`, `β ← β (1 + e · n_samples / horizon)`.
    `value` is the current β (a Python float); `state_dict()` / `load_state_dict()` save and restore it exactly
    (the target and horizon come from the run's settings).
    """

    def __init__(self, init_beta: float, target: float, horizon: float):
        if not target > 0 or not horizon > 0:
            raise JaxalignError(f"the adaptive KL controller needs a target > 0 and a horizon > 0, got target "
                                f"{target} and horizon {horizon}")
        super().__init__(init_beta)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, kl, n_samples: int) -> float:
        """One iteration's update from its mean KL `kl` (a number or a scalar array) over `n_samples` samples;
        returns the new β."""
        error = min(max(float(kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
        return self.value
