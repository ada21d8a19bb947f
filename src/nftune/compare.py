"""`nftune compare`: algorithms × seeds (and ablation sweeps) through the same trainer, then
a Table-1-style report: final held-out accuracy (sampled and greedy) with 95% confidence
intervals, paired differences against the first algorithm per seed, accuracy by question
difficulty before and after, verdict sentences, and curves (held-out accuracy, reward, entropy,
the gradient share of wrong answers).

Runs live in ``<output>/runs/<name>-seed<s>/``; a run with ``final/`` is skipped, a run with
checkpoints is resumed, so an interrupted comparison picks up where it stopped (``--resume``).
``--resume`` with more ``--steps`` extends a finished comparison (constant learning rate only):
each run trains on from its last checkpoint, its shorter final evaluation kept beside.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

from nftune.config import TrainConfig, build_config, resume_safe_keys

CURVES = [("eval", "held-out accuracy (curve set)"), ("reward_mean", "training reward"),
          ("entropy", "policy entropy per token"),
          ("grad_share_wrong", "update weight on wrong answers"),
          ("response_length", "response length")]
EVAL_SEED = 1234  # every model (base and runs) is evaluated with the same sampling seed
BIN_SEED = 4321  # the base's second, independent evaluation that sorts questions by difficulty
# a question's difficulty: the base's accuracy on it (from BIN_SEED's samples)
BINS = (("hard", 0.0, 1 / 3), ("medium", 1 / 3, 2 / 3), ("easy", 2 / 3, 1.0))
CLOSE = 0.02  # "close to": within 2 points of accuracy
# two-sided 95% Student t quantiles, t(0.975, df) for df = 1..30
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% confidence interval of the mean by Student's t (NaN bounds
    for fewer than two values; NaN values dropped)."""
    values = [v for v in values if v == v]
    if not values:
        return math.nan, math.nan, math.nan
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    df = len(values) - 1
    t = T975[df - 1] if df <= len(T975) else 1.96
    half = t * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


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


def check_algos(algos: list[str], plugins: str = "") -> None:
    """Every name a registered objective once ``plugins`` (the config's comma-separated
    modules or files) are imported (ValueError naming the unknown ones)."""
    from nftune.objectives import OBJECTIVES
    from nftune.plugins import import_plugins

    import_plugins(str(plugins or ""))

    unknown = [a for a in algos if a not in OBJECTIVES]
    if unknown:
        raise ValueError(f"--algos: unknown {unknown}; valid: {sorted(OBJECTIVES)}")


def run_comparison(base: dict[str, Any], algos: list[str], seeds: list[int], output_dir: str,
                   sweep: tuple[str, list[str]] | None = None, progress: bool = True,
                   final_eval: dict[str, Any] | None = None, resume: bool = False
                   ) -> dict[str, Any]:
    """Evaluate the base, train every planned run (skipping finished ones) and evaluate its
    final model, then write the report. ``final_eval``: config fields for the final
    evaluation (e.g. a larger held-out set than the curve's); ``resume``: continue a directory
    that holds this comparison (its shared settings must be unchanged)."""
    from nftune.train import train

    check_algos(algos, base.get("plugins", ""))
    if not base.get("eval_data") or not int(base.get("eval_every") or 0):
        raise ValueError("compare needs held-out evaluation: set eval_data and eval_every")
    out = Path(output_dir)
    plan_file = out / "plan.json"
    final_eval = dict(final_eval or {})
    check_output_dir(out, resume)
    if plan_file.exists():
        held = json.loads(plan_file.read_text())
        changed = sorted(k for k in set(held["base"]) | set(base)
                         if str(held["base"].get(k)) != str(base.get(k)))
        changed += ["final_eval"] if held.get("final_eval", {}) != final_eval else []
        if changed == ["steps"]:
            check_extension(held["base"], base, out)
        elif changed:
            raise ValueError(f"{out}: --resume with other shared settings ({', '.join(changed)})"
                             "; runs would not be comparable: use another --output-dir")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = plan_runs(algos, seeds, sweep)
    # validate every run's configuration before spending any compute
    configs = [build_config(None, {**base, "algo": r["algo"], "seed": r["seed"],
                                   "output_dir": str(out / "runs" / r["dir"]),
                                   **r["overrides"]}) for r in runs]
    plan_file.write_text(json.dumps({"base": base, "final_eval": final_eval, "runs": runs},
                                    indent=2))
    base_eval = evaluate_base({**base, "algo": algos[0], **final_eval}, out)
    print(f"base model held-out accuracy: {100 * base_eval['sampled']['accuracy']:.1f} sampled, "
          f"{100 * base_eval['greedy']['accuracy']:.1f} greedy")
    for run, cfg in zip(runs, configs, strict=True):
        run_dir = Path(cfg.output_dir)
        trained = final_steps(run_dir)
        if trained == cfg.steps:
            print(f"skip {run['dir']}: finished")
        else:
            extend = trained is not None  # finished at fewer steps: train on to cfg.steps
            print(f"run {run['dir']}" + (f": from {trained} to {cfg.steps} steps" if extend
                                          else ""))
            if extend and (run_dir / "final_eval.json").exists():  # the shorter run's, kept
                (run_dir / "final_eval.json").replace(run_dir / f"final_eval.step{trained}.json")
            # continue from a checkpoint if the run left one, else start it over; the plan
            # check above leaves only ``steps`` free to differ from the checkpoint's config
            # (a run cut before its final/ under a shorter plan is extended too)
            resume_run = (run_dir / "checkpoints").exists()
            started = time.perf_counter()
            train(cfg, resume=resume_run, overwrite=not resume_run, progress=progress,
                  allow_changes=resume_run)
            _add_seconds(run_dir, "train_s", time.perf_counter() - started)
        evaluate_final(str(run_dir / "final"), build_config(None, {**cfg.to_dict(),
                                                                   **final_eval}),
                       run_dir / "final_eval.json")
    return build_report(out)


