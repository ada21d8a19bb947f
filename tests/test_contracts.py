"""Each stage's contract, with expectations worked out by hand (not by re-running the code):
reward assignment and dynamic sampling, the response mask, the optimizer's learning rate and
gradient clipping, both old-log-prob paths, evaluation grading, CLI validation."""

import math

import pytest
import torch
from helpers import tiny_run_config

from nftune.config import build_config
from nftune.data import PromptSampler, Question
from nftune.rollout import Rollout, generate_rollout
from nftune.train import collect_rollout, train


def fake_rollout(n_questions: int, k: int, truncated: list[bool]) -> Rollout:
    b = n_questions * k
    return Rollout(
        input_ids=torch.ones(b, 3, dtype=torch.long), attention_mask=torch.ones(b, 3),
        prompt_len=1, response_mask=torch.ones(b, 2, dtype=torch.long),
        truncated=torch.tensor(truncated), group_ids=torch.arange(n_questions).repeat_interleave(k),
        texts=[f"answer {i}" for i in range(b)], old_logprobs=torch.zeros(b, 2),
        entropy=torch.zeros(b, 2))


class ScriptedVerifier:
    """Verdicts fixed in advance, handed out in call order."""

    def __init__(self, rounds: list[list[bool]]):
        self.rounds = list(rounds)

    def verify(self, responses, golds):
        verdicts = self.rounds.pop(0)
        assert len(verdicts) == len(responses)
        return verdicts


def scripted_run(rounds, truncated_rounds, k, **cfg):
    rollouts = [fake_rollout(len(v) // k, k, t) for v, t in zip(rounds, truncated_rounds,
                                                               strict=True)]
    questions = [Question(str(i), f"{i}+0", str(i), "t") for i in range(100)]
    config = build_config(None, dict(model="m", train_data="d", template="raw",
                                     answers_per_prompt=k, **cfg))
    return collect_rollout(StubModel(), StubTokenizer(), questions,
                           PromptSampler(len(questions), 0), ScriptedVerifier(rounds), config,
                           engine=ScriptedEngine(rollouts))


class ScriptedEngine:
    """Rollouts fixed in advance, handed out in call order."""

    def __init__(self, rollouts):
        self.rollouts = rollouts

    def generate(self, prompts, k, **kw):
        return self.rollouts.pop(0)

    def finish_rollout(self):
        pass


class StubModel:
    def eval(self):
        return self


class StubTokenizer:
    pad_token_id, eos_token_id = 0, 1


def test_rewards_truncation_and_r_hat_by_hand():
    # 3 questions × K = 4, verdicts in question × K order; the 2nd answer of question 0 is right
    # but truncated, so it counts as wrong
    verdicts = [True, True, False, False,   False, False, False, False,   True, True, True, True]
    cut = [False, True, False, False] + [False] * 8
    batch, stats = scripted_run([verdicts], [cut], k=4, prompts_per_step=3,
                                dynamic_sampling=False, minibatches=1)
    batch_correct = batch.reward.tolist()
    assert batch_correct == [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert batch.r_hat.tolist() == [0.25] * 4 + [0.0] * 4 + [1.0] * 4
    assert stats.reward_mean == pytest.approx(5 / 12)
    assert stats.truncated_fraction == pytest.approx(1 / 12)


def test_dynamic_sampling_keeps_exactly_the_mixed_groups_and_refills():
    k = 2
    # round 1: 4 questions, r̂ = 1/2, 0, 1, 1/2 → keeps questions 0 and 3 (2 of 4 wanted)
    # round 2: asks for ceil(2 / (2/4)) = 4 more, capped at 4: r̂ = 1/2, 1/2, 0, 0 → 2 more
    round1 = [True, False, False, False, True, True, False, True]
    round2 = [False, True, True, False, False, False, False, False]
    batch, stats = scripted_run([round1, round2], [[False] * 8, [False] * 8], k=k,
                                prompts_per_step=4, dynamic_sampling=True, max_gen_batches=4,
                                minibatches=1)
    assert stats.gen_batches == 2 and stats.generated_answers == 16
    assert len(batch) == 8 and batch.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert batch.r_hat.tolist() == [0.5] * 8
    assert batch.reward.tolist() == [1, 0, 0, 1, 0, 1, 1, 0]
    assert stats.kept_fraction == pytest.approx(4 / 8)


@pytest.fixture(scope="module")
def policy(tiny_base):
    from nftune.policy import load_policy

    return load_policy(str(tiny_base), torch.device("cpu"))


def test_mask_runs_through_the_first_eos_and_truncated_means_no_eos(policy):
    from nftune.data import format_prompt
    from nftune.tasks.arithmetic import make_questions

    model, tokenizer = policy
    eos = tokenizer.eos_token_id
    prompts = [format_prompt(q.problem, "raw") for q in make_questions(8, "test", 3, 1)]
    seen = set()
    for limit in (10, 40):  # most answers cut off at 10 tokens; most finish within 40
        torch.manual_seed(0)
        rollout = generate_rollout(model, tokenizer, prompts, 2, max_new_tokens=limit)
        response = rollout.input_ids[:, rollout.prompt_len:]
        for row in range(len(rollout)):
            tokens = response[row].tolist()
            n = int(rollout.response_mask[row].sum())
            assert rollout.response_mask[row, :n].all()
            assert not rollout.response_mask[row, n:].any()
            if rollout.truncated[row]:
                assert n == limit and eos not in tokens[:n]
            else:  # EOS included, and it is the first one
                assert tokens[n - 1] == eos and eos not in tokens[: n - 1]
            seen.add(bool(rollout.truncated[row]))
    assert seen == {True, False}


def _run(tiny_base, arithmetic_files, out, **kw):
    train(tiny_run_config(tiny_base, arithmetic_files, out, **{
        "minibatches": 1, "seed": 2, "max_gen_batches": 8, **kw}), progress=False)
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_learning_rate_follows_warmup_and_cosine_by_hand(tiny_base, arithmetic_files, tmp_path):
    rows = _run(tiny_base, arithmetic_files, tmp_path / "run", steps=5, minibatches=2,
                warmup_steps=5, lr=1e-3, lr_schedule="cosine")
    taken, logged = 0, []
    for row in rows:
        taken += row["optimizer_steps"]
        # the lr logged after `taken` optimizer steps: warm-up (s + 1)/5 for s < 5, then
        # ½(1 + cos(π (s − 5)/(10 − 5))) with 10 = steps × minibatches
        s = taken
        factor = (s + 1) / 5 if s < 5 else 0.5 * (1 + math.cos(math.pi * (s - 5) / 5))
        assert row["lr"] == pytest.approx(1e-3 * factor), row["step"]
        logged.append(s)
    assert min(logged) < 4 and max(logged) > 5  # both phases were seen


def test_gradient_clipping_bounds_the_gradient_the_optimizer_sees(tiny_base, arithmetic_files,
                                                                   tmp_path, monkeypatch):
    seen = []
    real_step = torch.optim.AdamW.step

    def spying_step(self, *args, **kw):
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])).item())
        return real_step(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spying_step)
    rows = _run(tiny_base, arithmetic_files, tmp_path / "run", grad_clip=1e-3)
    assert seen and max(seen) <= 1e-3 * (1 + 1e-4)
    assert max(r.get("grad_norm", 0) for r in rows) > 1e-3  # logged before clipping


