"""Rollout: prompts → K sampled answers each, as token tensors with per-token log-probs.

One :class:`Rollout` carries a batch of B = questions × K answers between the stages; no later
stage re-tokenises text. Prompts are left-padded to a common width P, so every response starts
at column P; responses are right-padded to width R and end at EOS or at ``max_new_tokens``
(truncated, and then counted as wrong by the trainer).

Answers come from a generation engine (:class:`GenerationEngine`); Hugging Face ``generate``
(:class:`HFEngine`) is the one registered in ``ENGINES`` today.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch
from transformers import LogitsProcessor, LogitsProcessorList

Tensor = torch.Tensor


@dataclass
class Rollout:
    input_ids: Tensor  # (B, P + R) prompt (left-padded) then response (right-padded)
    attention_mask: Tensor  # (B, P + R)
    prompt_len: int  # P: every response starts at this column
    response_mask: Tensor  # (B, R) 1 on response tokens, EOS included
    truncated: Tensor  # (B,) bool: no EOS within max_new_tokens
    group_ids: Tensor  # (B,) index of the answer's question in this rollout
    texts: list[str]  # decoded responses
    old_logprobs: Tensor | None = None  # (B, R) log π_old of each response token
    entropy: Tensor | None = None  # (B, R) entropy of π_old at each response position
    correct: Tensor | None = None  # (B,) verifier outcome, float 0/1
    r_hat: Tensor | None = None  # (B,) accuracy of the answer's group
    penalty: Tensor | None = None  # (B,) reward shaping added to r (DAPO's overlong penalty)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(1)

    def select(self, rows: Tensor | list[int]) -> Rollout:
        """The answers at ``rows`` (a view of every per-answer field)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value[idx.to(value.device)]
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in idx.tolist()]
            else:
                out[f.name] = value
        return Rollout(**out)

    def trimmed(self) -> Rollout:
        """Drop prompt columns that are padding in every row and response columns past the
        longest response: a micro-batch then costs only its own longest sequence."""
        lead = int((self.attention_mask[:, : self.prompt_len].sum(0) == 0).sum().item())
        width = int(self.response_lengths.max().item()) if len(self) else 0
        width = max(width, 1)
        end = self.prompt_len + width
        per_token = ("response_mask", "old_logprobs", "entropy")
        changes = {name: getattr(self, name)[:, :width] for name in per_token
                   if getattr(self, name) is not None}
        return replace(self, input_ids=self.input_ids[:, lead:end],
                       attention_mask=self.attention_mask[:, lead:end],
                       prompt_len=self.prompt_len - lead, **changes)


