"""Where would a comparison's curves flatten? Fits acc(t) = A − B·exp(−t/τ) to each run's
held-out curve (step 0 = the base's accuracy on the curve set) and extrapolates.

Usage: python benchmarks/plateau_fit.py DIR [--flat 0.5] [--until STEP] [--json OUT]

DIR is an `nftune compare` output folder. Per algorithm (mean [95% CI] over seeds): the
plateau A (points), the time constant τ (steps), the step where the fitted slope falls below
``--flat`` points per 100 steps, and the wall-clock minutes a run would need to get there
(from the run's own seconds per step). An extrapolation, not a measurement: it assumes the
curve keeps its exponential approach; a τ at the grid's top (20× the last step) means the
curve is still straight and no plateau is in sight. Its own check: the same fit on the first
⅔ of each curve. If that plateau is lower and earlier than the whole curve's, the curve
approaches more slowly than an exponential and every extrapolation here is a lower bound.
``--until STEP`` fits only the curve up to STEP (what a shorter study would have predicted).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from nftune.compare import eval_key, mean_ci


def fit_saturating(steps: list[float], accuracy: list[float]) -> dict[str, float]:
    """Least-squares A, B, τ of A − B·exp(−t/τ): τ on a log grid (from a tenth of the first
    nonzero step to 20× the last), A and B in closed form for each τ."""
    t, y = np.asarray(steps, float), np.asarray(accuracy, float)
    first = min(s for s in steps if s > 0)
    best = None
    for tau in np.geomspace(first / 10, 20 * t.max(), 400):
        design = np.stack([np.ones_like(t), -np.exp(-t / tau)], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
        sse = float(((design @ (a, b) - y) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, float(a), float(b), float(tau))
    sse, a, b, tau = best
    return {"A": a, "B": b, "tau": tau, "rmse": math.sqrt(sse / len(t)),
            "tau_at_grid_top": bool(tau >= 20 * t.max() * 0.999)}


def step_slope_below(fit: dict[str, float], flat_per_100: float) -> float:
    """First step where the fitted slope B/τ·exp(−t/τ) (points per step) × 100 is below
    ``flat_per_100``; 0 if it already is at t = 0."""
    start = 100 * fit["B"] / fit["tau"]
    return fit["tau"] * math.log(start / flat_per_100) if start > flat_per_100 else 0.0


def run_curve(run_dir: Path, base_curve: float, until: int | None = None
              ) -> tuple[list[int], list[float], float]:
    """(steps, curve accuracy in points, seconds per training step) of one run, its curve
    up to step ``until`` (all of it if None)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    key = eval_key(rows)
    points = sorted({r["step"]: 100 * r[key] for r in rows
                     if key in r and (until is None or r["step"] <= until)}.items())
    if not math.isnan(base_curve):
        points = [(0, 100 * base_curve)] + points
    step_s = [r["time_step_s"] for r in rows if "time_step_s" in r]  # median: pauses aside
    return [p[0] for p in points], [p[1] for p in points], float(np.median(step_s))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--flat", type=float, default=0.5, help="points per 100 steps")
    ap.add_argument("--until", type=int, help="fit the curves only up to this step")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    plan_path = args.dir / "plan.json"
    if not plan_path.is_file():
        sys.exit(f"{args.dir}: no plan.json (not an `nftune compare` folder)")
    plan = json.loads(plan_path.read_text())
    results = args.dir / "results.json"
    base_curve = (json.loads(results.read_text()).get("base_curve_accuracy", math.nan)
                  if results.is_file() else math.nan)
    out: dict[str, dict] = {}
    for run in plan["runs"]:
        run_dir = args.dir / "runs" / run["dir"]
        if not (run_dir / "metrics.jsonl").is_file():
            continue
        steps, acc, step_s = run_curve(run_dir, base_curve, args.until)
        fit = fit_saturating(steps, acc)
        flat = step_slope_below(fit, args.flat)
        early_n = sum(s <= 2 / 3 * steps[-1] for s in steps)
        early = fit_saturating(steps[:early_n], acc[:early_n])
        fit.update(seed=run["seed"], last_step=steps[-1], flat_step=flat,
                   flat_minutes=flat * step_s / 60, seconds_per_step=step_s,
                   A_first_two_thirds=early["A"],
                   flat_step_first_two_thirds=step_slope_below(early, args.flat))
        out.setdefault(run["label"], {"runs": []})["runs"].append(fit)
    print(f"| algorithm | plateau A (points) | τ (steps) | slope < {args.flat:g} per 100 steps "
          "at step | minutes per run to get there | fit RMSE | runs at grid top | "
          "from the first ⅔: A | from the first ⅔: flat at step |")
    print("|---|---|---|---|---|---|---|---|---|")
    shown = ("A", "tau", "flat_step", "flat_minutes")
    later = ("A_first_two_thirds", "flat_step_first_two_thirds")
    for label, group in out.items():
        for key in (*shown, "rmse", *later):
            group[key] = mean_ci([r[key] for r in group["runs"]])
        cell = [f"{m:.1f} [{lo:.1f}, {hi:.1f}]" if len(group["runs"]) > 1 else f"{m:.1f}"
                for m, lo, hi in (group[k] for k in (*shown, *later))]
        top = sum(r["tau_at_grid_top"] for r in group["runs"])
        print(f"| {label} | {' | '.join(cell[:4])} | {group['rmse'][0]:.2f} | "
              f"{top} of {len(group['runs'])} | {' | '.join(cell[4:])} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
