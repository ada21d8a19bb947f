"""`nftune demo`: a tiny model taught arithmetic, then improved online with NFT, on CPU.

Stages: build (or load the cached) base model → write the task's train/test splits → evaluate
the base → train with the real trainer → evaluate the result → report.md, plots, metrics.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from nftune.config import build_config
from nftune.evaluate import EvalResult, evaluate_questions
from nftune.policy import load_policy
from nftune.reward import Reward
from nftune.tasks.base_model import TASKS, TEMPLATE, BaseSpec, cached_base_model, task_module
from nftune.train import train
from nftune.verify import Verifier


@dataclass(frozen=True)
class DemoSettings:
    """Chosen once for all algorithms; not tuned per algorithm (docs/demo.md says how)."""

    base: BaseSpec = BaseSpec()
    train_questions: int = 4000
    test_questions: int = 500
    eval_k: int = 8  # sampled answers per test question (temperature 1)
    eval_seed: int = 1234  # before and after are sampled with the same seed, for every run
    curve_questions: int = 200  # the held-out curve during training: first N test questions
    curve_k: int = 2
    steps: int = 80
    prompts_per_step: int = 64
    answers_per_prompt: int = 8
    max_new_tokens: int = 48
    lr: float = 1.5e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 5
    minibatches: int = 2
    eval_every: int = 20


    def train_config(self, base_dir: Path, out: Path) -> dict[str, Any]:
        """The trainer's config for these settings (the task's splits written to ``out``
        by :func:`write_splits`)."""
        return dict(
            model=str(base_dir), train_data=str(out / "train.jsonl"), template=TEMPLATE,
            device="cpu", steps=self.steps, prompts_per_step=self.prompts_per_step,
            answers_per_prompt=self.answers_per_prompt, max_new_tokens=self.max_new_tokens,
            lr=self.lr, lr_schedule=self.lr_schedule, warmup_steps=self.warmup_steps,
            minibatches=self.minibatches,
            gen_batch_size=256, eval_every=self.eval_every, eval_temperature=1.0,
            reward=TASKS[self.base.task])  # gradient checkpointing: auto, off for this model


QUICK = DemoSettings(
    base=BaseSpec(level=1, hidden=48, layers=2, sft_steps=200, train_problems=600, noise=0.2),
    train_questions=500, test_questions=48, eval_k=2, curve_questions=48, steps=4,
    prompts_per_step=16, answers_per_prompt=4, max_new_tokens=24, warmup_steps=1, eval_every=2)
# Countdown (`--task countdown`): a shorter warm-up leaves its base (shipped: countdown_base/)
# at ~22% sampled accuracy, room to learn; answers are a few lines longer than arithmetic's
COUNTDOWN = DemoSettings(
    base=BaseSpec(task="countdown", level=2, sft_steps=800, train_problems=4000, noise=0.3),
    train_questions=2000, test_questions=300, steps=60, max_new_tokens=40)
SETTINGS = {("arithmetic", False): DemoSettings(), ("arithmetic", True): QUICK,
            ("countdown", False): COUNTDOWN,
            ("countdown", True): replace(QUICK, base=replace(QUICK.base, task="countdown"),
                                         max_new_tokens=40)}


def default_cache_dir() -> Path:
    root = os.environ.get("NFTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "nftune")
    return Path(root) / "demo-base"


def write_splits(out: Path, settings: DemoSettings) -> tuple[list, list]:
    """The task's train and test splits as train.jsonl, test.jsonl and curve.jsonl (the first
    ``curve_questions`` of test) in ``out``; returns (train, test) questions."""
    level, task = settings.base.level, task_module(settings.base.task)
    train_qs = task.make_questions(settings.train_questions, "train", 0, level)
    test_qs = task.make_questions(settings.test_questions, "test", 0, level)
    out.mkdir(parents=True, exist_ok=True)
    for name, questions in (("train", train_qs), ("test", test_qs),
                            ("curve", test_qs[: settings.curve_questions])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(asdict(q)) + "\n"
                                                  for q in questions))
    return train_qs, test_qs


def _evaluate_both(model, tokenizer, questions, settings: DemoSettings, verifier: Reward
                   ) -> dict[str, EvalResult]:
    """Sampled (avg@eval_k, temperature 1) and greedy accuracy, sampled with a fixed seed."""
    common = dict(max_new_tokens=settings.max_new_tokens, template=TEMPLATE, verifier=verifier,
                  batch_size=256)
    torch.manual_seed(settings.eval_seed)
    return {"sampled": evaluate_questions(model, tokenizer, questions, k=settings.eval_k,
                                          temperature=1.0, **common),
            "greedy": evaluate_questions(model, tokenizer, questions, k=1, temperature=0.0,
                                         **common)}


def paired_gain(before: EvalResult, after: EvalResult) -> tuple[float, float]:
    """(gain, its standard error) from the per-question differences of accuracy: the same
    questions before and after, so question difficulty cancels out."""
    diffs = [sum(a["correct"]) / len(a["correct"]) - sum(b["correct"]) / len(b["correct"])
             for b, a in zip(before.items, after.items, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(1, n - 1)
    return mean, (var / n) ** 0.5


def plot_run(metrics: list[dict[str, Any]], out: Path, title: str) -> Path:
    """Reward, held-out accuracy, entropy and response length per step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    eval_key = next((k for m in metrics for k in m if k.startswith("eval/")
                     and "avg@" in k), None)
    panels = [("reward_mean", "training reward (all answers)"),
              (eval_key, f"held-out accuracy ({eval_key.split('/')[-1] if eval_key else '-'})"),
              ("entropy", "policy entropy per token"), ("response_length", "response length")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        xs = [s for s, m in zip(steps, metrics, strict=True) if key and key in m]
        ys = [m[key] for m in metrics if key and key in m]
        ax.plot(xs, ys, marker="o" if len(xs) < 12 else None)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(algo: str = "nft", steps: int | None = None, quick: bool = False, seed: int = 0,
             output_dir: str = "runs/demo", cache_dir: str | None = None, rebuild: bool = False,
             level: int | None = None, progress: bool = True, base_seed: int | None = None,
             overrides: dict[str, Any] | None = None, task: str = "arithmetic"
             ) -> dict[str, Any]:
    """Run the whole demo; returns the numbers of the report. ``task``: arithmetic (graded by
    the math verifier) or countdown (by its own checker, a reward function); ``base_seed``
    builds (or takes from the cache) another base than the shipped one; ``overrides`` replaces
    settings fields (for choosing settings, see benchmarks/demo_bases.py)."""
    from tqdm.auto import tqdm

    if task not in TASKS:
        raise ValueError(f"task: unknown {task!r}; valid: {sorted(TASKS)}")
    settings = SETTINGS[task, quick]
    base_changes = {k: v for k, v in (("level", level), ("seed", base_seed)) if v is not None}
    changes = {**(overrides or {}), **({"steps": steps} if steps is not None else {})}
    settings = replace(settings, **changes)
    settings = replace(settings, base=replace(settings.base, **base_changes))
    torch.manual_seed(seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    bars = []  # a bar only if a base is built (the shipped one loads in no time)

    def sft_progress(step: int, total: int, loss: float) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="base model: supervised warm-up",
                             disable=not progress, dynamic_ncols=True))
        bars[0].update(1)
        bars[0].set_postfix(loss=f"{loss:.3f}")

    base_dir, origin = cached_base_model(cache_dir or default_cache_dir(), settings.base,
                                         rebuild=rebuild, progress=sft_progress)
    for bar in bars:
        bar.close()
    base_seconds = time.perf_counter() - started
    print(f"base model: {base_dir} ({origin}, {base_seconds:.0f} s)")

    level_ = settings.base.level
    _, test_qs = write_splits(out, settings)

    verifier = Verifier(workers=min(2, os.cpu_count() or 1), strategy="auto")
    reward = Reward(verifier, TASKS[task], workers=verifier.workers)
    try:
        model, tokenizer = load_policy(str(base_dir), torch.device("cpu"))
        before = _evaluate_both(model, tokenizer, test_qs, settings, reward)
        del model
        print(f"base: held-out accuracy {before['sampled'].avg_at_k:.1%} sampled "
              f"(avg@{settings.eval_k}), {before['greedy'].avg_at_k:.1%} greedy")

        cfg = build_config(None, {
            **settings.train_config(base_dir, out), "algo": algo, "seed": seed,
            "output_dir": str(out / "run"), "save_every": 0,
            "eval_data": str(out / "curve.jsonl"), "eval_k": settings.curve_k,
            "verify_workers": verifier.workers})
        run_dir = out / "run"
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        train_started = time.perf_counter()
        final_dir = train(cfg, progress=progress)
        train_seconds = time.perf_counter() - train_started

        model, tokenizer = load_policy(str(final_dir), torch.device("cpu"))
        after = _evaluate_both(model, tokenizer, test_qs, settings, reward)
    finally:
        reward.close()
        verifier.close()

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plot = plot_run(metrics, out, f"nftune demo: {algo} on {task} level {level_}")
    (out / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    summary = {
        "algo": algo, "seed": seed, "quick": quick, "task": task, "level": level_,
        "base_seed": settings.base.seed, "base_origin": origin,
        "base_built": origin == "built", "base_seconds": round(base_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "before": {k: v.avg_at_k for k, v in before.items()},
        "after": {k: v.avg_at_k for k, v in after.items()},
        "eval_k": settings.eval_k, "test_questions": len(test_qs), "steps": settings.steps,
        "settings": asdict(settings),
    }
    paired = {k: paired_gain(before[k], after[k]) for k in before}
    summary["gain"] = {k: g for k, (g, _) in paired.items()}
    summary["gain_se"] = {k: se for k, (_, se) in paired.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(out / "report.md", summary, plot.name)
    gain, se = summary["gain"], summary["gain_se"]
    print(f"{algo}: held-out accuracy {before['sampled'].avg_at_k:.1%} → "
          f"{after['sampled'].avg_at_k:.1%} sampled (avg@{settings.eval_k}; gain "
          f"{100 * gain['sampled']:+.1f} ± {100 * se['sampled']:.1f} points), "
          f"{before['greedy'].avg_at_k:.1%} → {after['greedy'].avg_at_k:.1%} greedy "
          f"({100 * gain['greedy']:+.1f} ± {100 * se['greedy']:.1f}); "
          f"{summary['total_seconds']:.0f} s in all")
    print(f"report: {out / 'report.md'}")
    return summary


def write_report(path: Path, s: dict[str, Any], plot_name: str) -> None:
    rows = "\n".join(
        f"| {name} | {s['before'][name]:.1%} | {s['after'][name]:.1%} | "
        f"{s['gain'][name] * 100:+.1f} ± {s['gain_se'][name] * 100:.1f} |"
        for name in ("sampled", "greedy"))
    path.write_text(f"""# nftune demo report

Algorithm **{s['algo']}**, seed {s['seed']}, {s.get('task', 'arithmetic')} level {s['level']},
{s['steps']} rollout steps{' (quick mode)' if s['quick'] else ''}.

Held-out test split: {s['test_questions']} questions never seen in training.
"sampled" is the mean accuracy of {s['eval_k']} answers per question at temperature 1
(avg@{s['eval_k']}); "greedy" is one answer at temperature 0. The gain's ± is the standard
error of the mean per-question difference (the same questions before and after).

| accuracy | base | after {s['algo']} | gain (points ± s.e.) |
|---|---|---|---|
{rows}

Time: base model {s['base_seconds']:.0f} s ({s['base_origin']}),
training {s['train_seconds']:.0f} s, {s['total_seconds']:.0f} s in all.

![curves]({plot_name})
""")