class LogprobRecorder(LogitsProcessor):
    """Records log π(a_t) and the entropy of π at every generated position, from the logits
    ``generate`` computes anyway, holding one step's log-softmax (B, V) at a time.

    Custom processors run before the sampling warpers (temperature, top-k, top-p), so the
    scores seen here are the model's own logits; they are divided by ``temperature`` here, so
    the log-probs are those of the distribution sampled from (before any top-k / top-p cut) —
    the quantity a no-grad forward over the finished rollout recomputes. The token sampled
    at step t is only known at step t + 1 (as the last column of ``input_ids``); the last
    one is read in :meth:`finish`.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        self.scale = 1.0 / temperature
        self.previous: Tensor | None = None
        self.logprobs: list[Tensor] = []
        self.entropy: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        logp = torch.log_softmax(scores.float() * self.scale, dim=-1)
        self.entropy.append(-(logp.exp() * logp).sum(-1))
        self.previous = logp
        return scores

    def finish(self, sequences: Tensor) -> tuple[Tensor, Tensor]:
        """(log-probs, entropy), each (B, R) for the R generated columns of ``sequences``."""
        if self.previous is None:
            empty = sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)
            return empty, empty
        self.logprobs.append(self.previous.gather(-1, sequences[:, -1:]).squeeze(-1))
        self.previous = None
        return torch.stack(self.logprobs, 1), torch.stack(self.entropy, 1)


@torch.no_grad()
def generate_rollout(model, tokenizer, prompts: list[str], k: int, *, max_new_tokens: int,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     batch_size: int = 64, record_logprobs: bool = False) -> Rollout:
    """Sample ``k`` answers for each prompt with Hugging Face ``generate``.

    Args:
        prompts: formatted prompts; answer ``i * k + j`` is the j-th answer to prompt i.
        temperature, top_p, top_k: sampling (``top_k=0`` disables the top-k filter that
            ``generate`` otherwise applies); temperature 0 means greedy.
        batch_size: answers per ``generate`` call.
        record_logprobs: record π_old's per-token log-probs and entropy from the logits of the
            sampling steps (:class:`LogprobRecorder`), saving a forward over the rollout; the
            same quantity as :func:`nftune.update.recompute_logprobs` up to float rounding, at
            any temperature: log-probs of π at ``temperature`` (logits / temperature) over the
            full vocabulary (top-k / top-p only restrict which tokens are drawn; as in verl and
            TRL).

    Sampling uses the given temperature, top-p and top-k only: a repetition penalty or n-gram
    ban in the model's ``generation_config`` is switched off, since it would sample from a
    policy other than the π the objectives take the log-probs of.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    rows = [encoded[i] for i in range(len(prompts)) for _ in range(k)]
    width_p = max(len(r) for r in rows)
    chunks, chunk_logprobs = [], []
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    if temperature <= 0:
        sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    sampling.update(repetition_penalty=1.0, no_repeat_ngram_size=0)
    for start in range(0, len(rows), batch_size):
        part = rows[start: start + batch_size]
        p = max(len(r) for r in part)
        ids = torch.tensor([[pad_id] * (p - len(r)) + r for r in part], device=device)
        attn = torch.tensor([[0] * (p - len(r)) + [1] * len(r) for r in part], device=device)
        recorder = LogprobRecorder(temperature) if record_logprobs else None
        sequences = model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
            eos_token_id=eos_id, pad_token_id=pad_id, return_dict_in_generate=True,
            logits_processor=LogitsProcessorList([recorder]) if recorder else None,
            **sampling).sequences
        chunks.append(sequences[:, p:])
        if recorder is not None:
            chunk_logprobs.append(torch.stack(recorder.finish(sequences[:, p:])))
    width_r = max(c.shape[1] for c in chunks)
    response = torch.cat([torch.nn.functional.pad(c, (0, width_r - c.shape[1]), value=pad_id)
                          for c in chunks])
    is_eos = response == eos_id
    response_mask = ((is_eos.long().cumsum(1) - is_eos.long()) == 0).long()  # through first EOS
    truncated = ~is_eos.any(1)
    prompt_ids = torch.tensor([[pad_id] * (width_p - len(r)) + r for r in rows], device=device)
    prompt_attn = torch.tensor([[0] * (width_p - len(r)) + [1] * len(r) for r in rows],
                               device=device)
    response = torch.where(response_mask.bool(), response, pad_id)
    # one device-to-host copy, then plain lists (row-by-row indexing of device tensors costs a
    # transfer per answer); the mask is a prefix, so each answer is its first n tokens
    lengths = response_mask.sum(1).tolist()
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(response.tolist(), lengths,
                                                              strict=True)],
                                   skip_special_tokens=True)
    rollout = Rollout(
        input_ids=torch.cat([prompt_ids, response], 1),
        attention_mask=torch.cat([prompt_attn, response_mask], 1),
        prompt_len=width_p, response_mask=response_mask, truncated=truncated,
        group_ids=torch.arange(len(prompts), device=device).repeat_interleave(k), texts=texts)
    if record_logprobs:
        lp = torch.cat([torch.nn.functional.pad(c, (0, width_r - c.shape[2])) for c in
                        chunk_logprobs], dim=1)
        rollout.old_logprobs, rollout.entropy = lp[0] * response_mask, lp[1] * response_mask
    return rollout


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout from several (e.g. dynamic-sampling rounds): prompts re-padded on the left,
    responses on the right, group ids renumbered."""
    width_p = max(r.prompt_len for r in parts)
    width_r = max(r.response_mask.shape[1] for r in parts)
    pad = torch.nn.functional.pad

    def left(t: Tensor, n: int, value: int) -> Tensor:
        return pad(t, (n, 0), value=value)

    ids, attn, group_ids, offset = [], [], [], 0
    for r in parts:
        extra_p, extra_r = width_p - r.prompt_len, width_r - r.response_mask.shape[1]
        ids.append(pad(left(r.input_ids, extra_p, pad_id), (0, extra_r), value=pad_id))
        attn.append(pad(left(r.attention_mask, extra_p, 0), (0, extra_r), value=0))
        _, renumbered = torch.unique(r.group_ids, return_inverse=True)
        group_ids.append(renumbered + offset)
        offset += int(renumbered.max().item()) + 1 if len(r) else 0

    def cat(name: str, per_token: bool) -> Tensor | None:
        values = [getattr(r, name) for r in parts]
        if any(v is None for v in values):
            return None
        if per_token:
            values = [pad(v, (0, width_r - v.shape[1])) for v in values]
        return torch.cat(values)

    return Rollout(
        input_ids=torch.cat(ids), attention_mask=torch.cat(attn), prompt_len=width_p,
        response_mask=cat("response_mask", True), truncated=cat("truncated", False),
        group_ids=torch.cat(group_ids), texts=[t for r in parts for t in r.texts],
        old_logprobs=cat("old_logprobs", True), entropy=cat("entropy", True),
        correct=cat("correct", False), r_hat=cat("r_hat", False),
        penalty=cat("penalty", False))


# ---------------------------------------------------------------------------------------------
# Generation engines
# ---------------------------------------------------------------------------------------------


class GenerationEngine(Protocol):
    """What the loop and the evaluator need from a generation engine."""

    def generate(self, prompts: list[str], k: int, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 record_logprobs: bool = False) -> Rollout:
        """``k`` answers per prompt from the current policy, as one :class:`Rollout` (with
        π_old's per-token log-probs and entropy if ``record_logprobs``)."""
        ...

    def update_weights(self, model) -> None:
        """The policy was updated: sample from ``model``'s weights from now on."""
        ...


class HFEngine:
    """Hugging Face ``generate`` on the trained model itself (nothing to copy after an update)."""

    def __init__(self, model, tokenizer, batch_size: int = 64) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def generate(self, prompts: list[str], k: int, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 record_logprobs: bool = False) -> Rollout:
        was_training = self.model.training
        self.model.eval()
        try:
            return generate_rollout(self.model, self.tokenizer, prompts, k,
                                    max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, top_k=top_k, batch_size=self.batch_size,
                                    record_logprobs=record_logprobs)
        finally:
            self.model.train(was_training)

    def update_weights(self, model) -> None:
        self.model = model


# name → constructor(model, tokenizer, cfg); the config key ``engine`` picks one
ENGINES: dict[str, Callable[..., GenerationEngine]] = {
    "hf": lambda model, tokenizer, cfg: HFEngine(model, tokenizer, cfg.gen_batch_size),
}
