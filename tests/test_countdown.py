"""The Countdown checker on hand-written right, wrong and malicious expressions, in bounded
time; and the task's generator against its own checker."""

import time

import pytest

from nftune.tasks.countdown import check_expression, countdown_reward, make_questions

RIGHT = [
    ("(8-5)*3", [8, 5, 3], 9),
    ("3*(8-5)", [8, 5, 3], 9),           # any order of the numbers
    ("8/(5-3)", [8, 5, 3], 4),
    ("(1+1/2)*4", [1, 1, 2, 4], 6),       # exact fractions: 1.5 × 4
    ("(4 + 6) × 2", [4, 6, 2], 20),       # typeset operators and spaces
    ("2-7", [7, 2], -5),
]
WRONG = [
    ("(8-5)*3", [8, 5, 3], 10),           # wrong value
    ("8*8-5", [8, 5, 3], 59),             # 8 used twice, 3 not at all
    ("8+5", [8, 5, 3], 13),               # a number left out
    ("8+5+3+1", [8, 5, 3], 17),           # a number not given
    ("-8+5+3", [8, 5, 3], 0),             # unary minus is not an operator of the game
    ("8.0+5+3", [8, 5, 3], 16),           # only integers
    ("8+5+True", [8, 5, 1], 14),
    ("1/(2-2)", [1, 2, 2], 0),            # division by zero
    ("", [1], 1),
    ("8 5 3", [8, 5, 3], 16),
]
MALICIOUS = [
    "__import__('os').system('touch /tmp/nftune-pwned')",
    "open('/etc/passwd').read()",
    "9**9**9**9",
    "(2**31)**(2**31)",
    "().__class__.__bases__[0].__subclasses__()",
    "[8, 5, 3]",
    "(lambda: 8)()+5+3",
    "8 if 5 else 3",
    "9" * 100_000 + "*9",
    "(" * 10_000 + "8" + ")" * 10_000,
    "8*" * 100 + "8",
]


@pytest.mark.parametrize("expression,numbers,target", RIGHT)
def test_right_expressions(expression, numbers, target):
    assert check_expression(expression, numbers, target)


@pytest.mark.parametrize("expression,numbers,target", WRONG)
def test_wrong_expressions(expression, numbers, target):
    assert not check_expression(expression, numbers, target)


def test_malicious_expressions_are_wrong_in_bounded_time(tmp_path):
    for expression in MALICIOUS:
        start = time.perf_counter()
        assert not check_expression(expression, [8, 5, 3], 16), expression
        assert time.perf_counter() - start < 0.5, expression[:40]
    assert not (tmp_path / "nftune-pwned").exists()


def test_the_reward_reads_the_answer_line_and_the_rows_fields():
    rows = [{"numbers": [8, 5, 3], "target": 9}] * 4
    responses = ["8-5=3\n3*3=9\nAnswer: (8-5)*3", "Answer: (8+5)*3", "no answer",
                 "Answer: (8-5)*3\nAnswer: 8+5+3"]  # the last Answer line counts
    assert countdown_reward(responses, rows) == [1.0, 0.0, 0.0, 0.0]


def test_every_generated_solution_is_right_by_the_checker_and_splits_do_not_overlap():
    train = make_questions(300, "train", 0, 2)
    test = make_questions(100, "test", 0, 2)
    assert not {q.problem for q in train} & {q.problem for q in test}
    from nftune.tasks.countdown import make_problems

    for p in make_problems(300, "train", 0, 2):
        solution, value = p.solution()
        assert value == p.target
        assert countdown_reward([solution], [{"numbers": list(p.numbers),
                                              "target": p.target}]) == [1.0]


def test_the_named_reward_grades_the_tasks_questions_in_worker_processes():
    """`reward: countdown` through the worker pool: the questions' extra fields (numbers,
    target) travel to the workers; each generated solution scores 1, a wrong one 0."""
    from nftune.reward import Reward

    questions = make_questions(20, "test", 0, 2)
    from nftune.tasks.countdown import make_problems

    solutions = [p.solution()[0] for p in make_problems(20, "test", 0, 2)]
    with Reward(spec="countdown", workers=1) as reward:
        scores = reward.score(solutions + ["Answer: 1+1"], questions + questions[:1])
    assert scores.values == [1.0] * 20 + [0.0]
    assert (scores.errors, scores.timeouts) == (0, 0)


def test_countdown_demo_end_to_end_quick(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "nftune.cli", "demo", "--task", "countdown",
                           "--quick", "--output-dir", str(out), "--cache-dir",
                           str(tmp_path / "cache"), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "countdown" and summary["settings"]["base"]["task"] == "countdown"
    assert "reward: countdown" in (out / "run" / "config.yaml").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward/errors"] == 0 and r["reward/timeouts"] == 0 for r in rows)
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert all({"numbers", "target"} <= set(row["extra"]) for row in test)
    assert "countdown level" in (out / "report.md").read_text()