@pytest.mark.parametrize("source", ["generate", "recompute"])
def test_both_old_logprob_paths_give_an_on_policy_first_step(tiny_base, arithmetic_files,
                                                              tmp_path, source):
    # one mini-batch per rollout: the only optimizer step of each rollout is on-policy, so
    # π_θ / π_old = 1 on every token and NFT's loss is 0, whichever path made π_old
    rows = _run(tiny_base, arithmetic_files, tmp_path / source, old_logprobs=source)
    updated = [r for r in rows if r.get("optimizer_steps", 0) > 0]
    assert updated
    for row in updated:
        assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        assert row["ratio_max"] == pytest.approx(1.0, abs=1e-3)
        assert abs(row["loss"]) < 1e-4
        assert 0 < row["entropy"] < math.log(100)  # an entropy: positive, below log |V|


def test_evaluation_counts_truncated_answers_wrong():
    from nftune.evaluate import grade_items
    from nftune.verify import Verifier

    qs = [Question("a", "1+1", "2", "t"), Question("b", "2+2", "4", "t")]
    responses = [["Answer: 2", "Answer: 2"], ["Answer: 4", "Answer: 5"]]
    with Verifier(workers=0) as v:
        result = grade_items("t", qs, responses, v, truncated=[[False, True], [False, False]])
    assert [i["correct"] for i in result.items] == [[True, False], [True, False]]
    assert result.avg_at_k == pytest.approx(2 / 4)


def test_each_benchmark_is_prompted_and_graded_as_the_paper_does():
    from nftune.data import strategy_for
    from nftune.evaluate import benchmark_template

    expected = {"aime24": "answer_line", "aime25": "answer_line", "amc23": "answer_line",
                "math500": "boxed", "olympiadbench": "boxed", "minerva": "boxed"}
    assert {name: strategy_for(benchmark_template(name, None)) for name in expected} == expected
    assert benchmark_template("aime24", "boxed") == "boxed"  # an explicit template wins


def test_cli_rejects_unknown_algorithms_before_reading_anything(capsys):
    from nftune.cli import main

    assert main(["compare", "--algos", "nft,ppo", "--config", "/nonexistent.yaml"]) == 2
    err = capsys.readouterr().err
    assert "--algos: unknown ['ppo']" in err


def test_the_vllm_engine_without_vllm_names_the_extra(tiny_base, arithmetic_files, tmp_path):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    from helpers import run_cli

    result = run_cli("train", "--model", tiny_base, "--train-data", arithmetic_files["train"],
                     "--template", "raw", "--rollout-engine", "vllm",
                     "--output-dir", tmp_path / "run", "--no-progress")
    assert result.returncode == 2
    assert "pip install -e '.[vllm]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
