"""Evaluation: sample k answers per question, grade them, report avg@k and pass@k."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from nftune.data import Question, format_prompt
from nftune.rollout import generate_rollout
from nftune.verify import Verifier


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n − c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"k: pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class EvalResult:
    name: str
    k: int
    avg_at_k: float  # mean accuracy over all k samples of all questions
    pass_at_k: float
    questions: int
    items: list[dict[str, Any]] = field(default_factory=list)
    generate_s: float = 0.0
    verify_s: float = 0.0
    response_tokens: int = 0


def evaluate_questions(model, tokenizer, questions: list[Question], *, name: str = "eval",
                       k: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                       max_new_tokens: int = 256, template: str = "dapo",
                       batch_size: int = 64, verifier: Verifier) -> EvalResult:
    """Generate ``k`` answers per question (greedy when temperature is 0) and grade them."""
    if temperature <= 0:
        k = 1
    was_training = model.training
    model.eval()
    prompts = [format_prompt(q.problem, template, tokenizer) for q in questions]
    start = time.perf_counter()
    rollout = generate_rollout(model, tokenizer, prompts, k, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, top_k=0,
                               batch_size=batch_size, logprobs_from=None)
    generate_s = time.perf_counter() - start
    golds = [q.answer for q in questions for _ in range(k)]
    start = time.perf_counter()
    verdicts = verifier.verify(rollout.texts, golds)
    verify_s = time.perf_counter() - start
    correct = torch.tensor(verdicts, dtype=torch.float32) * (~rollout.truncated.cpu()).float()
    per_question = correct.view(len(questions), k)
    items = []
    for i, q in enumerate(questions):
        rows = range(i * k, (i + 1) * k)
        items.append({"id": q.id, "answer": q.answer,
                      "responses": [rollout.texts[j] for j in rows],
                      "correct": [bool(correct[j]) for j in rows]})
    if was_training:
        model.train()
    n_correct = per_question.sum(1).long().tolist()
    return EvalResult(
        name=name, k=k, avg_at_k=per_question.mean().item(),
        pass_at_k=sum(pass_at_k(k, c, k) for c in n_correct) / len(questions),
        questions=len(questions), items=items, generate_s=generate_s, verify_s=verify_s,
        response_tokens=int(rollout.response_mask.sum().item()))
