"""A user's reward function: named in the config, run in worker processes under a time limit,
failures counted, binary where the objective needs it; and GRPO's advantage for real-valued
rewards."""

import json
import time

import pytest
import torch

from nftune.cli import main
from nftune.data import Question
from nftune.reward import Reward, RewardError, check_values, parse_reward_spec

CHECKS = '''
"""A user's checks (the file a user writes)."""
import time


def last_number(text):
    digits = "".join(c if c.isdigit() or c == "-" else " " for c in text).split()
    return digits[-1] if digits else None


def exact(responses, rows):
    # the data row's own field, not the answer: extra fields reach the function
    return [float(last_number(r) == str(row["target"])) for r, row in zip(responses, rows)]


def moody(responses, rows):
    out = []
    for r in responses:
        if "hang" in r:
            time.sleep(600)
        if "crash" in r:
            1 / 0
        if "none" in r:
            return None
        out.append(1.0)
    return out


def half(responses, rows):
    return [0.5 for _ in responses]


def broken(responses, rows):
    raise ValueError("broken on purpose")
'''


@pytest.fixture
def checks(tmp_path):
    path = tmp_path / "checks.py"
    path.write_text(CHECKS)
    return path


@pytest.fixture
def target_data(tmp_path, arithmetic_files):
    """The arithmetic questions with their answer copied to an extra field ``target``."""
    path = tmp_path / "with_target.jsonl"
    rows = [json.loads(line) for line in arithmetic_files["train"].read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "target": r["answer"]}) + "\n" for r in rows))
    return path


def _question(answer="7"):
    return Question("q", "3+4", answer, "t", {"target": answer})


def test_a_hanging_and_a_crashing_call_are_counted_and_cost_one_answer_each(checks):
    responses = ["fine", "hang", "fine", "crash", "none", "fine"]
    start = time.perf_counter()
    with Reward(spec=f"{checks}:moody", workers=2, timeout_s=1.0) as reward:
        scores = reward.score(responses, [_question()] * len(responses))
    elapsed = time.perf_counter() - start
    assert scores.values == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert scores.timeouts == 1
    assert scores.errors == 2  # the ZeroDivisionError and the None
    assert "ZeroDivisionError" in scores.first_error or "returned None" in scores.first_error
    assert elapsed < 30  # one timeout of 1 s plus worker starts, not the 600 s sleep


def test_extra_fields_and_weights_reach_the_sum(checks):
    with Reward(spec=f"{checks}:exact*0.75,{checks}:half*0.5", workers=1) as reward:
        scores = reward.score(["so 7", "so 8"], [_question("7"), _question("7")])
    assert scores.values == [0.75 + 0.25, 0.25]
    assert (scores.errors, scores.timeouts) == (0, 0)


def test_reward_spec_errors_name_the_problem(checks):
    with pytest.raises(ValueError, match="expected 'math'"):
        parse_reward_spec("checks.py")
    with pytest.raises(ValueError, match="weight 'x' is not a number"):
        parse_reward_spec("a.py:f*x")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        Reward(spec=f"{checks}:nope")
    with pytest.raises(FileNotFoundError, match="missing.py"):
        Reward(spec="missing.py:f")


def test_binary_objectives_refuse_other_values():
    check_values([0.0, 1.0, 1.0], True, "f", "nft")
    check_values([0.0, 0.5], False, "f", "grpo")
    with pytest.raises(RewardError, match=r"reward f: returned 0\.5; nft needs binary rewards"):
        check_values([1.0, 0.5], True, "f", "nft")
    with pytest.raises(RewardError, match="outside"):
        check_values([1.5], False, "f", "grpo")


def _train(tiny_base, data, out, *extra):
    return main(["train", "--model", str(tiny_base), "--train-data", str(data),
                 "--output-dir", str(out), "--steps", "2", "--template", "raw",
                 "--prompts-per-step", "4", "--answers-per-prompt", "4",
                 "--max-new-tokens", "24", "--minibatches", "1", "--lr", "1e-3",
                 "--save-every", "0", "--verify-workers", "1", "--no-progress", *extra])


def test_a_user_reward_from_a_file_trains_end_to_end(tiny_base, target_data, checks, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_base, target_data, out, "--reward", f"{checks}:exact",
                  "--dynamic-sampling", "false") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["reward/errors"] == 0 and r["reward/timeouts"] == 0 for r in rows)
    assert all(0 <= r["reward_mean"] <= 1 for r in rows)
    assert "reward: " in (out / "config.yaml").read_text()
    assert (out / "final" / "model.safetensors").exists()


def test_a_non_binary_reward_with_nft_is_a_clear_error(tiny_base, target_data, checks, tmp_path,
                                                        capsys):
    assert _train(tiny_base, target_data, tmp_path / "run", "--reward", f"{checks}:half") == 2
    err = capsys.readouterr().err
    assert "checks.py:half: returned 0.5; nft needs binary rewards" in err


def test_a_reward_failing_on_every_answer_stops_the_run_showing_its_traceback_once(
        tiny_base, target_data, checks, tmp_path, capsys):
    assert _train(tiny_base, target_data, tmp_path / "run", "--reward", f"{checks}:broken") != 0
    err = capsys.readouterr().err
    assert "failed on every answer" in err
    assert err.count("ValueError: broken on purpose") == 1
    assert "in broken" in err  # the traceback, with the user's frame


def test_grpo_advantage_of_real_valued_rewards_by_hand():
    """Rewards 0.2, 0.6, 1.0, 0.2: mean 0.5, population std sqrt(0.11)."""
    from nftune.objectives import group_advantage

    r = torch.tensor([0.2, 0.6, 1.0, 0.2], dtype=torch.float64)
    mean, std = torch.full((4,), 0.5, dtype=torch.float64), torch.full(
        (4,), 0.11 ** 0.5, dtype=torch.float64)
    expected = torch.tensor([-0.3, 0.1, 0.5, -0.3], dtype=torch.float64) / 0.11 ** 0.5
    assert torch.allclose(group_advantage(r, mean, True, std), expected)
    assert torch.allclose(group_advantage(r, mean, False, std), expected * 0.11 ** 0.5)
    # binary rewards: the closed form sqrt(r̂(1 − r̂)) is the population std
    b = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    rh = torch.full((4,), 0.25, dtype=torch.float64)
    assert torch.allclose(group_advantage(b, rh, True), group_advantage(b, rh, True,
                                                                        b.std(correction=0)))


def test_the_math_verifier_is_itself_a_reward_function():
    from nftune.reward import math_reward

    rows = [{"answer": "0.5", "strategy": "boxed"}, {"answer": "0.5", "strategy": "boxed"},
            {"answer": "4", "strategy": "answer_line"}]
    assert math_reward(["so \\boxed{\\frac{1}{2}}", "so \\boxed{2}", "x\nAnswer: 4"],
                       rows) == [1.0, 0.0, 1.0]
