"""`nftune compare`: algorithms × seeds (and ablation sweeps) through the same trainer, then
a Table-1-style table, curves with mean ± std bands and a JSON of every number.

Runs live in ``<output>/runs/<name>-seed<s>/``; a run with ``final/`` is skipped, a run with
checkpoints is resumed, so an interrupted comparison picks up where it stopped.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nftune.config import TrainConfig, build_config, engine_class

CURVES = [("eval", "held-out accuracy"), ("reward_mean", "training reward"),
          ("entropy", "policy entropy per token"), ("response_length", "response length")]


def plan_runs(algos: list[str], seeds: list[int], sweep: tuple[str, list[str]] | None
              ) -> list[dict[str, Any]]:
    """One entry per run: its name, algorithm, seed and extra config overrides."""
    runs = []
    for algo in algos:
        values: list[str | None] = sweep[1] if sweep else [None]
        for value in values:
            overrides = {sweep[0]: value} if sweep and value is not None else {}
            label = algo + (f" {sweep[0]}={value}" if overrides else "")
            for seed in seeds:
                runs.append({"label": label, "algo": algo, "seed": seed,
                             "overrides": overrides,
                             "dir": label.replace(" ", "-").replace("=", "") + f"-seed{seed}"})
    return runs


def check_algos(algos: list[str]) -> None:
    """Every name a registered objective (ValueError naming the unknown ones)."""
    from nftune.objectives import OBJECTIVES

    unknown = [a for a in algos if a not in OBJECTIVES]
    if unknown:
        raise ValueError(f"--algos: unknown {unknown}; valid: {sorted(OBJECTIVES)}")


def run_comparison(base: dict[str, Any], algos: list[str], seeds: list[int], output_dir: str,
                   sweep: tuple[str, list[str]] | None = None, progress: bool = True
                   ) -> dict[str, Any]:
    """Train every planned run (skipping finished ones), then write the report."""
    from nftune.train import train

    check_algos(algos)
    if not base.get("eval_data") or not int(base.get("eval_every") or 0):
        raise ValueError("compare needs held-out evaluation: set eval_data and eval_every")
    out = Path(output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = plan_runs(algos, seeds, sweep)
    # validate every run's configuration before spending any compute
    configs = [build_config(None, {**base, "algo": r["algo"], "seed": r["seed"],
                                   "output_dir": str(out / "runs" / r["dir"]),
                                   **r["overrides"]}) for r in runs]
    (out / "plan.json").write_text(json.dumps({"base": base, "runs": runs}, indent=2))
    for run, cfg in zip(runs, configs, strict=True):
        run_dir = Path(cfg.output_dir)
        if (run_dir / "final" / "model.safetensors").exists():
            print(f"skip {run['dir']}: finished")
            continue
        print(f"run {run['dir']}")
        # continue from a checkpoint if the run left one, else start it over
        resume = (run_dir / "checkpoints").exists()
        train(cfg, resume=resume, overwrite=not resume, progress=progress)
    return build_report(out)


def _eval_key(rows: list[dict[str, Any]]) -> str | None:
    return next((k for r in rows for k in r if k.startswith("eval/") and "/avg@" in k), None)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]  # drop NaN (e.g. a step that kept nothing)
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def build_report(output_dir: str | Path, base_accuracy: float | None = None) -> dict[str, Any]:
    """Tables, plots and JSON from the finished runs in ``output_dir`` (``--report``)."""
    out = Path(output_dir)
    plan_file = out / "plan.json"
    if not plan_file.exists():
        raise FileNotFoundError(f"{plan_file}: not a comparison directory")
    plan = json.loads(plan_file.read_text())
    base_file = out / "base_eval.json"
    if base_accuracy is None and base_file.exists():
        base_accuracy = json.loads(base_file.read_text())["accuracy"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in plan["runs"]:
        metrics_file = out / "runs" / run["dir"] / "metrics.jsonl"
        finished = (out / "runs" / run["dir"] / "final").exists()
        if not finished or not metrics_file.exists():
            continue
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
        key = _eval_key(rows)
        final = next((r[key] for r in reversed(rows) if key and key in r), float("nan"))
        groups.setdefault(run["label"], []).append(
            {"seed": run["seed"], "final_accuracy": final, "eval_key": key, "metrics": rows})
    summary = {}
    for label, members in groups.items():
        acc = [m["final_accuracy"] for m in members]
        late = [_mean_std([r["reward_mean"] for r in m["metrics"][-10:]])[0] for m in members]
        ent = []
        for m in members:
            finite = [r["entropy"] for r in m["metrics"] if r.get("entropy") == r.get("entropy")
                      and "entropy" in r]
            ent.append(finite[-1] - finite[0] if finite else float("nan"))
        summary[label] = {"seeds": [m["seed"] for m in members], "accuracy": acc,
                          "accuracy_mean_std": _mean_std(acc),
                          "late_reward_mean_std": _mean_std(late),
                          "entropy_change_mean_std": _mean_std(ent)}
    result = {"base_accuracy": base_accuracy, "summary": summary,
              "runs": {label: members for label, members in groups.items()}}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(_table(summary, base_accuracy, groups))
    _plot(groups, out / "curves.png")
    return result


def _table(summary: dict[str, Any], base: float | None, groups) -> str:
    key = next((m["eval_key"] for ms in groups.values() for m in ms if m["eval_key"]), "eval")
    lines = [f"| algorithm | held-out {key.split('/')[-1] if key else ''} (mean ± std) | "
             "per seed | training reward, last 10 steps | entropy change |",
             "|---|---|---|---|---|"]
    if base is not None:
        lines.append(f"| base model | {100 * base:.1f} | | | |")
    for label, s in summary.items():
        m, sd = s["accuracy_mean_std"]
        rm, rsd = s["late_reward_mean_std"]
        em, esd = s["entropy_change_mean_std"]
        per_seed = ", ".join(f"{100 * a:.1f}" for a in s["accuracy"])
        lines.append(f"| {label} | {100 * m:.1f} ± {100 * sd:.1f} | {per_seed} | "
                     f"{100 * rm:.1f} ± {100 * rsd:.1f} | {em:+.3f} ± {esd:.3f} |")
    return "\n".join(lines) + "\n\n![curves](curves.png)\n"


def _plot(groups: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for label, members in groups.items():
            series = []
            for m in members:
                k = m["eval_key"] if key == "eval" else key
                pts = {r["step"]: r[k] for r in m["metrics"] if k and k in r}
                series.append(pts)
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not steps:
                continue
            values = np.array([[s[t] for t in steps] for s in series], dtype=float)
            mean, std = values.mean(0), values.std(0)
            ax.plot(steps, mean, label=label)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_base_config(quick: bool, cache_dir: str | None, output_dir: Path) -> tuple[
        dict[str, Any], Path]:
    """The demo's task, base model and settings as a comparison's shared configuration:
    evaluated on the demo's whole test split, a checkpoint every 10 steps."""
    from nftune.demo import QUICK, DemoSettings, default_cache_dir, write_splits
    from nftune.tasks.base_model import cached_base_model

    settings = QUICK if quick else DemoSettings()
    base_dir, _ = cached_base_model(cache_dir or default_cache_dir(), settings.base)
    write_splits(output_dir, settings)
    base = {**settings.train_config(base_dir, output_dir), "save_every": 10,
            "keep_checkpoints": 1, "eval_data": str(output_dir / "test.jsonl"),
            "eval_k": settings.eval_k}
    return base, base_dir


def evaluate_base(cfg_dict: dict[str, Any], output_dir: Path) -> float:
    """Held-out accuracy of the shared base model, evaluated as the trainer evaluates its runs
    (mean of the sets' avg@k)."""
    import torch

    from nftune.evaluate import evaluate_sets, load_eval_sets
    from nftune.policy import load_policy, pick_device
    from nftune.verify import Verifier

    output_dir.mkdir(parents=True, exist_ok=True)
    cached = output_dir / "base_eval.json"
    if cached.exists():
        return json.loads(cached.read_text())["accuracy"]
    cfg: TrainConfig = build_config(None, cfg_dict)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy(cfg.model, pick_device(cfg.device))
    with Verifier(cfg.verify_workers) as verifier:
        engine = engine_class(cfg.rollout_engine).from_config(model, tokenizer, cfg)
        metrics = evaluate_sets(engine, tokenizer, load_eval_sets(cfg), verifier, cfg)
    accs = [v for k, v in metrics.items() if "/avg@" in k]
    accuracy = sum(accs) / len(accs)
    cached.write_text(json.dumps({"accuracy": accuracy, "config": asdict(cfg)}))
    return accuracy
