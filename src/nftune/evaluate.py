"""Evaluation: sample k answers per question, grade them, report avg@k and pass@k."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nftune.data import Question, format_prompt, strategy_for
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
    if was_training:
        model.train()
    cut = rollout.truncated.cpu().tolist()
    result = grade_items(name, questions,
                         [rollout.texts[i * k:(i + 1) * k] for i in range(len(questions))],
                         verifier, truncated=[cut[i * k:(i + 1) * k]
                                              for i in range(len(questions))],
                         strategy=strategy_for(template))
    result.generate_s = generate_s
    result.response_tokens = int(rollout.response_mask.sum().item())
    return result


# ---------------------------------------------------------------------------------------------
# The paper's benchmark protocol
# ---------------------------------------------------------------------------------------------

# Table 1 of the paper: AIME24, AIME25, AMC23 avg@32; MATH500, OlympiadBench, Minerva avg@1;
# integer-answer sets prompted like DAPO-Math-17k ("Answer:" line), the others with \boxed{}.
PAPER_BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "olympiadbench", "minerva")
COLUMN_NAMES = {"aime24": "AIME24", "aime25": "AIME25", "amc23": "AMC23",
                "math500": "MATH500", "olympiadbench": "Olympiad", "minerva": "Minerva"}
DEFAULT_K = {"aime24": 32, "aime25": 32, "amc23": 32}
DEFAULT_TEMPLATE = {"aime24": "dapo", "aime25": "dapo", "amc23": "dapo"}


def benchmark_k(name: str, k: int | None) -> int:
    return k if k is not None else DEFAULT_K.get(name, 1)


def benchmark_template(name: str, template: str | None) -> str:
    return template or DEFAULT_TEMPLATE.get(name, "boxed")


def grade_items(name: str, questions: list[Question], responses: list[list[str]],
                verifier: Verifier, truncated: list[list[bool]] | None = None,
                strategy: str = "auto") -> EvalResult:
    """Grade ``responses[i]`` (k answers) against question i; the same k for every question.
    Truncated answers are wrong."""
    from nftune.verify import extract_answer

    k = len(responses[0]) if responses else 0
    if any(len(r) != k for r in responses):
        raise ValueError(f"{name}: every question needs the same number of responses")
    flat = [r for rs in responses for r in rs]
    golds = [q.answer for q in questions for _ in range(k)]
    start = time.perf_counter()
    verdicts = verifier.verify(flat, golds, strategy)
    verify_s = time.perf_counter() - start
    if truncated is not None:
        cut = [t for ts in truncated for t in ts]
        verdicts = [v and not c for v, c in zip(verdicts, cut, strict=True)]
    items, n_correct = [], []
    for i, q in enumerate(questions):
        rows = range(i * k, (i + 1) * k)
        items.append({"id": q.id, "gold": q.answer, "responses": [flat[j] for j in rows],
                      "extracted": [extract_answer(flat[j], strategy) for j in rows],
                      "correct": [bool(verdicts[j]) for j in rows]})
        n_correct.append(sum(verdicts[j] for j in rows))
    total = max(1, len(questions) * k)
    return EvalResult(name=name, k=k, avg_at_k=sum(n_correct) / total,
                      pass_at_k=sum(pass_at_k(k, c, k) for c in n_correct) / max(1, len(questions)),
                      questions=len(questions), items=items, verify_s=verify_s)


def format_table(results: list[EvalResult], title: str = "model") -> str:
    """One Markdown row in the layout of the paper's Table 1, plus the average."""
    names = [COLUMN_NAMES.get(r.name, r.name) + (f" avg@{r.k}" if r.k > 1 else "")
             for r in results]
    cells = [f"{100 * r.avg_at_k:.1f}" for r in results]
    avg = 100 * sum(r.avg_at_k for r in results) / max(1, len(results))
    header = "| Model | " + " | ".join(names) + " | Avg |"
    rule = "|---" * (len(results) + 2) + "|"
    row = f"| {title} | " + " | ".join(cells) + f" | {avg:.1f} |"
    extra = [f"{COLUMN_NAMES.get(r.name, r.name)} pass@{r.k} {100 * r.pass_at_k:.1f}"
             for r in results if r.k > 1]
    return "\n".join([header, rule, row] + ([""] + ["; ".join(extra)] if extra else []))


def write_eval_outputs(results: list[EvalResult], output: Path, title: str,
                       settings: dict[str, Any]) -> tuple[Path, Path]:
    """JSON with every per-item result, and a Markdown page with the table."""
    output.parent.mkdir(parents=True, exist_ok=True)
    json_path = output.with_suffix(".json")
    md_path = output.with_suffix(".md")
    payload = {"model": title, "settings": settings,
               "summary": {r.name: {"k": r.k, "avg_at_k": r.avg_at_k, "pass_at_k": r.pass_at_k,
                                    "questions": r.questions} for r in results},
               "average": sum(r.avg_at_k for r in results) / max(1, len(results)),
               "items": {r.name: r.items for r in results}}
    json_path.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    lines = [f"# Evaluation of {title}", "", format_table(results, title), "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    for r in results:
        lines += [f"## {COLUMN_NAMES.get(r.name, r.name)}", "",
                  "| id | gold | extracted (first sample) | correct |", "|---|---|---|---|"]
        for item in r.items:
            first = item["extracted"][0] if item["extracted"] else None
            lines.append(f"| {item['id']} | `{item['gold']}` | `{first}` | "
                         f"{sum(item['correct'])}/{len(item['correct'])} |")
        lines.append("")
    md_path.write_text("\n".join(lines))
    return json_path, md_path
