"""The arithmetic task and the demo end to end (quick mode)."""

import json
import random
import subprocess
import sys

from nftune.tasks.arithmetic import LEVELS, Problem, make_problems, make_questions
from nftune.verify import Verifier


def test_worked_solution_by_hand():
    p = Problem((47, 18, 25), ("+", "-"))
    assert p.text == "47+18-25" and p.answer == 40
    assert p.solution()[0] == "47+18=65\n65-25=40\nAnswer: 40"


def test_noisy_solutions_carry_their_errors_forward():
    p = Problem((10, 5, 3), ("+", "+"))
    rng = random.Random(1)
    texts = {p.solution(rng, noise=1.0)[0] for _ in range(20)}
    for text in texts:  # every step is off, and the next step starts from the wrong value
        lines = text.splitlines()
        first = int(lines[0].split("=")[1])
        assert first != 15 and lines[1].startswith(f"{first}+3=")


def test_splits_are_disjoint_and_deterministic():
    for level in LEVELS:
        train = make_problems(300, "train", seed=0, level=level)
        test = make_problems(60, "test", seed=0, level=level)
        assert not {p.text for p in train} & {p.text for p in test}
        assert [p.text for p in test] == [p.text for p in make_problems(60, "test", 0, level)]


def test_the_verifier_grades_the_task():
    qs = make_questions(20, "test", seed=0, level=3)
    problems = make_problems(20, "test", seed=0, level=3)
    with Verifier(workers=1) as v:
        right = v.verify(["\n" + p.solution()[0] for p in problems], [q.answer for q in qs])
        wrong = v.verify([f"\nAnswer: {p.answer + 1}" for p in problems], [q.answer for q in qs])
    assert all(right) and not any(wrong)


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "nftune.cli", "demo", "--quick",
                           "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_built"] and summary["steps"] == 4
    for key in ("sampled", "greedy"):
        assert 0.0 <= summary["after"][key] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert any(k.startswith("eval/") for k in rows[-1])
    assert (out / "curves.png").stat().st_size > 10_000
    assert "held-out" in (out / "report.md").read_text().lower()
    assert "held-out accuracy" in done.stdout