def check_extension(held: dict[str, Any], base: dict[str, Any], out: Path) -> None:
    """``--resume`` with more ``--steps`` extends a comparison: each run trains on from its
    last checkpoint. Only where the trainer lets a resumed run change ``steps``
    (:func:`nftune.config.resume_safe_keys`); raises ValueError otherwise."""
    before, after = int(held["steps"]), int(base["steps"])
    schedule = base.get("lr_schedule") or TrainConfig.lr_schedule
    if after < before:
        raise ValueError(f"{out}: --steps {after} is fewer than the comparison's {before}; "
                         "a comparison is extended, never shortened: use another --output-dir")
    if "steps" not in resume_safe_keys(schedule):
        raise ValueError(f"{out}: --steps {before} → {after} extends a comparison only with "
                         f"lr_schedule constant (this one is {schedule!r}: a longer schedule "
                         "changes every step's learning rate): use another --output-dir")


def final_steps(run_dir: Path) -> int | None:
    """How many steps the run's ``final/`` model was trained for (None: no final model)."""
    import yaml

    final = run_dir / "final"
    if not (final / "model.safetensors").exists():
        return None
    return int(yaml.safe_load((final / "nftune_config.yaml").read_text())["steps"])


def check_output_dir(out: Path, resume: bool) -> None:
    """A directory that holds a comparison is continued only with ``resume``."""
    if (out / "plan.json").exists() and not resume:
        raise ValueError(f"{out}: holds a comparison already; --resume continues it "
                         "(finished runs are kept), or choose another --output-dir")


def _add_seconds(run_dir: Path, key: str, seconds: float) -> None:
    """Wall time spent on a run, summed over the calls that worked on it (compute.json)."""
    path = run_dir / "compute.json"
    spent = json.loads(path.read_text()) if path.exists() else {}
    spent[key] = spent.get(key, 0.0) + seconds
    path.write_text(json.dumps(spent))


