"""`nftune demo`: a tiny model taught arithmetic, then improved online with NFT, on CPU.

Stages: build (or load the cached) base model → write the task's train/test splits → evaluate
the base → train with the real trainer → evaluate the result → report.md, plots, metrics.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nftune.config import build_config
from nftune.evaluate import EvalResult, evaluate_questions
from nftune.tasks.arithmetic import make_questions
from nftune.tasks.base_model import TEMPLATE, BaseSpec, cached_base_model
from nftune.train import load_policy, train
from nftune.verify import Verifier


@dataclass(frozen=True)
class DemoSettings:
    """Chosen once for all algorithms; not tuned per algorithm."""

    base: BaseSpec = BaseSpec()
    train_questions: int = 4000
    test_questions: int = 200
    eval_k: int = 4  # sampled answers per test question (temperature 1)
    steps: int = 80
    prompts_per_step: int = 64
    answers_per_prompt: int = 8
    max_new_tokens: int = 48
    lr: float = 3e-4
    warmup_steps: int = 5
    minibatches: int = 2
    eval_every: int = 20


QUICK = DemoSettings(
    base=BaseSpec(level=1, hidden=48, layers=2, sft_steps=200, train_problems=600, noise=0.2),
    train_questions=500, test_questions=48, eval_k=2, steps=4, prompts_per_step=16,
    answers_per_prompt=4, max_new_tokens=24, warmup_steps=1, eval_every=2)


def default_cache_dir() -> Path:
    root = os.environ.get("NFTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "nftune")
    return Path(root) / "demo-base"


def _write_split(path: Path, questions) -> None:
    path.write_text("".join(json.dumps(asdict(q)) + "\n" for q in questions))


def _evaluate_both(model, tokenizer, questions, settings: DemoSettings, verifier: Verifier
                   ) -> dict[str, EvalResult]:
    common = dict(max_new_tokens=settings.max_new_tokens, template=TEMPLATE, verifier=verifier,
                  batch_size=256)
    return {"sampled": evaluate_questions(model, tokenizer, questions, k=settings.eval_k,
                                          temperature=1.0, **common),
            "greedy": evaluate_questions(model, tokenizer, questions, k=1, temperature=0.0,
                                         **common)}


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
             level: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the whole demo; returns the numbers of the report."""
    from tqdm.auto import tqdm

    settings = QUICK if quick else DemoSettings()
    if level is not None:
        settings = DemoSettings(**{**asdict(settings), "base": BaseSpec(
            **{**asdict(settings.base), "level": level})})
    if steps is not None:
        settings = DemoSettings(**{**asdict(settings), "steps": steps,
                                   "base": settings.base})
    torch.manual_seed(seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    bar = tqdm(total=settings.base.sft_steps, desc="base model: supervised warm-up",
               disable=not progress, dynamic_ncols=True)

    def sft_progress(step: int, total: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    base_dir, built = cached_base_model(cache_dir or default_cache_dir(), settings.base,
                                        rebuild=rebuild, progress=sft_progress)
    bar.close()
    base_seconds = time.perf_counter() - started
    print(f"base model: {base_dir} ({'built' if built else 'cached'}, {base_seconds:.0f} s)")

    level_ = settings.base.level
    train_qs = make_questions(settings.train_questions, "train", 0, level_)
    test_qs = make_questions(settings.test_questions, "test", 0, level_)
    _write_split(out / "train.jsonl", train_qs)
    _write_split(out / "test.jsonl", test_qs)

    verifier = Verifier(workers=min(2, os.cpu_count() or 1), strategy="auto")
    try:
        model, tokenizer = load_policy(str(base_dir), torch.device("cpu"))
        torch.manual_seed(seed)
        before = _evaluate_both(model, tokenizer, test_qs, settings, verifier)
        del model
        print(f"base: held-out accuracy {before['sampled'].avg_at_k:.1%} sampled "
              f"(avg@{settings.eval_k}), {before['greedy'].avg_at_k:.1%} greedy")

        cfg = build_config(None, dict(
            model=str(base_dir), train_data=str(out / "train.jsonl"), template=TEMPLATE,
            algo=algo, output_dir=str(out / "run"), seed=seed, device="cpu",
            steps=settings.steps, prompts_per_step=settings.prompts_per_step,
            answers_per_prompt=settings.answers_per_prompt,
            max_new_tokens=settings.max_new_tokens, lr=settings.lr,
            warmup_steps=settings.warmup_steps,
            minibatches=settings.minibatches, gen_batch_size=256, save_every=0,
            eval_every=settings.eval_every, eval_data=str(out / "test.jsonl"),
            eval_k=settings.eval_k, eval_temperature=1.0, verify_workers=verifier.workers))
        run_dir = out / "run"
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        train_started = time.perf_counter()
        final_dir = train(cfg, progress=progress)
        train_seconds = time.perf_counter() - train_started

        model, tokenizer = load_policy(str(final_dir), torch.device("cpu"))
        torch.manual_seed(seed + 1)
        after = _evaluate_both(model, tokenizer, test_qs, settings, verifier)
    finally:
        verifier.close()

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plot = plot_run(metrics, out, f"nftune demo: {algo} on arithmetic level {level_}")
    (out / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    summary = {
        "algo": algo, "seed": seed, "quick": quick, "level": level_,
        "base_built": built, "base_seconds": round(base_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "before": {k: v.avg_at_k for k, v in before.items()},
        "after": {k: v.avg_at_k for k, v in after.items()},
        "eval_k": settings.eval_k, "test_questions": len(test_qs), "steps": settings.steps,
        "settings": asdict(settings),
    }
    summary["gain"] = {k: summary["after"][k] - summary["before"][k] for k in before}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(out / "report.md", summary, plot.name)
    print(f"{algo}: held-out accuracy {before['sampled'].avg_at_k:.1%} → "
          f"{after['sampled'].avg_at_k:.1%} sampled (avg@{settings.eval_k}), "
          f"{before['greedy'].avg_at_k:.1%} → {after['greedy'].avg_at_k:.1%} greedy; "
          f"{summary['total_seconds']:.0f} s in all")
    print(f"report: {out / 'report.md'}")
    return summary


def write_report(path: Path, s: dict[str, Any], plot_name: str) -> None:
    rows = "\n".join(
        f"| {name} | {s['before'][name]:.1%} | {s['after'][name]:.1%} | "
        f"{s['gain'][name] * 100:+.1f} |" for name in ("sampled", "greedy"))
    path.write_text(f"""# nftune demo report

Algorithm **{s['algo']}**, seed {s['seed']}, arithmetic level {s['level']},
{s['steps']} rollout steps{' (quick mode)' if s['quick'] else ''}.

Held-out test split: {s['test_questions']} questions never seen in training.
"sampled" is the mean accuracy of {s['eval_k']} answers per question at temperature 1
(avg@{s['eval_k']}); "greedy" is one answer at temperature 0.

| accuracy | base | after {s['algo']} | gain (points) |
|---|---|---|---|
{rows}

Time: base model {s['base_seconds']:.0f} s ({'built' if s['base_built'] else 'cached'}),
training {s['train_seconds']:.0f} s, {s['total_seconds']:.0f} s in all.

![curves]({plot_name})
""")
