"""NFT and RFT inside an unmodified verl (≥ 0.9): registered, not forked.

verl loads this module through its plugin entry-point group (``verl.plugins``, declared in
nftune's package metadata), so every process that imports verl — the driver and each Ray
worker — registers:

* the advantage estimator ``nft`` (``algorithm.adv_estimator=nft``), which carries each
  answer's outcome to the loss, and
* the policy losses ``nft`` and ``rft`` (``actor_rollout_ref.actor.policy_loss.loss_mode``),
  which evaluate nftune's own per-token objective (:func:`nftune.objectives.nft_token_loss`)
  and aggregate it with verl's ``agg_loss`` over the global batch.

Carrying the outcome. verl hands a policy loss only per-token ``advantages``; NFT needs each
answer's correctness r ∈ {0, 1} and its group's accuracy r̂. The estimator writes

    A = (2r − 1) · (1 + r̂)        on every response token,

so the loss reads r = [A > 0] and r̂ = |A| − 1 back (|A| ∈ [1, 2], exact to float rounding).
A is an encoding, not an advantage: use the ``nft`` estimator only with the ``nft``/``rft``
losses (they check that |A| lies in [1, 2]). The worker-side loss hook would need a patched
worker; the encoding needs nothing but verl's registries.

Hyper-parameters: the paper's defaults (ε = 1.0; ω = 1 − r̂ for NFT, ω = 1 for RFT) apply
as they are. To change them, swap the policy-loss config for :class:`NFTPolicyLossConfig`
(with P = ``actor_rollout_ref.actor.policy_loss``):
``P._target_=nftune.integrations.verl.NFTPolicyLossConfig +P.nft_eps=0.5 +P.nft_weight=grpo``.
Each loss reads its own weight key (``nft_weight`` for ``nft``, ``rft_weight`` for ``rft``),
so switching ``loss_mode`` never carries one algorithm's ω over to the other.

The reward: :func:`compute_score` is nftune's verifier as verl's custom reward function
(``reward.custom_reward_function.path=pkg://nftune.integrations.verl``,
``reward.custom_reward_function.name=compute_score``), with the extraction strategy that
``nftune verl-data`` stores in each row's ``extra_info``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:
    from verl.trainer.ppo.core_algos import agg_loss, register_adv_est, register_policy_loss
    from verl.workers.config import PolicyLossConfig
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("nftune.integrations.verl needs verl: pip install 'nftune[verl]'") from exc

from nftune.objectives import OBJECTIVES, PROMPT_WEIGHTS, nft_token_loss

Tensor = torch.Tensor

ADV_ESTIMATOR = "nft"


@dataclass
class NFTPolicyLossConfig(PolicyLossConfig):
    """verl's policy-loss config plus NFT's two hyper-parameters, named as in nftune's config
    (``eps``, ``weight``) with the loss as prefix, since verl's ``policy_loss`` is shared by
    every loss; None takes the default of nftune's registered objective.

    Args:
        nft_eps: clip ε of the negative ratio (paper: 1.0).
        nft_weight: NFT's prompt weight ω: ``dr_grpo`` (1 − r̂, the default), ``grpo``
            (sqrt((1 − r̂)/r̂)) or ``one``.
        rft_weight: RFT's prompt weight ω (default ``one``, the paper's RFT).
    """

    nft_eps: float | None = None
    nft_weight: str | None = None
    rft_weight: str | None = None


# ---------------------------------------------------------------------------------------------
# The outcome encoding
# ---------------------------------------------------------------------------------------------


def encode_outcome(correct: Tensor, r_hat: Tensor, response_mask: Tensor) -> Tensor:
    """(B, T) advantages A = (2r − 1)(1 + r̂) on response tokens, 0 elsewhere."""
    value = (2.0 * correct.float() - 1.0) * (1.0 + r_hat.float())
    return value[:, None] * response_mask.float()


def decode_outcome(advantages: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(correct, r̂), each (B,), from :func:`encode_outcome`'s advantages. Rows without a
    response token get r̂ = 0, which makes them carry no loss."""
    mask = response_mask.bool()
    count = mask.sum(-1)
    value = torch.where(mask, advantages.float(), 0.0).sum(-1) / count.clamp(min=1)
    magnitude = value.abs()
    bad = (count > 0) & ((magnitude < 1.0 - 1e-4) | (magnitude > 2.0 + 1e-4))
    if bad.any():
        raise ValueError(
            "advantages: |A| outside [1, 2] on a response; the nft/rft policy losses need "
            f"algorithm.adv_estimator={ADV_ESTIMATOR} (got e.g. {value[bad][0].item():.4g})")
    correct = (value > 0).float()
    r_hat = torch.where(count > 0, (magnitude - 1.0).clamp(0.0, 1.0), 0.0)
    return correct, r_hat


@register_adv_est(ADV_ESTIMATOR)
def compute_nft_outcome(token_level_rewards: Tensor, response_mask: Tensor,
                        index: np.ndarray | None = None, config: Any = None, **_: Any
                        ) -> tuple[Tensor, Tensor]:
    """verl advantage estimator: r = [answer's total reward > 0] (covers verl's 0/1 and ±1
    rule rewards), r̂ = mean r over the answers sharing a ``uid``; returns (A, A) encoded."""
    if index is None:
        raise ValueError("the nft advantage estimator needs the batch's uid (index) to group "
                         "answers by question")
    correct = (token_level_rewards.sum(-1) > 0).float()
    groups: dict[Any, list[int]] = {}
    for i, uid in enumerate(index.tolist() if hasattr(index, "tolist") else index):
        groups.setdefault(uid, []).append(i)
    r_hat = torch.empty_like(correct)
    for rows in groups.values():
        r_hat[rows] = correct[rows].mean()
    encoded = encode_outcome(correct, r_hat, response_mask)
    return encoded, encoded


