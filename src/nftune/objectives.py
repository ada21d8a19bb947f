"""The six training objectives of the NFT paper as pure functions on per-token tensors.

Every objective takes one :class:`ObjectiveInput`, for B answers padded to T tokens:

    logprobs      (B, T)  log π_θ(a_t | q, a_<t), carries the gradient
    old_logprobs  (B, T)  log π_old(a_t | q, a_<t), recorded at rollout
    mask          (B, T)  1 on response tokens
    reward        (B,)    reward r: the verifier's 0/1 (any value in [0, 1] for the GRPO family)
    r_hat         (B,)    r̂_q, accuracy of the answer's group (K answers of one question)

plus group ids and normalisers, and its hyper-parameters as keyword-only arguments. An
objective is registered with :func:`register_objective`, which also declares what the training
loop must know about it (dynamic sampling by default, whole groups per micro-batch, reward
shaping); the loop, the config and the CLI read the registry and never an algorithm's name.
The entry points are :func:`objective_loss` (an ObjectiveInput) and :func:`compute_loss`
(the same from tensors). Token-level objectives sum the per-token
loss over answers and response tokens and divide by ``num_tokens`` (default: ``mask.sum()``), so
a mini-batch split into micro-batches, each given the mini-batch's token count, accumulates the
same gradient as the whole.

Answers of groups with r̂ ∈ {0, 1} carry no learning signal (Algorithm 1 filters them); every
token-level objective gives them exactly zero loss and zero gradient, with no NaN on the way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

Tensor = torch.Tensor
Metrics = dict[str, float]

# ---------------------------------------------------------------------------------------------
# Prompt weights ω(q)
# ---------------------------------------------------------------------------------------------

PROMPT_WEIGHTS: dict[str, Callable[[Tensor], Tensor]] = {}


def register_weight(name: str) -> Callable:
    """Register a prompt weight ω(r̂); a duplicate name is an error."""

    def wrap(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        if name in PROMPT_WEIGHTS:
            raise ValueError(f"prompt weight {name!r} is already registered")
        PROMPT_WEIGHTS[name] = fn
        return fn

    return wrap


@register_weight("one")
def weight_one(r_hat: Tensor) -> Tensor:
    """ω = 1 (RFT's weighting)."""
    return torch.ones_like(r_hat)


@register_weight("dr_grpo")
def weight_dr_grpo(r_hat: Tensor) -> Tensor:
    """ω = 1 − r̂: on-policy NFT then has Dr.GRPO's gradient (Prop. 4.2). NFT's default."""
    return 1.0 - r_hat


@register_weight("grpo")
def weight_grpo(r_hat: Tensor) -> Tensor:
    """ω = sqrt((1 − r̂) / r̂): on-policy NFT then has GRPO's gradient (Prop. 4.2)."""
    return torch.sqrt((1.0 - r_hat) / r_hat)


def prompt_weight(name: str, r_hat: Tensor) -> Tensor:
    """ω(r̂) by name; only defined for 0 < r̂ < 1 (callers mask the rest)."""
    if name not in PROMPT_WEIGHTS:
        raise ValueError(f"weight: unknown prompt weight {name!r}; valid: {sorted(PROMPT_WEIGHTS)}")
    return PROMPT_WEIGHTS[name](r_hat)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def informative(r_hat: Tensor) -> Tensor:
    """(B,) bool: the answer's group has 0 < r̂ < 1, i.e. carries a learning signal."""
    return (r_hat > 0) & (r_hat < 1)


def _safe_r_hat(r_hat: Tensor) -> Tensor:
    """r̂ with the uninformative groups replaced by 1/2, so no branch ever divides by zero.

    Their loss is masked to zero afterwards; a finite stand-in keeps the masked branch's
    gradient finite too (0 · inf would be NaN).
    """
    return torch.where(informative(r_hat), r_hat, torch.full_like(r_hat, 0.5))


class _StraightThroughMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        return torch.clamp(x, min=eps)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


# a negative ratio this close to ε counts as unclipped: recorded and recomputed log-probs differ
# by ~1e-6, which on an exactly on-policy batch would otherwise "clip" a few % of tokens
CLIP_TOLERANCE = 1e-4


def max_v(x: Tensor, eps: float) -> Tensor:
    """Straight-through max: value max(x, ε) exactly, gradient that of x (the paper's
    sg(max(x, ε) − x) + x, whose value rounds away from ε once |x| > 2²⁴ in fp32)."""
    return _StraightThroughMax.apply(x, eps)


def token_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    """Σ over answers and response tokens."""
    return (per_token * mask).sum()


# ---------------------------------------------------------------------------------------------
# Per-token objectives (pure functions: tensors in, per-token loss out)
# ---------------------------------------------------------------------------------------------


def nft_token_loss(
    log_ratio: Tensor,
    reward: Tensor,
    r_hat: Tensor,
    weight: str = "dr_grpo",
    eps: float = 1.0,
    positive_only: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NFT, Eq. 10 of the paper, per token.

        L_t = − ω(q) [ r · log R_t + (1 − r) · log max_v( (1 − r̂_q R_t) / (1 − r̂_q), ε ) ]

    with R_t = π_θ / π_old = exp(log_ratio). The second term is the log-likelihood of the
    implicit negative policy π⁻_θ = (π_old − r̂ π⁺_θ) / (1 − r̂). ``positive_only`` drops it (RFT).

    Returns (loss, positive part, negative part, clipped) as (B, T) tensors; ``clipped`` is 1
    on wrong answers' tokens whose negative ratio lies below ε by more than float noise
    (``CLIP_TOLERANCE``, relative), i.e. whose value the clip changed. Zero on groups with
    r̂ ∈ {0, 1}.
    """
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps: {eps}: NFT's clip ε must lie in (0, 1] (above 1, max_v(·, ε) "
                         "clips the on-policy ratio 1 and the loss at R = 1 is −ω·log ε, not 0)")
    keep = informative(r_hat)[:, None]
    r_hat_s = _safe_r_hat(r_hat)[:, None]
    omega = prompt_weight(weight, r_hat_s)
    r = reward[:, None].to(log_ratio.dtype)
    zero = torch.zeros_like(log_ratio)

    pos = -omega * r * log_ratio  # − ω r log R_t
    if positive_only:
        neg, clipped = zero, zero
    else:
        ratio = torch.exp(log_ratio)  # R_t
        neg_ratio = (1.0 - r_hat_s * ratio) / (1.0 - r_hat_s)  # π⁻_θ / π_old per token
        neg = -omega * (1.0 - r) * torch.log(max_v(neg_ratio, eps))
        clipped = ((neg_ratio < eps * (1 - CLIP_TOLERANCE)) & (r == 0)).to(log_ratio.dtype)
    pos, neg = torch.where(keep, pos, zero), torch.where(keep, neg, zero)
    return pos + neg, pos, neg, torch.where(keep, clipped, zero)


def group_advantage(reward: Tensor, r_hat: Tensor, normalise_std: bool,
                    reward_std: Tensor | None = None) -> Tensor:
    """GRPO's group-normalised advantage, (B,).

        Â = (r − r̂) / σ    (GRPO; σ the population std of the group's K rewards, no epsilon:
                             sqrt(r̂ (1 − r̂)) for binary rewards, ``reward_std`` if given)
        Â =  r − r̂         (Dr.GRPO, normalise_std=False)

    r̂ is the group's mean reward. Zero on groups with r̂ ∈ {0, 1} or σ = 0.
    """
    r_hat_s = _safe_r_hat(r_hat)
    adv = reward.to(r_hat.dtype) - r_hat_s
    if normalise_std:
        std = (torch.sqrt(r_hat_s * (1.0 - r_hat_s)) if reward_std is None
               else reward_std.to(r_hat.dtype))
        adv = torch.where(std > 0, adv / torch.where(std > 0, std, 1.0), 0.0)
    return torch.where(informative(r_hat), adv, torch.zeros_like(adv))


def shaped_group_advantage(rewards: Tensor, group_ids: Tensor, r_hat: Tensor) -> Tensor:
    """Â = (R − mean_q R) / std_q R for real-valued rewards R (e.g. r plus DAPO's overlong
    penalty), population std per group; zero where the std is 0 or r̂ ∈ {0, 1}."""
    _, g = torch.unique(group_ids, return_inverse=True)
    n = torch.zeros(int(g.max().item()) + 1, dtype=rewards.dtype, device=rewards.device)
    count = n.index_add(0, g, torch.ones_like(rewards))
    mean = n.index_add(0, g, rewards) / count
    var = n.index_add(0, g, (rewards - mean[g]) ** 2) / count
    std = var.sqrt()[g]
    adv = torch.where(std > 0, (rewards - mean[g]) / torch.where(std > 0, std, 1.0), 0.0)
    return torch.where(informative(r_hat), adv, torch.zeros_like(adv))


def clipped_pg_token_loss(
    log_ratio: Tensor, advantage: Tensor, clip_low: float = 0.2, clip_high: float = 0.28
) -> tuple[Tensor, Tensor]:
    """GRPO / DAPO surrogate, Eq. 3 of the paper, per token (clip-higher of DAPO).

        L_t = − min( R_t Â, clip(R_t, 1 − ε_low, 1 + ε_high) Â )

    Returns (loss, clipped) as (B, T); ``clipped`` is 1 where the clipped branch is the min.
    """
    ratio = torch.exp(log_ratio)
    adv = advantage[:, None]
    unclipped = ratio * adv
    clipped_obj = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped_obj)
    clipped = (clipped_obj < unclipped).to(log_ratio.dtype)
    return loss, clipped


def infonca_group_loss(
    seq_log_ratio: Tensor, reward: Tensor, group_ids: Tensor, beta: float = 0.1
) -> tuple[Tensor, int]:
    """Iterative DPO via InfoNCA (paper Appendix, after Chen et al. 2024), summed over groups.

        L_q = − Σ_k ( r_k / Σ_i r_i ) · log softmax_k( β s_θ(q, a_k) ),
        s_θ(q, a) = log π_θ(a|q) − log π_old(a|q)

    For K = 2 with one correct answer this is DPO's − log σ(β (s_w − s_l)). Groups with no
    correct answer contribute nothing. Returns (Σ_q L_q, number of contributing groups).
    """
    _, group_index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group_index.max().item()) + 1 if group_ids.numel() else 0
    r = reward.to(seq_log_ratio.dtype)
    logits = beta * seq_log_ratio
    # log-softmax within each group: subtract the group's logsumexp
    group_max = torch.full((num_groups,), -torch.inf, dtype=logits.dtype, device=logits.device)
    group_max = group_max.scatter_reduce(0, group_index, logits.detach(), reduce="amax")
    shifted = torch.exp(logits - group_max[group_index])
    denom = torch.zeros(num_groups, dtype=logits.dtype, device=logits.device)
    denom = denom.index_add(0, group_index, shifted)
    log_softmax = logits - group_max[group_index] - torch.log(denom[group_index])
    r_sum = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add(0, group_index, r)
    has_positive = r_sum > 0
    target = torch.where(has_positive[group_index], r / r_sum[group_index].clamp(min=1), 0.0 * r)
    return -(target * log_softmax).sum(), int(has_positive.sum().item())


# ---------------------------------------------------------------------------------------------
# One input shape, one registry
# ---------------------------------------------------------------------------------------------


@dataclass
class ObjectiveInput:
    """What every objective sees, for B answers padded to T tokens. Built with keywords by its
    caller (the update, or :func:`compute_loss`), checked and completed by
    :func:`objective_loss` (``log_ratio`` from the log-probs)."""

    logprobs: Tensor  # (B, T) log π_θ, carries the gradient
    old_logprobs: Tensor  # (B, T) log π_old, recorded at rollout
    mask: Tensor  # (B, T) 1 on response tokens
    reward: Tensor  # (B,) reward r: the verifier's 0/1, or a value in [0, 1] (GRPO family)
    r_hat: Tensor  # (B,) mean reward (accuracy) of the answer's group
    group_ids: Tensor | None = None  # (B,) which question each answer answers
    num_tokens: Tensor | float | None = None  # normaliser of token sums (default mask.sum())
    num_groups: int | None = None  # InfoNCA's G: groups with a correct answer
    num_sft_tokens: Tensor | float | None = None  # response tokens of correct answers
    overlong_penalty: Tensor | None = None  # (B,) ≤ 0, reward shaping (DAPO)
    # (B, T) ≥ 0, no gradient: each token's loss is multiplied by it (truncated importance
    # sampling when the answers came from an engine other than π_old); token-mean objectives
    token_weights: Tensor | None = None
    reward_std: Tensor | None = None  # (B,) population std of the group's rewards (GRPO)
    log_ratio: Tensor = field(init=False)  # (B, T) log R_t, exactly 0 off the response


ObjectiveFn = Callable[..., tuple[Tensor, Metrics]]


@dataclass(frozen=True)
class Objective:
    """A registered objective: its loss and what the training loop must know about it."""

    name: str
    loss: ObjectiveFn  # loss(x: ObjectiveInput, **hparams) -> (scalar loss, float metrics)
    hparams: dict[str, Any]  # its keyword-only hyper-parameters and their defaults
    dynamic_sampling: bool  # default of TrainConfig.dynamic_sampling
    whole_groups: bool  # the loss couples a group's answers: micro-batches keep groups whole
    # reads x.overlong_penalty (group-normalised: groups kept whole when it is on); default of
    # TrainConfig.overlong_shaping, which is an error for an objective without it
    overlong_shaping: bool
    needs_group_ids: bool
    # which answers carry a learning signal: a mini-batch without any is skipped
    signal: Callable[[Tensor, Tensor], Tensor]
    # the loss is a token mean built with token_mean_loss: it applies x.token_weights
    token_level: bool = True
    # rewards must be 0/1 (NFT's r splits answers into positive and negative); False: any
    # reward in [0, 1] (the advantage-based objectives)
    binary_reward: bool = True


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, *, dynamic_sampling: bool = True, whole_groups: bool = False,
                       overlong_shaping: bool = False, needs_group_ids: bool = False,
                       signal: Callable[[Tensor, Tensor], Tensor] | None = None,
                       token_level: bool = True, binary_reward: bool = True
                       ) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Register ``loss(x: ObjectiveInput, *, hparam=default, ...)`` under ``name``; its
    keyword-only parameters are its hyper-parameters (config keys of the same name set them).
    ``signal(reward, r_hat)`` marks the answers that carry a learning signal (default: those
    of groups with 0 < r̂ < 1). ``token_level``: the loss is a token mean made with
    :func:`token_mean_loss` (which applies ``x.token_weights``). ``binary_reward``: rewards
    must be 0/1 (else any value in [0, 1]). A duplicate name is an error."""

    def wrap(fn: ObjectiveFn) -> ObjectiveFn:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        params = inspect.signature(fn).parameters.values()
        hparams = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
        OBJECTIVES[name] = Objective(
            name, fn, hparams, dynamic_sampling, whole_groups, overlong_shaping,
            needs_group_ids or whole_groups,
            signal or (lambda reward, r_hat: informative(r_hat)), token_level, binary_reward)
        return fn

    return wrap


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"algo: unknown objective {name!r}; valid: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def _ratio_stats(log_ratio: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Importance-ratio diagnostics on the response tokens, as 0-dim tensors (no host read);
    1, 1 and 0 when there is no response token."""
    m = mask.bool()
    lr = log_ratio.detach()
    ratio = torch.exp(lr)
    count = m.sum()
    some = count > 0
    per_token_kl = ratio - 1 - lr  # k3 estimator of KL(π_old ‖ π_θ)
    one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
    return {
        "ratio_mean": torch.where(some, (ratio * m).sum() / count.clamp(min=1), one),
        "ratio_max": torch.where(some, torch.where(m, ratio, -torch.inf).max(), one),
        "approx_kl": (per_token_kl * m).sum() / count.clamp(min=1),
    }


def _to_floats(values: dict[str, Tensor]) -> Metrics:
    """0-dim tensors to floats with one device-to-host copy (one sync on a GPU, not one each)."""
    floats = torch.stack([v.detach().float() for v in values.values()]).tolist()
    return dict(zip(values, floats, strict=True))


def token_mean_loss(parts: dict[str, Tensor], x: ObjectiveInput, clipped: Tensor | None = None,
                    clip_over: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """Token-mean aggregation of (B, T) per-token losses: Σ (loss · mask) / num_tokens for each
    of ``parts`` (``loss`` is the one returned; ``loss_pos`` and ``loss_neg`` are expected by
    the loop's metrics), plus the ratio diagnostics and, given ``clipped``, ``clip_fraction``
    over the tokens of the ``clip_over`` (B, 1) rows (default: all). Each token's loss is
    weighted by ``x.token_weights`` when given. For objectives of your own too."""
    log_ratio, mask, num_tokens = x.log_ratio, x.mask, x.num_tokens
    weighted = mask if x.token_weights is None else mask * x.token_weights.detach()
    stats = {k: token_sum(v, weighted) / num_tokens for k, v in parts.items()}
    if clipped is not None:
        n = (mask if clip_over is None else mask * clip_over).sum().clamp(min=1)
        stats["clip_fraction"] = token_sum(clipped, mask) / n
    stats.update(_ratio_stats(log_ratio, mask))
    return stats["loss"], _to_floats(stats)


@register_objective("nft")
def nft(x: ObjectiveInput, *, weight: str = "dr_grpo", eps: float = 1.0):
    """Negative-aware Fine-Tuning (Eq. 10); see :func:`nft_token_loss`."""
    loss, pos, neg, clipped = nft_token_loss(x.log_ratio, x.reward, x.r_hat, weight, eps)
    wrong = (1.0 - x.reward.to(x.log_ratio.dtype))[:, None]  # clip_fraction: of wrong answers
    parts = {"loss": loss, "loss_pos": pos, "loss_neg": neg}
    return token_mean_loss(parts, x, clipped, clip_over=wrong)


@register_objective("rft")
def rft(x: ObjectiveInput, *, weight: str = "one"):
    """Rejection-sampling fine-tuning: NFT's positive term only, ω = 1 by default.

        L_t = − ω(q) · r · log R_t    (gradient of − r log π_θ: likelihood of correct answers)
    """
    loss, pos, neg, clipped = nft_token_loss(x.log_ratio, x.reward, x.r_hat, weight,
                                             positive_only=True)
    return token_mean_loss({"loss": loss, "loss_pos": pos, "loss_neg": neg}, x, clipped)


def _pg_with_advantage(x: ObjectiveInput, adv: Tensor, clip_low: float, clip_high: float):
    loss, clipped = clipped_pg_token_loss(x.log_ratio, adv, clip_low, clip_high)
    positive = (adv > 0)[:, None].to(loss.dtype)
    parts = {"loss": loss, "loss_pos": loss * positive, "loss_neg": loss * (1 - positive)}
    return token_mean_loss(parts, x, clipped)


@register_objective("grpo", dynamic_sampling=False, binary_reward=False)
def grpo(x: ObjectiveInput, *, clip_low: float = 0.2, clip_high: float = 0.28):
    """GRPO (Eq. 3) with DAPO's clip-higher and token-level loss, Â = (r − r̂)/std."""
    adv = group_advantage(x.reward, x.r_hat, normalise_std=True, reward_std=x.reward_std)
    return _pg_with_advantage(x, adv, clip_low, clip_high)


@register_objective("dr_grpo", dynamic_sampling=False, binary_reward=False)
def dr_grpo(x: ObjectiveInput, *, clip_low: float = 0.2, clip_high: float = 0.28):
    """Dr.GRPO: GRPO without the std division, Â = r − r̂."""
    adv = group_advantage(x.reward, x.r_hat, normalise_std=False)
    return _pg_with_advantage(x, adv, clip_low, clip_high)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer_fraction: float
                     ) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to L_max − L_cache, then falling linearly to −1 at
    L_max, with L_cache = buffer_fraction · L_max."""
    cache = max(1, int(round(buffer_fraction * max_new_tokens)))
    start = max_new_tokens - cache
    return ((start - lengths.float()) / cache).clamp(min=-1.0, max=0.0)


@register_objective("dapo", overlong_shaping=True, binary_reward=False)
def dapo(x: ObjectiveInput, *, clip_low: float = 0.2, clip_high: float = 0.28):
    """DAPO's per-token objective is GRPO's (Eq. 3, clip-higher, token-mean).

    Dynamic sampling lives in the training loop. Overlong reward shaping arrives as
    ``x.overlong_penalty`` (B,) ≤ 0, added to DAPO's rule-based reward ±1 (correct +1, wrong
    −1, DAPO Eq. 9) before the group normalisation (needs ``group_ids``). Without the penalty
    ±1 and {0, 1} give the same normalised advantage; with it, the scale sets how strongly
    length counts against correctness, so it is DAPO's.
    """
    if x.overlong_penalty is None:
        adv = group_advantage(x.reward, x.r_hat, normalise_std=True, reward_std=x.reward_std)
    else:
        if x.group_ids is None:
            raise ValueError("group_ids: required by 'dapo' with overlong_penalty")
        dtype = x.log_ratio.dtype
        rewards = 2.0 * x.reward.to(dtype) - 1.0 + x.overlong_penalty.to(dtype)
        adv = shaped_group_advantage(rewards, x.group_ids, x.r_hat)
    return _pg_with_advantage(x, adv, clip_low, clip_high)


@register_objective("infonca", whole_groups=True, token_level=False,
                    signal=lambda reward, r_hat: reward > 0)
def infonca(x: ObjectiveInput, *, beta: float = 0.1, sft_coef: float = 1.0):
    """Iterative DPO via InfoNCA plus an SFT term on the correct answers.

        L = (1 / G) Σ_q L_q^InfoNCA + sft_coef · (− Σ_{correct tokens} log π_θ) / N_sft

    G (``x.num_groups``) defaults to the groups with a correct answer in this batch and N_sft
    (``x.num_sft_tokens``) to the response tokens of correct answers; pass the mini-batch's
    values when micro-batching.
    """
    m = x.mask
    seq_log_ratio = (x.log_ratio * m).sum(dim=1)  # s_θ(q, a)
    nca_sum, contributing = infonca_group_loss(seq_log_ratio, x.reward, x.group_ids, beta)
    g = x.num_groups if x.num_groups is not None else max(contributing, 1)
    r = x.reward.to(x.log_ratio.dtype)[:, None]
    n_sft = x.num_sft_tokens if x.num_sft_tokens is not None else (m * r).sum().clamp(min=1)
    sft = -torch.where((m * r) > 0, x.logprobs, 0.0).sum() / n_sft
    nca = nca_sum / g
    loss = nca + sft_coef * sft
    metrics = _to_floats({"loss": loss, "loss_pos": sft_coef * sft, "loss_neg": nca,
                          **_ratio_stats(x.log_ratio, m)})
    metrics.update(groups_with_positive=float(contributing))  # nothing is clipped: no key
    return loss, metrics


def _check_inputs(x: ObjectiveInput, objective: Objective) -> None:
    logprobs = x.logprobs
    if not isinstance(logprobs, Tensor) or logprobs.dim() != 2:
        raise ValueError(f"logprobs: expected a (B, T) tensor, got {_describe(logprobs)}")
    shape = tuple(logprobs.shape)
    for name in ("old_logprobs", "mask", "token_weights"):
        t = getattr(x, name)
        if t is None and name == "token_weights":
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} like logprobs, got {_describe(t)}")
    if x.group_ids is None and objective.needs_group_ids:
        raise ValueError(f"group_ids: required by {objective.name!r} (which question each "
                         "answer belongs to)")
    for name in ("reward", "r_hat", "group_ids", "overlong_penalty", "reward_std"):
        t = getattr(x, name)
        if t is None and name in ("group_ids", "overlong_penalty", "reward_std"):
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape[:1]:
            raise ValueError(f"{name}: expected shape ({shape[0]},), got {_describe(t)}")
    r_hat, reward, mask = x.r_hat, x.reward, x.mask
    # every value check at once, one host read; the first that fails is reported
    problems = [
        (torch.isnan(logprobs).any(), lambda: "logprobs: contains NaN"),
        (torch.isnan(x.old_logprobs).any(), lambda: "old_logprobs: contains NaN"),
        (torch.isnan(r_hat).any(), lambda: "r_hat: contains NaN"),
        (((r_hat < 0) | (r_hat > 1)).any(),
         lambda: f"r_hat: values must lie in [0, 1], got min {r_hat.min().item():g} "
                 f"max {r_hat.max().item():g}"),
        (~((reward == 0) | (reward == 1)).all() if objective.binary_reward
         else ((reward < 0) | (reward > 1)).any(),
         lambda: "reward: values must be 0/1 or bool" if objective.binary_reward
         else "reward: rewards must lie in [0, 1]"),
        (~((mask == 0) | (mask == 1)).all(), lambda: "mask: values must be 0/1 or bool"),
    ]
    if x.num_tokens is not None:
        problems.append((torch.as_tensor(x.num_tokens) <= 0,
                         lambda: f"num_tokens: must be positive, got {float(x.num_tokens)}"))
    flags = torch.stack([bad.to(logprobs.device).reshape(()) for bad, _ in problems]).tolist()
    for failed, (_, message) in zip(flags, problems, strict=True):
        if failed:
            raise ValueError(message())


def _describe(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def objective_loss(algo: str, x: ObjectiveInput, **hparams: Any) -> tuple[Tensor, Metrics]:
    """The loss of objective ``algo`` on one (micro-)batch ``x``, and float diagnostics.

    ``x`` is checked (shapes, NaN, rewards 0/1 where the objective declares binary rewards)
    and completed (mask and r̂ in the log-probs' dtype, ``num_tokens`` defaulting to the mask's
    sum, ``log_ratio``); ``hparams`` are the objective's hyper-parameters
    (``OBJECTIVES[algo].hparams``; the rest keep their defaults), e.g. eps and weight for NFT.

    Returns:
        (scalar loss, metrics) with metrics ``loss_pos``, ``loss_neg``, ``ratio_mean``,
        ``ratio_max`` and ``approx_kl`` at least, and ``clip_fraction`` where the objective
        clips (not InfoNCA).
    """
    objective = get_objective(algo)
    _check_inputs(x, objective)
    if x.token_weights is not None and not objective.token_level:
        raise ValueError(f"token_weights: {algo!r} is not a token-mean objective")
    unknown = set(hparams) - set(objective.hparams)
    if unknown:
        raise ValueError(f"hparams: {sorted(unknown)} not accepted by {algo!r}; "
                         f"valid: {sorted(objective.hparams)}")
    if "weight" in hparams and hparams["weight"] not in PROMPT_WEIGHTS:
        raise ValueError(f"weight: unknown prompt weight {hparams['weight']!r}; "
                         f"valid: {sorted(PROMPT_WEIGHTS)}")
    x.mask = x.mask.to(x.logprobs.dtype)
    x.r_hat = x.r_hat.to(x.logprobs.dtype)
    if x.num_tokens is None:
        x.num_tokens = x.mask.sum().clamp(min=1)
    # log R_t, exactly 0 off the response (padding may hold any value, even -inf)
    x.log_ratio = torch.where(x.mask > 0, x.logprobs - x.old_logprobs.detach(), 0.0)
    loss, metrics = objective.loss(x, **hparams)
    if "loss" not in metrics:
        metrics["loss"] = loss.item()
    return loss, metrics


def compute_loss(algo: str, logprobs: Tensor, old_logprobs: Tensor, mask: Tensor,
                 reward: Tensor, r_hat: Tensor, **fields_and_hparams: Any
                 ) -> tuple[Tensor, Metrics]:
    """:func:`objective_loss` with the input given as tensors: the five every objective
    reads, positionally, then any other :class:`ObjectiveInput` field (``group_ids``,
    ``num_tokens``, ``num_groups``, ``num_sft_tokens``, ``overlong_penalty``,
    ``token_weights``, ``reward_std``) and the hyper-parameters, by keyword::

        loss, metrics = compute_loss("nft", logprobs, old_logprobs, mask, reward, r_hat,
                                     eps=1.0, weight="dr_grpo")
    """
    names = {f.name for f in fields(ObjectiveInput) if f.init}
    x = ObjectiveInput(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask, reward=reward,
                       r_hat=r_hat, **{k: v for k, v in fields_and_hparams.items() if k in names})
    hparams = {k: v for k, v in fields_and_hparams.items() if k not in names}
    return objective_loss(algo, x, **hparams)
