"""verl's naive reward manager, telling nftune's reward which answers were truncated.

verl's reward managers decode an answer's tokens without its special tokens and hand the
reward function only the text, so a cut-off answer that happens to contain a right
``\\boxed{}`` would score 1. The paper (and ``nftune train``) counts a truncated answer as
wrong. This manager marks each answer ``extra_info["truncated"]`` — it filled the rollout's
whole response length without ending in a stop token (the tokenizer's EOS or any EOS the
model's generation config declares) — and :func:`nftune.integrations.verl.compute_score`
scores such answers 0.

The recipe selects it through verl's own loader (``reward.reward_manager.source: importlib``,
``module.path: pkg://nftune.integrations.verl_reward``, ``name: TruncationAwareRewardManager``);
it lives apart from the plugin module, which ``import verl`` loads in every process, because it
subclasses a reward-loop class only reward workers need.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from verl import DataProto
from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

from nftune.rollout import stop_token_ids


def _generation_config(config: Any):
    """The actor model's generation config, where its directory is local; None otherwise."""
    from pathlib import Path

    from transformers import GenerationConfig

    path = config.actor_rollout_ref.model.path
    if not Path(str(path)).is_dir():
        return None
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # a model directory without generation_config.json
        return None


def is_truncated(response_ids: list[int], max_length: int, stop_ids: set[int]) -> bool:
    """True if an answer used the whole response budget without ending in a stop token."""
    return len(response_ids) >= max_length and (not response_ids or
                                                 response_ids[-1] not in stop_ids)


class TruncationAwareRewardManager(NaiveRewardManager):
    """verl's ``naive`` reward manager plus ``extra_info["truncated"]`` for the reward."""

    def __init__(self, config, tokenizer, compute_score, **kwargs: Any):
        super().__init__(config, tokenizer, compute_score, **kwargs)
        rollout = config.actor_rollout_ref.rollout
        self.max_response_length = int(rollout.get("response_length", None)
                                       or config.data.max_response_length)
        self.stop_ids = set(stop_token_ids(tokenizer, _generation_config(config)))

    async def run_single(self, data: DataProto) -> dict:
        data = data[-1:]
        item = data[0]
        responses = item.batch["responses"]
        length = int(item.batch["attention_mask"][-responses.shape[-1]:].sum())
        truncated = is_truncated(responses[:length].tolist(), self.max_response_length,
                                 self.stop_ids)
        # a fresh dict: verl repeats one extra_info object for every answer of a question
        info = dict(item.non_tensor_batch.get("extra_info") or {}, truncated=truncated)
        data.non_tensor_batch["extra_info"] = np.array([info], dtype=object)
        return await super().run_single(data)
