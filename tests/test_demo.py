"""The arithmetic task and the demo end to end (quick mode)."""

import json
import random
import subprocess
import sys

import pytest

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
    assert summary["base_origin"] == "built" and summary["steps"] == 4
    # held out: no test question is a training question
    problems = {name: {json.loads(line)["problem"] for line in
                       (out / f"{name}.jsonl").read_text().splitlines()}
                for name in ("train", "test")}
    assert len(problems["test"]) == summary["test_questions"] == 48
    assert not problems["train"] & problems["test"]
    report = (out / "report.md").read_text()
    for key in ("sampled", "greedy"):
        before, after = summary["before"][key], summary["after"][key]
        # with eval_k = 2 answers per question, accuracies are multiples of 1 / (2 · 48)
        grid = 1 if key == "greedy" else 2
        for value in (before, after):
            assert abs(value * 48 * grid - round(value * 48 * grid)) < 1e-9
        assert abs(summary["gain"][key] - (after - before)) < 1e-9  # paired mean = difference
        assert f"| {key} | {before:.1%} | {after:.1%} |" in report
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert any(k.startswith("eval/") for k in rows[-1])
    assert (out / "curves.png").stat().st_size > 10_000
    assert "held-out" in (out / "report.md").read_text().lower()
    assert "held-out accuracy" in done.stdout


def test_paired_gain_by_hand():
    from nftune.demo import paired_gain
    from nftune.evaluate import EvalResult

    def result(rows):
        return EvalResult("t", k=2, avg_at_k=0, pass_at_k=0, questions=len(rows),
                          items=[{"correct": r} for r in rows])

    before = result([[False, False], [True, False], [True, True]])
    after = result([[True, False], [True, True], [True, True]])
    # per-question differences 0.5, 0.5, 0: mean 1/3, sample variance 1/12, s.e. sqrt(1/36)
    gain, se = paired_gain(before, after)
    assert abs(gain - 1 / 3) < 1e-12 and abs(se - 1 / 6) < 1e-12


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_shipped_base_is_intact_and_scores_its_documented_accuracy(task):
    import torch

    from nftune.demo import SETTINGS, _evaluate_both
    from nftune.policy import load_policy
    from nftune.reward import Reward
    from nftune.tasks.base_model import (
        INFO_FILE,
        SHIPPED_BASES,
        TASKS,
        cached_base_model,
        check_base_dir,
        shipped_spec,
        task_module,
    )

    settings = SETTINGS[task, False]
    shipped = SHIPPED_BASES[task]
    assert shipped_spec(task) == settings.base  # the demo and compare start from these weights
    assert cached_base_model("/nonexistent-cache", settings.base) == (shipped, "shipped")
    info = check_base_dir(shipped)
    assert set(info["sha256"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert (shipped / INFO_FILE).exists()
    model, tokenizer = load_policy(str(shipped), torch.device("cpu"))
    test = task_module(task).make_questions(settings.test_questions, "test", 0,
                                            settings.base.level)
    with Verifier(workers=2) as v:
        measured = _evaluate_both(model, tokenizer, test, settings,
                                  Reward(v, TASKS[task], workers=v.workers))
    for kind in ("sampled", "greedy"):  # another CPU may round differently: within 1 point
        assert abs(measured[kind].avg_at_k - info["accuracy"][kind]) <= 0.01, kind


def test_a_damaged_base_is_refused(tmp_path):
    import shutil

    from nftune.tasks.base_model import SHIPPED_DIR, check_base_dir

    copy = tmp_path / "base"
    shutil.copytree(SHIPPED_DIR, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors: SHA-256 differs"):
        check_base_dir(copy)
