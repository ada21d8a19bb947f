"""benchmarks/plateau_fit.py on curves whose plateau is known: it must recover A and τ, and
the step where the slope falls below the threshold must be the hand-worked one."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fake_comparison(out: Path, curves: dict[str, list[float] | None]) -> None:
    """A compare folder: plan.json, results.json (base curve 0.30) and one metrics.jsonl per
    run, curve every 10 steps to 800, 1.5 s per step. ``curves``: run dir -> accuracy(t)."""
    runs = []
    for name, acc in curves.items():
        label, seed = name.rsplit("-seed", 1)
        runs.append({"label": label, "algo": label, "seed": int(seed), "dir": name})
        d = out / "runs" / name
        d.mkdir(parents=True)
        rows = [{"step": s, "time_step_s": 1.5, **({"eval/curve/avg@2": acc(s)} if s % 10 == 0
                                                     else {})} for s in range(1, 801)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "plan.json").write_text(json.dumps({"runs": runs}))
    (out / "results.json").write_text(json.dumps({"base_curve_accuracy": 0.30}))


def test_plateau_fit_recovers_a_known_exponential_and_flags_a_straight_line(tmp_path):
    # A = 80, B = 50 (so acc(0) = 30 = the base), τ = 300 and 320 steps
    _fake_comparison(tmp_path, {
        "nft-seed0": lambda t: (80 - 50 * math.exp(-t / 300)) / 100,
        "nft-seed1": lambda t: (80 - 50 * math.exp(-t / 320)) / 100,
        "rft-seed0": lambda t: (30 + 0.02 * t) / 100,  # straight: 2 points per 100 steps
    })
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plateau_fit.py"),
                           str(tmp_path), "--json", str(tmp_path / "fit.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    fit = json.loads((tmp_path / "fit.json").read_text())
    nft = {r["seed"]: r for r in fit["nft"]["runs"]}
    for seed, tau in ((0, 300), (1, 320)):
        assert abs(nft[seed]["A"] - 80) < 0.5 and abs(nft[seed]["tau"] / tau - 1) < 0.02
        # slope at 0: 100·50/τ points per 100 steps; below 0.5 at τ·ln(100·50/(0.5 τ))
        hand = tau * math.log(100 * 50 / (0.5 * tau))
        assert abs(nft[seed]["flat_step"] / hand - 1) < 0.03
        assert abs(nft[seed]["flat_minutes"] - hand * 1.5 / 60) < 0.03 * hand * 1.5 / 60
        assert not nft[seed]["tau_at_grid_top"]
        # an exact exponential: its first two thirds give the same plateau
        assert abs(nft[seed]["A_first_two_thirds"] - 80) < 0.5
    assert fit["rft"]["runs"][0]["tau_at_grid_top"]
    assert "| nft |" in proc.stdout and "| rft |" in proc.stdout
    # --until: only the curve to step 400 is fitted (an exact exponential: the same A)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plateau_fit.py"), str(tmp_path),
                    "--until", "400", "--json", str(tmp_path / "fit400.json")],
                   check=True, capture_output=True, timeout=120)
    short = json.loads((tmp_path / "fit400.json").read_text())["nft"]["runs"][0]
    assert short["last_step"] == 400 and abs(short["A"] - 80) < 0.5