# ---------------------------------------------------------------------------------------------
# The policy losses
# ---------------------------------------------------------------------------------------------


def _hparams(config: Any, loss_mode: str) -> tuple[str, float]:
    """(ω name, ε) from ``config.policy_loss`` (verl's config classes and DictConfig both have
    ``get``); the paper's defaults where it does not set them."""
    policy_loss = getattr(config, "policy_loss", None)
    settings = policy_loss if policy_loss is not None else {}
    key = f"{loss_mode}_weight"  # each loss its own key: a recipe's NFT ω never reaches RFT
    defaults = OBJECTIVES["nft"].hparams  # RFT is NFT without the negative term
    weight = settings.get(key, None) or OBJECTIVES[loss_mode].hparams["weight"]
    eps = settings.get("nft_eps", None)
    eps = defaults["eps"] if eps is None else float(eps)
    if weight not in PROMPT_WEIGHTS:
        raise ValueError(f"policy_loss.{key}: unknown {weight!r}; valid: "
                         f"{sorted(PROMPT_WEIGHTS)}")
    if eps <= 0:
        raise ValueError(f"policy_loss.nft_eps: must be positive, got {eps}")
    return weight, eps


def _global_batch_info(config: Any) -> dict[str, Any]:
    info = getattr(config, "global_batch_info", None) if config is not None else None
    return dict(info or {})


def _nft_family_loss(loss_mode: str, old_log_prob: Tensor, log_prob: Tensor,
                     advantages: Tensor, response_mask: Tensor, loss_agg_mode: str,
                     config: Any, rollout_is_weights: Tensor | None
                     ) -> tuple[Tensor, dict[str, Any]]:
    weight, eps = _hparams(config, loss_mode)
    correct, r_hat = decode_outcome(advantages, response_mask)
    mask = response_mask.bool()
    log_ratio = torch.where(mask, log_prob - old_log_prob.detach(), 0.0)
    per_token, pos, neg, clipped = nft_token_loss(
        log_ratio, correct.to(log_prob.dtype), r_hat.to(log_prob.dtype), weight, eps,
        positive_only=loss_mode == "rft")
    if rollout_is_weights is not None:
        per_token = per_token * rollout_is_weights
    loss = agg_loss(loss_mat=per_token, loss_mask=response_mask, loss_agg_mode=loss_agg_mode,
                    **_global_batch_info(config))
    n = mask.sum().clamp(min=1)
    lr_ = log_ratio.detach()
    # nftune's metric names (as `nftune train` logs them) beside verl's own pg_clipfrac and
    # ppo_kl (k1, as verl's losses log it); approx_kl is k3, the estimator nftune logs
    metrics = {
        "actor/pg_clipfrac": ((clipped * mask).sum() / n).item(),
        "actor/ppo_kl": ((-lr_ * mask).sum() / n).item(),
        "actor/approx_kl": (((lr_.exp() - 1 - lr_) * mask).sum() / n).item(),
        "actor/loss_pos": ((pos.detach() * mask).sum() / n).item(),
        "actor/loss_neg": ((neg.detach() * mask).sum() / n).item(),
        "actor/r_hat": r_hat.mean().item(),
    }
    return loss, metrics


@register_policy_loss("nft")
def nft_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                    response_mask: Tensor, loss_agg_mode: str = "token-mean",
                    config: Any = None, rollout_is_weights: Tensor | None = None
                    ) -> tuple[Tensor, dict[str, Any]]:
    """NFT (Eq. 10) in verl's policy-loss signature; see the module docstring."""
    return _nft_family_loss("nft", old_log_prob, log_prob, advantages, response_mask,
                            loss_agg_mode, config, rollout_is_weights)


@register_policy_loss("rft")
def rft_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                    response_mask: Tensor, loss_agg_mode: str = "token-mean",
                    config: Any = None, rollout_is_weights: Tensor | None = None
                    ) -> tuple[Tensor, dict[str, Any]]:
    """RFT (NFT's positive term, ω = 1 by default) in verl's policy-loss signature."""
    return _nft_family_loss("rft", old_log_prob, log_prob, advantages, response_mask,
                            loss_agg_mode, config, rollout_is_weights)


# ---------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------


def compute_score(data_source: str, solution_str: str, ground_truth: str,
                  extra_info: dict | None = None, **_: Any) -> dict[str, Any]:
    """nftune's verifier as verl's custom reward: {"score": 1.0 | 0.0, "acc": bool,
    "truncated": bool}. An answer marked ``extra_info["truncated"]`` (by
    :class:`nftune.integrations.verl_reward.TruncationAwareRewardManager`) scores 0 whatever
    its text says, as in the paper and ``nftune train``."""
    from nftune.verify import verify_batch

    info = extra_info or {}
    truncated = bool(info.get("truncated", False))
    # one worker per reward process: verl runs many of them
    ok = not truncated and verify_batch([solution_str], [str(ground_truth)],
                                        strategy=info.get("strategy", "auto"), workers=1)[0]
    # the same keys for every answer: verl stacks them across a batch
    return {"score": 1.0 if ok else 0.0, "acc": bool(ok), "truncated": truncated}
