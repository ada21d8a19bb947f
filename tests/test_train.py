"""The trainer on a tiny model: resume after SIGKILL, degenerate rewards, NaN, errors, memory."""

import copy
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import run_cli, same_runs, tiny_run_config
from safetensors.torch import load_file

from nftune import train as train_module
from nftune import update as update_module
from nftune.objectives import overlong_penalty
from nftune.rollout import Rollout, concat_rollouts
from nftune.train import train
from nftune.update import TrainingError, micro_batches

config = tiny_run_config  # (tiny_base, files, out, **overrides)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "nftune.cli", *args], capture_output=True,
                          text=True, **kw)


def test_every_algorithm_runs_and_logs_the_documented_metrics(tiny_base, arithmetic_files,
                                                              tmp_path):
    required = {"step", "reward_mean", "reward_mean_trained", "kept_fraction", "entropy",
                "response_length", "truncated_fraction", "loss", "loss_pos", "loss_neg",
                "ratio_mean", "ratio_max", "clip_fraction", "grad_norm", "lr",
                "time_generate_s", "time_verify_s", "time_update_s", "tokens_per_s"}
    for algo in ["nft", "rft", "grpo", "dr_grpo", "dapo", "infonca"]:
        out = tmp_path / algo
        # refill rounds for every algorithm, so each sees a mixed group whatever the device's
        # random stream (on CUDA, GRPO's two plain batches once held none)
        train(config(tiny_base, arithmetic_files, out, algo=algo, steps=2, prompts_per_step=8,
                     max_gen_batches=8, dynamic_sampling=True), progress=False)
        rows = read_metrics(out / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2]
        updated = [r for r in rows if r.get("optimizer_steps", 0) > 0]
        assert updated, f"{algo}: no update happened"
        expected = required - {"clip_fraction"} if algo == "infonca" else required
        assert expected <= set(updated[0]), (algo, expected - set(updated[0]))
        assert (algo == "infonca") != ("clip_fraction" in updated[0])  # no placeholder
        assert (out / "final" / "model.safetensors").exists()
        assert (out / "config.yaml").exists() and (out / "train.log").exists()


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_base, arithmetic_files,
                                                           tmp_path):
    args = ["train", "--model", str(tiny_base), "--train-data", str(arithmetic_files["train"]),
            "--template", "raw", "--steps", "6", "--prompts-per-step", "4",
            "--answers-per-prompt", "4", "--max-new-tokens", "24", "--lr", "1e-3",
            "--minibatches", "2", "--save-every", "2", "--keep-checkpoints", "2",
            "--verify-workers", "1", "--no-progress", "--seed", "3"]
    straight = tmp_path / "straight"
    done = cli(*args, "--output-dir", str(straight))
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "nftune.cli", *args, "--output-dir",
                             str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-4").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    resumed = cli(*args, "--output-dir", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr

    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert same_runs(a, b)
    wa = load_file(straight / "final" / "model.safetensors")
    wb = load_file(killed / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # only the last keep_checkpoints step checkpoints remain
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-2", "step-4"]


@pytest.mark.parametrize("algo", ["nft", "grpo"])
def test_a_model_that_is_never_right_changes_nothing(tiny_base, tmp_path, algo):
    impossible = tmp_path / "impossible.jsonl"
    impossible.write_text("".join(json.dumps({"id": str(i), "problem": f"{i}+{i}",
                                              "answer": "98765432"}) + "\n" for i in range(20)))
    out = tmp_path / "run"
    train(config(tiny_base, {"train": impossible}, out, algo=algo, steps=2), progress=False)
    rows = read_metrics(out / "metrics.jsonl")
    assert all(r["reward_mean"] == 0 and r["optimizer_steps"] == 0 for r in rows)
    if algo == "nft":  # dynamic sampling: logged that nothing was kept
        assert all(r["kept_fraction"] == 0 for r in rows)
        assert "nothing kept" in (out / "train.log").read_text()
    before = load_file(Path(tiny_base) / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nan_loss_skips_then_stops_keeping_the_last_checkpoint(tiny_base, arithmetic_files,
                                                               tmp_path, monkeypatch):
    real = update_module.objective_loss
    calls = {"n": 0}

    def poisoned(*args, **kw):
        loss, metrics = real(*args, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 2 else loss), metrics

    monkeypatch.setattr(update_module, "objective_loss", poisoned)
    out = tmp_path / "run"
    cfg = config(tiny_base, arithmetic_files, out, steps=10, minibatches=1, save_every=1,
                 prompts_per_step=8, max_gen_batches=8, micro_batch_tokens=100_000,
                 max_nan_steps=3)
    with pytest.raises(TrainingError, match="3 optimizer steps in a row"):
        train(cfg, progress=False)
    log = (out / "train.log").read_text()
    assert log.count("optimizer step skipped") == 3
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints and not (out / "final").exists()
    weights = load_file(out / "checkpoints" / checkpoints[-1] / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_clear_errors_without_traceback(tiny_base, arithmetic_files, tmp_path):
    cases = [
        (["--model", str(tmp_path / "missing"), "--train-data", str(arithmetic_files["train"])],
         "not a model directory"),
        (["--model", str(tiny_base), "--train-data", str(tmp_path / "nope.jsonl")],
         "nope.jsonl: no such file"),
        (["--model", str(tiny_base), "--train-data", str(arithmetic_files["train"]),
          "--prompts-per-stp", "3"], "did you mean prompts_per_step"),
    ]
    for args, message in cases:
        done = run_cli("train", *args, "--output-dir", str(tmp_path / "o"))
        assert done.returncode != 0
        assert message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_one_model_copy_in_memory(tiny_base, arithmetic_files, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    loads = []
    real_load = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *a, **k):
        loads.append(a)
        return real_load(cls, *a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    seen = []
    real_update = train_module.update_policy  # as the loop calls it

    def update_and_count(model, *a, **k):
        result = real_update(model, *a, **k)
        shape = model.get_input_embeddings().weight.shape
        gc.collect()
        seen.append(sum(1 for o in gc.get_objects()
                        if isinstance(o, torch.Tensor) and o.shape == shape))
        return result

    monkeypatch.setattr(train_module, "update_policy", update_and_count)
    train(config(tiny_base, arithmetic_files, tmp_path / "run", steps=2, prompts_per_step=8,
                 max_gen_batches=8), progress=False)
    assert len(loads) == 1
    # the embedding matrix, its gradient and AdamW's two moments: no second model
    assert seen and max(seen) <= 4


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([10, 30, 35, 40])
    # L_max = 40, L_cache = 10: no penalty up to 30, then linear to −1 at 40
    assert overlong_penalty(lengths, 40, 0.25).tolist() == [0.0, 0.0, -0.5, -1.0]


def test_micro_batches_respect_the_token_budget_and_groups():
    attn = torch.ones(6, 10, dtype=torch.long)
    attn[:, 8:] = 0
    r = Rollout(input_ids=torch.zeros(6, 10, dtype=torch.long), attention_mask=attn,
                prompt_len=4, response_mask=attn[:, 4:], truncated=torch.zeros(6, dtype=bool),
                group_ids=torch.tensor([0, 0, 1, 1, 2, 2]), texts=[""] * 6)
    assert micro_batches(r, 16) == [[0, 1], [2, 3], [4, 5]]
    assert micro_batches(r, 24, keep_groups=True) == [[0, 1], [2, 3], [4, 5]]
    assert micro_batches(r, 1000) == [[0, 1, 2, 3, 4, 5]]
    merged = concat_rollouts([r.select([2, 3]), r.select([4, 5])], pad_id=0)
    assert merged.group_ids.tolist() == [0, 0, 1, 1]


def test_micro_batches_pack_similar_lengths_together():
    lengths = [2, 9, 3, 8, 2, 9]
    attn = (torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]).long()
    r = Rollout(input_ids=torch.zeros(6, 10, dtype=torch.long), attention_mask=attn,
                prompt_len=1, response_mask=attn[:, 1:], truncated=torch.zeros(6, dtype=bool),
                group_ids=torch.arange(6), texts=[""] * 6)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    # longest first: 9, 9 | 8, 3 | 2, 2 — by hand, budget 20
    assert micro_batches(r, 20) == [[1, 5], [3, 2], [0, 4]]
    assert padded(micro_batches(r, 20)) == 18 + 16 + 4
    # in arrival order: 2, 9 | 3, 8 | 2, 9
    assert micro_batches(r, 20, by_length=False) == [[0, 1], [2, 3], [4, 5]]
    assert padded(micro_batches(r, 20, by_length=False)) == 18 + 16 + 18


def test_old_logprobs_are_packed_as_the_update_packs_them():
    """π_old's micro-batches are the update's: mini-batches first (questions 0–1 | 2, as
    tensor_split deals 3 questions to 2), then packing by length within each. By hand, lengths
    [2, 9, 3, 8, 2, 9], questions [0, 0, 1, 1, 2, 2], budget 20: mini-batch 1 holds rows 0–3,
    longest first: 9, 8 (2 × 9 = 18) | 3, 2; mini-batch 2 rows 4–5: 9, 2. Packed over the whole
    rollout instead, rows 1 and 5 would share a micro-batch."""
    from nftune.config import TrainConfig
    from nftune.update import update_packing

    lengths = [2, 9, 3, 8, 2, 9]
    attn = (torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]).long()
    r = Rollout(input_ids=torch.zeros(6, 10, dtype=torch.long), attention_mask=attn,
                prompt_len=1, response_mask=attn[:, 1:], truncated=torch.zeros(6, dtype=bool),
                group_ids=torch.tensor([0, 0, 1, 1, 2, 2]), texts=[""] * 6)
    cfg = TrainConfig(model="unused", minibatches=2, micro_batch_tokens=20)
    assert update_packing(r, 3, cfg) == [[1, 3], [2, 0], [5, 4]]
    assert micro_batches(r, 20) == [[1, 5], [3, 2], [0, 4]]  # what π_old used to run on
    # a loss over whole groups keeps a question's answers together, here too
    assert update_packing(r, 3, TrainConfig(model="unused", algo="infonca", minibatches=2,
                                            micro_batch_tokens=20)) == [[0, 1], [2, 3], [4, 5]]


def _four_mixed_groups(tiny_base, arithmetic_files):
    """The tiny base and a rollout of 4 questions × 4 answers sampled from it (π_old recorded),
    with rewards set by hand so that every group is mixed (r̂ = 1/2, 3/4, 1/4, 1/4)."""
    from nftune.data import format_prompt, load_questions
    from nftune.policy import load_policy
    from nftune.rollout import generate_rollout

    model, tokenizer = load_policy(str(tiny_base), torch.device("cpu"))
    questions = load_questions(str(arithmetic_files["train"])).questions[:4]
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, [format_prompt(q.problem, "raw")
                                                  for q in questions], 4, max_new_tokens=40,
                               record_logprobs=True)
    rollout.reward = torch.tensor([1., 0, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0])
    rollout.r_hat = rollout.reward.view(4, 4).mean(1).repeat_interleave(4)
    return model, rollout


@pytest.mark.parametrize("algo", ["nft", "grpo"])
def test_the_update_does_not_depend_on_micro_batching(tiny_base, arithmetic_files, tmp_path,
                                                      algo):
    """One SGD step (lr 1, no clipping): parameter change = −gradient, which must be the same
    whether the mini-batch runs as one pass or as length-sorted micro-batches."""
    from nftune.policy import make_scheduler
    from nftune.update import update_policy

    model, rollout = _four_mixed_groups(tiny_base, arithmetic_files)
    assert len(set(rollout.response_lengths.tolist())) > 2
    deltas = []
    for budget in (10**6, 150):
        cfg = config(tiny_base, arithmetic_files, tmp_path, algo=algo, minibatches=1,
                     grad_clip=0.0, warmup_steps=0, micro_batch_tokens=budget)
        cfg.resolve()
        policy = copy.deepcopy(model)
        before = [p.detach().clone() for p in policy.parameters()]
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        update_policy(policy, optimizer, make_scheduler(optimizer, cfg), rollout, cfg, 0)
        deltas.append(torch.cat([(p.detach() - b).flatten()
                                 for p, b in zip(policy.parameters(), before, strict=True)]))
    assert len(micro_batches(rollout, 150)) >= 3  # rows regrouped by length
    assert deltas[0].abs().max() > 1e-4  # the step did something
    torch.testing.assert_close(deltas[1], deltas[0], atol=1e-6, rtol=1e-5)


def test_grad_share_wrong_matches_the_hand_computed_weights(tiny_base, arithmetic_files,
                                                            tmp_path):
    """grad_share_wrong = Σ over wrong answers' tokens of |∂loss/∂log π(a_t)| / Σ over all
    tokens. On-policy (one mini-batch, R = 1) NFT with ω = 1 − r̂ and Dr.GRPO weigh a right
    answer's token by (1 − r̂)/N and a wrong one's by r̂/N (Prop. 4.1/4.2), so the share is
    Σ_wrong len·r̂ / (Σ_right len·(1 − r̂) + Σ_wrong len·r̂) from the answers' lengths; RFT
    gives wrong answers no weight."""
    from nftune.policy import make_scheduler
    from nftune.update import update_policy

    model, rollout = _four_mixed_groups(tiny_base, arithmetic_files)
    lengths = rollout.response_lengths.float()
    right = rollout.reward == 1
    wrong_weight = (lengths * rollout.r_hat)[~right].sum()
    expected = wrong_weight / ((lengths * (1 - rollout.r_hat))[right].sum() + wrong_weight)
    for algo, share in (("nft", expected.item()), ("dr_grpo", expected.item()), ("rft", 0.0)):
        cfg = config(tiny_base, arithmetic_files, tmp_path, algo=algo, minibatches=1,
                     warmup_steps=0)
        cfg.resolve()
        policy = copy.deepcopy(model)
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
        metrics, _ = update_policy(policy, optimizer, make_scheduler(optimizer, cfg), rollout,
                                   cfg, 0)
        assert metrics["grad_share_wrong"] == pytest.approx(share, rel=1e-4, abs=1e-7), algo


def test_bf16_autocast_path(tiny_base, arithmetic_files, tmp_path):
    out = tmp_path / "bf16"
    train(config(tiny_base, arithmetic_files, out, steps=1, prompts_per_step=8,
                 max_gen_batches=8, bf16=True), progress=False)
    row = read_metrics(out / "metrics.jsonl")[0]
    assert row["optimizer_steps"] > 0 and row["grad_norm"] == row["grad_norm"]  # not NaN
    weights = load_file(out / "final" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())  # fp32 master weights


def test_recompute_path_times_the_old_logprob_forward_apart(tiny_base, arithmetic_files,
                                                            tmp_path):
    out = tmp_path / "run"
    train(config(tiny_base, arithmetic_files, out, steps=2, old_logprobs="recompute"),
          progress=False)
    rows = read_metrics(out / "metrics.jsonl")
    assert any(r["kept_fraction"] > 0 for r in rows)
    for row in rows:
        # the π_old forward runs on kept answers only, and is not inside generation time
        assert (row["time_old_logprobs_s"] > 0) == (row["kept_fraction"] > 0)
        spent = (row["time_generate_s"] + row["time_old_logprobs_s"] + row["time_verify_s"]
                 + row["time_update_s"])
        assert row["tokens_per_s"] == pytest.approx(row["generated_tokens"] / spent)