def evaluate_final(model_dir: str, cfg: TrainConfig, path: Path,
                   seeds: tuple[int, ...] = (EVAL_SEED,)) -> dict[str, Any]:
    """Held-out accuracy of ``model_dir`` on ``cfg``'s eval sets, per question: sampled
    (``eval_k`` answers at ``eval_temperature``, seeded with each of ``seeds``: the first
    is the one reported, others are kept under ``sampled_seed<s>``) and greedy. Cached in
    ``path``; the same seed for every model, so two models' samples differ only by the
    models."""
    import dataclasses

    import torch

    from nftune.config import engine_class
    from nftune.evaluate import evaluate_questions, load_eval_sets
    from nftune.reward import Reward
    from nftune.verify import Verifier

    names = ["sampled"] + [f"sampled_seed{s}" for s in seeds[1:]]
    if path.exists():
        held = json.loads(path.read_text())
        if all(name in held for name in names):
            return held
    started = time.perf_counter()
    # the run's own engine, as training's evaluation and `nftune eval` build it
    engine = engine_class(cfg.rollout_engine).for_evaluation(
        model_dir, device=cfg.device, batch_size=256, seed=seeds[0])
    sets = load_eval_sets(cfg)
    sampled = cfg.eval_sampling()
    modes = {name: (s, dataclasses.replace(sampled, seed=s))
             for name, s in zip(names, seeds, strict=True)}
    modes["greedy"] = (seeds[0], dataclasses.replace(sampled, temperature=0.0, top_p=1.0, n=1))
    result: dict[str, Any] = {"model": model_dir, "eval_data": cfg.eval_data}
    with Verifier(cfg.verify_workers) as verifier:
        reward = Reward(verifier, cfg.reward, cfg.verify_workers, cfg.verify_timeout_s)
        for mode, (seed, sampling) in modes.items():
            per_question: list[float] = []
            accuracies = []
            for name, questions in sets.items():
                torch.manual_seed(seed)
                r = evaluate_questions(None, engine.tokenizer, questions, name=name,
                                       sampling=sampling,
                                       template=cfg.template, verifier=reward, engine=engine)
                accuracies.append(r.avg_at_k)
                per_question += [sum(i["correct"]) / len(i["correct"]) for i in r.items]
            result[mode] = {"accuracy": statistics.mean(accuracies), "k": sampling.n,
                            "temperature": sampling.temperature, "seed": seed,
                            "per_question": per_question}
    result["seconds"] = time.perf_counter() - started
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result


def evaluate_base(cfg_dict: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """The shared base model evaluated as every run's final model is (``base_eval.json``),
    plus a second sampled evaluation with another seed that sorts questions by difficulty
    (binning by the same samples that measure "before" would favour gains on hard
    questions by regression to the mean)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = build_config(None, cfg_dict)
    return evaluate_final(cfg.model, cfg, output_dir / "base_eval.json",
                          seeds=(EVAL_SEED, BIN_SEED))


def eval_key(rows: list[dict[str, Any]]) -> str | None:
    """The held-out curve's metric (``eval/<set>/avg@k``) in a run's metrics rows."""
    return next((k for r in rows for k in r if k.startswith("eval/") and "/avg@" in k), None)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]  # drop NaN (e.g. a step that kept nothing)
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def curve_area(points: list[tuple[int, float]], start: float = math.nan) -> float:
    """Mean held-out accuracy along training: the trapezoid area under the curve divided by
    the steps it spans, from (0, ``start``) when the base's accuracy on the curve set is known,
    else from the first point. Higher = more accuracy earlier *and/or* a higher level."""
    pts = ([(0, start)] if start == start else []) + sorted(points)
    if len(pts) < 2:
        return pts[0][1] if pts else math.nan
    area = sum((t1 - t0) * (a0 + a1) / 2 for (t0, a0), (t1, a1) in pairwise(pts))
    return area / (pts[-1][0] - pts[0][0])


def steps_to_gain(points: list[tuple[int, float]], start: float, share: float = 0.9,
                  tail: int = 2) -> float:
    """Rollout steps until the curve first reaches ``start`` + ``share`` × the final gain
    (final = the mean of the last ``tail`` points, which damps one noisy last point), linearly
    interpolated from (0, ``start``). NaN without ``start`` or without a gain. Fewer = faster,
    whatever the level reached."""
    pts = sorted(points)
    if start != start or not pts:
        return math.nan
    final = statistics.mean(a for _, a in pts[-tail:])
    if final <= start:
        return math.nan
    target = start + share * (final - start)
    prev_t, prev_a = 0, start
    for t, a in pts:
        if a >= target:
            return prev_t + (t - prev_t) * (target - prev_a) / (a - prev_a)
        prev_t, prev_a = t, a
    return float(pts[-1][0])  # only the smoothed final reaches it


def late_slope(points: list[tuple[int, float]], share: float = 0.25) -> float:
    """Least-squares slope of the curve (accuracy per step) over its last ``share`` of
    training: the points at steps ≥ (1 − share) × the last step. Near 0 = the curve has
    flattened; NaN with fewer than two such points."""
    pts = sorted(points)
    if not pts:
        return math.nan
    late = [(t, a) for t, a in pts if t >= (1 - share) * pts[-1][0]]
    if len(late) < 2:
        return math.nan
    steps, accuracies = zip(*late, strict=True)
    return statistics.linear_regression(steps, accuracies).slope


def _jsonl_lines(name: str, out: Path) -> list[str] | None:
    for path in (Path(name), out / Path(name).name):
        if path.is_file():
            return [line for line in path.read_text().splitlines() if line.strip()]
    return None


def curve_base_accuracy(plan: dict[str, Any], base_eval: dict[str, Any] | None,
                        out: Path) -> float:
    """The base's accuracy on the curve set (step 0 of every run's curve), from its final
    evaluation's per-question rates: defined when the curve set is one file whose rows are
    the first rows of the final evaluation's (the demo's curve.jsonl is test.jsonl's head),
    else NaN."""
    curve_name = str(plan["base"].get("eval_data") or "")
    final_name = str((plan.get("final_eval") or {}).get("eval_data") or curve_name)
    if not base_eval or "," in curve_name or "," in final_name:
        return math.nan
    rates = base_eval["sampled"]["per_question"]
    curve, final = _jsonl_lines(curve_name, out), _jsonl_lines(final_name, out)
    if not curve or final is None or final[:len(curve)] != curve or len(rates) < len(curve):
        return math.nan
    return statistics.mean(rates[:len(curve)])


def difficulty_bins(base_eval: dict[str, Any]) -> dict[str, list[int]]:
    """Question indices per difficulty bin, by the base's accuracy in its BIN_SEED samples
    (the first evaluation's if there is no second)."""
    rates = base_eval.get(f"sampled_seed{BIN_SEED}", base_eval["sampled"])["per_question"]
    bins: dict[str, list[int]] = {name: [] for name, _, _ in BINS}
    for i, rate in enumerate(rates):
        for name, low, high in BINS:
            if low <= rate < high or (high == 1.0 and rate == 1.0):
                bins[name].append(i)
                break
    return bins


def with_rest(bins: dict[str, list[int]]) -> dict[str, list[int]]:
    """The bins and "rest": every question that is not hard (the bins above it can be
    small)."""
    return {**bins, "rest": [i for name, rows in bins.items() if name != "hard" for i in rows]}


def _bin_accuracy(per_question: list[float], rows: list[int]) -> float:
    return statistics.mean(per_question[i] for i in rows) if rows else math.nan


def _last_mean(rows: list[dict[str, Any]], key: str, n: int = 10) -> float:
    values = [r[key] for r in rows if key in r and r[key] == r[key]]
    return statistics.mean(values[-n:]) if values else math.nan


def _read_run(out: Path, run: dict[str, Any], bins: dict[str, list[int]]) -> dict[str, Any] | None:
    run_dir = out / "runs" / run["dir"]
    metrics_file = run_dir / "metrics.jsonl"
    if not (run_dir / "final").exists() or not metrics_file.exists():
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    key = eval_key(rows)
    final_eval = run_dir / "final_eval.json"
    evaluated = json.loads(final_eval.read_text()) if final_eval.exists() else None
    if evaluated:
        sampled, greedy = evaluated["sampled"]["accuracy"], evaluated["greedy"]["accuracy"]
        by_bin = {name: _bin_accuracy(evaluated["sampled"]["per_question"], rows_)
                  for name, rows_ in with_rest(bins).items()}
    else:  # a run from before final evaluations: its last in-training evaluation
        sampled = next((r[key] for r in reversed(rows) if key and key in r), math.nan)
        greedy, by_bin = math.nan, {name: math.nan for name in [*bins, "rest"]}
    entropy = [r["entropy"] for r in rows if r.get("entropy") == r.get("entropy")
               and "entropy" in r]
    curve = [(r["step"], r[key]) for r in rows if key and key in r]
    clip = [r["clip_fraction"] for r in rows if "clip_fraction" in r]
    spent = json.loads((run_dir / "compute.json").read_text()) \
        if (run_dir / "compute.json").exists() else {}
    return {"seed": run["seed"], "final_accuracy": sampled, "greedy_accuracy": greedy,
            "by_difficulty": by_bin, "eval_key": key, "metrics": rows,
            "late_reward": _last_mean(rows, "reward_mean"),
            "entropy_change": entropy[-1] - entropy[0] if entropy else math.nan,
            "late_entropy": _last_mean(rows, "entropy"), "curve": curve,
            # share of wrong answers' tokens where the objective's clip acts, mean over steps
            "clip_fraction": statistics.mean(clip) if clip else math.nan,
            "grad_share_wrong": _mean_std([r["grad_share_wrong"] for r in rows
                                           if "grad_share_wrong" in r])[0],
            "seconds": spent.get("train_s", sum(r.get("time_step_s", 0.0) for r in rows))
            + (evaluated or {}).get("seconds", 0.0)}


def _paired(ref: list[dict[str, Any]], other: list[dict[str, Any]], value) -> dict[str, Any]:
    """Per-seed differences value(ref) − value(other) over the seeds both have, with their
    mean and 95% CI."""
    by_seed = {m["seed"]: m for m in other}
    diffs = {m["seed"]: value(m) - value(by_seed[m["seed"]]) for m in ref if m["seed"] in by_seed}
    mean, low, high = mean_ci(list(diffs.values()))
    return {"per_seed": diffs, "mean": mean, "ci": [low, high]}


def build_report(output_dir: str | Path) -> dict[str, Any]:
    """Tables, plots and JSON from the finished runs in ``output_dir`` (``--report``)."""
    out = Path(output_dir)
    plan_file = out / "plan.json"
    if not plan_file.exists():
        raise FileNotFoundError(f"{plan_file}: not a comparison directory")
    plan = json.loads(plan_file.read_text())
    base_file = out / "base_eval.json"
    base_eval = json.loads(base_file.read_text()) if base_file.exists() else None
    if base_eval is not None and "sampled" not in base_eval:  # an older comparison's file
        base_eval = {"sampled": {"accuracy": base_eval["accuracy"], "per_question": []},
                     "greedy": {"accuracy": math.nan, "per_question": []}}
    bins = difficulty_bins(base_eval) if base_eval else {name: [] for name, _, _ in BINS}
    groups: dict[str, list[dict[str, Any]]] = {}
    algo_of: dict[str, str] = {}
    start = curve_base_accuracy(plan, base_eval, out)
    for run in plan["runs"]:
        member = _read_run(out, run, bins)
        if member is not None:
            member["curve_area"] = curve_area(member["curve"], start)
            member["steps_to_90"] = steps_to_gain(member["curve"], start)
            member["late_slope"] = late_slope(member["curve"])
            groups.setdefault(run["label"], []).append(member)
            algo_of[run["label"]] = run["algo"]
    summary = {}
    for label, members in groups.items():
        summary[label] = {
            "algo": algo_of[label], "seeds": [m["seed"] for m in members],
            "accuracy": [m["final_accuracy"] for m in members],
            "accuracy_mean_ci": mean_ci([m["final_accuracy"] for m in members]),
            "accuracy_mean_std": _mean_std([m["final_accuracy"] for m in members]),
            "greedy": [m["greedy_accuracy"] for m in members],
            "greedy_mean_ci": mean_ci([m["greedy_accuracy"] for m in members]),
            "late_reward_mean_std": _mean_std([m["late_reward"] for m in members]),
            "entropy_change_mean_std": _mean_std([m["entropy_change"] for m in members]),
            "grad_share_wrong_mean_std": _mean_std([m["grad_share_wrong"] for m in members]),
            "clip_fraction_mean_std": _mean_std([m["clip_fraction"] for m in members]),
            "curve_area_mean_ci": mean_ci([m["curve_area"] for m in members]),
            "steps_to_90_mean_ci": mean_ci([m["steps_to_90"] for m in members]),
            "late_slope_mean_ci": mean_ci([m["late_slope"] for m in members]),
            "by_difficulty": {name: mean_ci([m["by_difficulty"][name] for m in members])
                              for name in [*bins, "rest"]}}
    labels = list(groups)
    paired = {}
    if labels:
        ref = groups[labels[0]]
        for label in labels[1:]:
            other = groups[label]
            paired[label] = {
                "sampled": _paired(ref, other, lambda m: m["final_accuracy"]),
                "greedy": _paired(ref, other, lambda m: m["greedy_accuracy"]),
                "late_entropy": _paired(ref, other, lambda m: m["late_entropy"]),
                "curve_area": _paired(ref, other, lambda m: m["curve_area"]),
                "steps_to_90": _paired(ref, other, lambda m: m["steps_to_90"]),
                # how much more the reference gains on hard questions than on the others,
                # relative to this label
                "hard_minus_rest": _paired(
                    ref, other, lambda m: m["by_difficulty"]["hard"] - m["by_difficulty"]["rest"]),
                **{f"bin_{name}": _paired(ref, other, lambda m, n=name: m["by_difficulty"][n])
                   for name in bins}}
    seconds = sum(m["seconds"] for ms in groups.values() for m in ms) + (
        (base_eval or {}).get("seconds", 0.0))
    result = {"base": {k: v for k, v in (base_eval or {}).items()
                       if k.startswith(("sampled", "greedy"))},  # the bins' evaluation too
              "base_accuracy": base_eval["sampled"]["accuracy"] if base_eval else None,
              "base_curve_accuracy": start,
              "bins": {name: len(rows) for name, rows in bins.items()},
              "reference": labels[0] if labels else None, "summary": summary,
              "paired": paired, "verdicts": verdicts(summary, paired),
              "compute": {"wall_hours": seconds / 3600, "runs": sum(map(len, groups.values()))},
              "runs": groups}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(_report(result))
    _plot(groups, out / "curves.png")
    if base_eval and any(bins.values()):
        _plot_difficulty(result, base_eval, bins, out / "difficulty.png")
    return result


def _verdict(ci: list[float], line: float = 0.0) -> str:
    low, high = ci
    if low != low:
        return "inconclusive (fewer than two paired seeds)"
    if low > line:
        return "supported"
    if high < line:
        return "not supported"
    return "inconclusive at this scale"


def verdicts(summary: dict[str, Any], paired: dict[str, Any]) -> list[str]:
    """One sentence per claim of the paper that this comparison can test (which ones depends
    on the labels present: the reference against RFT, DAPO and GRPO)."""
    if not summary:
        return []
    ref = next(iter(summary))
    out = []

    def ci_text(d: dict[str, Any], scale: float = 100, digits: int = 1) -> str:
        low, high = d["ci"]
        return (f"{scale * d['mean']:+.{digits}f} [{scale * low:+.{digits}f}, "
                f"{scale * high:+.{digits}f}]")

    if "rft" in paired:
        d = paired["rft"]
        out.append(f"{ref} ≥ RFT (paper, Table 1: NFT 51.7 vs RFT 48.3): "
                   f"{_verdict(d['sampled']['ci'])} — {ref} − rft sampled "
                   f"{ci_text(d['sampled'])} points, greedy {ci_text(d['greedy'])} (95% CI).")
        out.append(f"The negative term helps most where answers are mostly wrong: "
                   f"{_verdict(d['hard_minus_rest']['ci'])} — ({ref} − rft) on hard questions "
                   f"minus on the others {ci_text(d['hard_minus_rest'])} points.")
        out.append(f"{ref} keeps entropy higher than RFT (paper's entropy figure): "
                   f"{_verdict(d['late_entropy']['ci'])} — {ref} − rft entropy over the last 10 "
                   f"steps {ci_text(d['late_entropy'], 1, 4)} nats per token.")
    for name, paper in (("dapo", "DAPO 51.2"), ("grpo", "GRPO 49.5")):
        if name in paired:
            d = paired[name]["sampled"]
            out.append(f"{ref} close to or above {name.upper()} (within {100 * CLOSE:.0f} "
                       f"points; paper: NFT 51.7 vs {paper}): {_verdict(d['ci'], -CLOSE)} — "
                       f"{ref} − {name} sampled {ci_text(d)} points.")
    if not out:  # an ablation: the reference against each alternative
        for label, d in paired.items():
            out.append(f"{ref} vs {label}: {ref} − {label} sampled "
                       f"{ci_text(d['sampled'])} points → {ref} better: "
                       f"{_verdict(d['sampled']['ci'])}.")
    for label, d in paired.items():  # speed, apart from the level above
        area, t90 = d.get("curve_area"), d.get("steps_to_90")
        if area is None or area["mean"] != area["mean"]:
            continue
        line = (f"{ref} learns faster than {label}: fewer steps to 90% of its own final gain "
                f"{_speed_verdict(t90)}")
        if t90["mean"] == t90["mean"]:
            line += f" — {ref} − {label} {ci_text(t90, 1, 0)} steps"
        out.append(line + f"; area under the held-out curve {ci_text(area)} points.")
    for label, s in summary.items():  # has the run been long enough?
        mean, low, high = s["late_slope_mean_ci"]
        if mean != mean:
            continue
        d = {"mean": mean, "ci": [low, high]}
        out.append(f"{label}'s curve still rises over the last quarter of training: "
                   f"{_verdict(d['ci'])} — slope {ci_text(d, 1e4)} points per 100 steps "
                   f"(near 0 = flattened).")
    return out


def _speed_verdict(d: dict[str, Any]) -> str:
    """``_verdict`` for a difference in steps, where fewer is better."""
    if d["mean"] != d["mean"]:
        return "not measurable (no base accuracy on the curve set, or no gain)"
    return _verdict([-d["ci"][1], -d["ci"][0]])


def _fmt_ci(mci, scale: float = 100) -> str:
    mean, low, high = mci
    if mean != mean:
        return "–"
    if low != low:
        return f"{scale * mean:.1f}"
    return f"{scale * mean:.1f} [{scale * low:.1f}, {scale * high:.1f}]"


def _report(result: dict[str, Any]) -> str:
    summary, paired, base = result["summary"], result["paired"], result.get("base") or {}
    lines = ["| algorithm | held-out sampled, mean [95% CI] | greedy, mean [95% CI] | "
             "sampled per seed | training reward, last 10 steps | entropy change | "
             "update weight on wrong answers |", "|---|---|---|---|---|---|---|"]
    if base:
        lines.append(f"| base model | {100 * base['sampled']['accuracy']:.1f} | "
                     f"{100 * base['greedy']['accuracy']:.1f} | | | | |")
    for label, s in summary.items():
        rm, rsd = s["late_reward_mean_std"]
        em, esd = s["entropy_change_mean_std"]
        gm, gsd = s["grad_share_wrong_mean_std"]
        per_seed = ", ".join(f"{100 * a:.1f}" for a in s["accuracy"])
        lines.append(f"| {label} | {_fmt_ci(s['accuracy_mean_ci'])} | "
                     f"{_fmt_ci(s['greedy_mean_ci'])} | {per_seed} | {100 * rm:.1f} ± "
                     f"{100 * rsd:.1f} | {em:+.3f} ± {esd:.3f} | {gm:.2f} ± {gsd:.2f} |")
    ref = result["reference"]
    if paired:
        lines += ["", f"Paired by seed (same seed = same data order and sampling seeds), "
                  f"{ref} minus each, points of accuracy:", "",
                  "| comparison | sampled per seed | sampled mean [95% CI] | greedy mean "
                  "[95% CI] |", "|---|---|---|---|"]
        for label, d in paired.items():
            per_seed = ", ".join(f"{100 * v:+.1f}" for v in d["sampled"]["per_seed"].values())
            lines.append(f"| {ref} − {label} | {per_seed} | "
                         f"{_fmt_ci([d['sampled']['mean'], *d['sampled']['ci']])} | "
                         f"{_fmt_ci([d['greedy']['mean'], *d['greedy']['ci']])} |")
    if any(s["curve_area_mean_ci"][0] == s["curve_area_mean_ci"][0] for s in summary.values()):
        start = result.get("base_curve_accuracy", math.nan)
        lines += ["", "Learning speed on the held-out curve (from step 0 = the base's "
                  + (f"{100 * start:.1f}% on the curve set" if start == start else
                     "accuracy, unknown here: from the first point")
                  + "), mean [95% CI] over seeds, and the clip's reach:", "",
                  "| algorithm | area under the curve (mean accuracy over training) | steps to "
                  "90% of the final gain | slope over the last quarter (points per 100 steps) "
                  "| clip active (share of wrong answers' tokens) |",
                  "|---|---|---|---|---|"]
        for label, s in summary.items():
            cm, csd = s["clip_fraction_mean_std"]
            clip = f"{100 * cm:.2f}% ± {100 * csd:.2f}" if cm == cm else "–"
            lines.append(f"| {label} | {_fmt_ci(s['curve_area_mean_ci'])} | "
                         f"{_fmt_ci(s['steps_to_90_mean_ci'], 1)} | "
                         f"{_fmt_ci(s['late_slope_mean_ci'], 1e4)} | {clip} |")
        if paired:
            lines += ["", f"Paired, {ref} minus each (area: points; steps: fewer = faster):", "",
                      "| comparison | area per seed | area mean [95% CI] | steps to 90% mean "
                      "[95% CI] |", "|---|---|---|---|"]
            for label, d in paired.items():
                per_seed = ", ".join(f"{100 * v:+.1f}"
                                     for v in d["curve_area"]["per_seed"].values())
                t90 = d["steps_to_90"]
                lines.append(f"| {ref} − {label} | {per_seed} | "
                             f"{_fmt_ci([d['curve_area']['mean'], *d['curve_area']['ci']])} | "
                             f"{_fmt_ci([t90['mean'], *t90['ci']], 1)} |")
    if base and any(result["bins"].values()):
        names = [*result["bins"], "rest"]
        counts = {**result["bins"], "rest": sum(result["bins"].values())
                  - result["bins"].get("hard", 0)}
        titles = {**{n: n for n in result["bins"]}, "rest": "medium + easy"}
        lines += ["", "Sampled accuracy by difficulty (bins by the base's accuracy on each "
                  "question in a second, independent evaluation: hard < 1/3 ≤ medium < 2/3 ≤ "
                  "easy), mean [95% CI] over seeds:", "",
                  "| model | " + " | ".join(f"{titles[n]} ({counts[n]} questions)"
                                           for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        base_rows = difficulty_rows(base)
        lines.append("| base model | " + " | ".join(
            f"{100 * base_rows[n]:.1f}" if base_rows[n] == base_rows[n] else "–"
            for n in names) + " |")
        for label, s in summary.items():
            lines.append(f"| {label} | " + " | ".join(_fmt_ci(s["by_difficulty"][n])
                                                     for n in names) + " |")
    if result["verdicts"]:
        lines += ["", "Verdicts:", ""] + [f"- {v}" for v in result["verdicts"]]
    c = result["compute"]
    lines += ["", f"Compute: {c['runs']} runs, {c['wall_hours']:.2f} wall-clock hours of "
              "training and evaluation (base included).", "", "![curves](curves.png)"]
    if base and any(result["bins"].values()):
        lines.append("![difficulty](difficulty.png)")
    return "\n".join(lines) + "\n"


def difficulty_rows(base_eval: dict[str, Any]) -> dict[str, float]:
    """The base's own "before" accuracy per bin (its EVAL_SEED samples)."""
    bins = difficulty_bins(base_eval) if base_eval.get("sampled", {}).get("per_question") \
        else {name: [] for name, _, _ in BINS}
    return {name: _bin_accuracy(base_eval["sampled"]["per_question"], rows)
            for name, rows in with_rest(bins).items()}


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


def _plot_difficulty(result: dict[str, Any], base_eval: dict[str, Any],
                     bins: dict[str, list[int]], path: Path) -> None:
    """Sampled accuracy per difficulty bin: the base, then each label after training (mean
    and 95% CI over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(bins)
    base_rows = difficulty_rows(base_eval)
    series = [("base model", [base_rows[n] for n in names], None)]
    for label, s in result["summary"].items():
        cis = [s["by_difficulty"][n] for n in names]
        series.append((label, [c[0] for c in cis],
                       [[c[0] - c[1] for c in cis], [c[2] - c[0] for c in cis]]))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    x = np.arange(len(names))
    for i, (label, values, err) in enumerate(series):
        err = np.nan_to_num(np.array(err, dtype=float)) if err is not None else None
        ax.bar(x + i * width - 0.4 + width / 2, np.array(values) * 100, width, label=label,
               yerr=err * 100 if err is not None else None, capsize=2)
    ax.set_xticks(x, [f"{n}\n({len(bins[n])} questions)" for n in names])
    ax.set_ylabel("held-out sampled accuracy, %")
    ax.set_title("accuracy by question difficulty (the base's accuracy on it)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_base_config(quick: bool, cache_dir: str | None, output_dir: Path,
                     task: str = "arithmetic") -> tuple[dict[str, Any], dict[str, Any], Path]:
    """The demo's task, base model and settings as a comparison's shared configuration: the
    held-out curve on the demo's curve set (its first questions, a few answers each), a
    checkpoint every 10 steps; and the final evaluation's fields: the whole test split at the
    demo's sampled k. Returns (shared config, final-evaluation fields, base model dir)."""
    from nftune.demo import SETTINGS, default_cache_dir, write_splits
    from nftune.tasks.base_model import cached_base_model

    settings = SETTINGS[task, quick]
    base_dir, _ = cached_base_model(cache_dir or default_cache_dir(), settings.base)
    write_splits(output_dir, settings)
    base = {**settings.train_config(base_dir, output_dir), "save_every": 10,
            "keep_checkpoints": 1, "eval_data": str(output_dir / "curve.jsonl"),
            "eval_k": settings.curve_k}
    final_eval = {"eval_data": str(output_dir / "test.jsonl"), "eval_k": settings.eval_k}
    return base, final_eval, base_dir
