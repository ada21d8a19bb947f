"""verl's own actor worker trains with nftune's losses: verl 0.9.1's ``ActorRolloutRefWorker``
(FSDP2 engine, two ranks over gloo, two processes) is built from the example recipe's composed
config with a tiny Qwen2, and ``update_actor`` runs twice on a batch of answers whose
correctness is known, for ``nft`` and ``rft`` (tests/verl_actor_run.py is one rank; the CPU
platform it needs is tests/verl_cpu.py).

The expectation for the first mini-batch comes from a second implementation: nftune's own
update (``nftune.update.update_policy``: Hugging Face forward, left-padded rows, one process)
on the same answers, the same π_old and the same weights, with r and r̂ written down from the
batch by hand. CI sets NFTUNE_REQUIRE_VERL=1, so a missing verl fails there."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("NFTUNE_REQUIRE_VERL"):
    import verl  # noqa: F401 — CI installs the test extra: a missing verl is a failure
else:
    pytest.importorskip("verl", reason="the test extra installs verl")

HERE = Path(__file__).parent
QUESTIONS, K, WORLD, LR = 4, 4, 2, 1e-3
# each question's answers: right (1) or wrong (0); questions 0 and 1 carry no signal
OUTCOMES = {0: [1, 1, 1, 1], 1: [0, 0, 0, 0], 2: [1, 0, 1, 0], 3: [0, 0, 1, 0]}


def make_batch(seed: int = 0) -> dict:
    """Prompts shared within a question, responses of 2–8 tokens, and a fixed perturbation
    that moves π_old off the current policy (so the ratios are not all 1)."""
    rng = random.Random(seed)
    answers = []
    for q in range(QUESTIONS):
        prompt = [rng.randint(3, 60) for _ in range(rng.randint(3, 6))]
        for outcome in OUTCOMES[q]:
            length = rng.randint(2, 8)
            answers.append({"uid": f"q{q}", "prompt": prompt,
                            "response": [rng.randint(3, 60) for _ in range(length)],
                            "score": float(outcome),
                            "shift": [rng.gauss(0.0, 0.3) for _ in range(length)]})
    return {"questions": QUESTIONS, "k": K, "lr": LR, "micro_tokens": 32, "answers": answers}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from nftune.tasks.tiny_model import char_tokenizer, save_model_dir, tiny_qwen2

    tokenizer = char_tokenizer()
    model = tiny_qwen2(tokenizer, hidden=32, layers=2, heads=2, kv_heads=1, max_positions=128)
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("verl-model") / "model")


def run_verl_actor(model_dir: Path, out: Path, loss_mode: str) -> list[dict]:
    out.mkdir(parents=True)
    (out / "batch.json").write_text(json.dumps(make_batch()))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    ranks = [subprocess.Popen([sys.executable, str(HERE / "verl_actor_run.py"), str(rank),
                               str(WORLD), str(port), str(model_dir), str(out), loss_mode],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) for rank in range(WORLD)]
    logs = [p.communicate(timeout=300)[0] for p in ranks]
    for rank, (p, log) in enumerate(zip(ranks, logs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def nftune_first_minibatch(model_dir: Path, batch: dict, old: dict, loss_mode: str) -> dict:
    """nftune's own update on the answers verl's first mini-batch holds: verl gives each rank a
    contiguous chunk of the batch and each rank's mini-batches are contiguous within it."""
    from nftune.config import build_config
    from nftune.policy import load_policy, make_optimizer, make_scheduler
    from nftune.rollout import Rollout
    from nftune.update import update_policy

    answers = batch["answers"]
    per_rank = len(answers) // WORLD
    per_mini = per_rank // 2
    rows = [r * per_rank + j for r in range(WORLD) for j in range(per_mini)]
    # r and r̂ by hand from the outcomes table
    r_hat = {f"q{q}": sum(v) / len(v) for q, v in OUTCOMES.items()}
    prompt_len = max(len(answers[i]["prompt"]) for i in rows)
    width = max(len(answers[i]["response"]) for i in rows)
    ids = torch.zeros(len(rows), prompt_len + width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response_mask = torch.zeros(len(rows), width)
    old_lp = torch.zeros(len(rows), width)
    for n, i in enumerate(rows):
        p, a = answers[i]["prompt"], answers[i]["response"]
        ids[n, prompt_len - len(p): prompt_len] = torch.tensor(p)  # left-padded prompt
        ids[n, prompt_len: prompt_len + len(a)] = torch.tensor(a)
        attention[n, prompt_len - len(p): prompt_len + len(a)] = 1
        response_mask[n, : len(a)] = 1
        old_lp[n, : len(a)] = torch.tensor(old[str(i)])
    uids = [answers[i]["uid"] for i in rows]
    rollout = Rollout(input_ids=ids, attention_mask=attention, prompt_len=prompt_len,
                      response_mask=response_mask, truncated=torch.zeros(len(rows), dtype=bool),
                      group_ids=torch.tensor([int(u[1:]) for u in uids]), texts=[""] * len(rows),
                      old_logprobs=old_lp,
                      reward=torch.tensor([answers[i]["score"] for i in rows]),
                      r_hat=torch.tensor([r_hat[u] for u in uids]))
    cfg = build_config(overrides={"model": str(model_dir), "algo": loss_mode, "minibatches": 1,
                                  "micro_batch_tokens": 10**6, "temperature": 1.0,
                                  "gradient_checkpointing": False})
    cfg.resolve()
    model, _ = load_policy(str(model_dir), torch.device("cpu"))
    optimizer = make_optimizer(model, cfg)
    metrics, _ = update_policy(model, optimizer, make_scheduler(optimizer, cfg), rollout, cfg, 0)
    metrics["r_hat_mean"] = sum(r_hat[u] for u in uids) / len(uids)
    return metrics


@pytest.mark.parametrize("loss_mode", ["nft", "rft"])
def test_verl_actor_worker_trains_with_the_plugin_loss(tiny_model, tmp_path, loss_mode):
    from safetensors.torch import load_file

    from nftune.integrations.verl import decode_outcome

    ranks = run_verl_actor(tiny_model, tmp_path / "run", loss_mode)
    batch = json.loads((tmp_path / "run" / "batch.json").read_text())

    # the plugin's loss is what ran: verl's registry resolved it in the worker process, and
    # the metrics only our loss returns are in the worker's output
    for result in ranks:
        assert result["loss_fn_module"] == "nftune.integrations.verl"
        assert "actor/loss_pos" in result["updates"][0] and "actor/r_hat" in result["updates"][0]

    # verl's driver-side advantages (the recipe's nft estimator) carry r and r̂ as written down
    advantages = ranks[0]["advantages"]
    for a, adv in zip(batch["answers"], advantages, strict=True):
        r, r_hat = decode_outcome(torch.tensor([adv]), torch.ones(1, len(adv)))
        assert r.item() == a["score"]
        outcomes = OUTCOMES[int(a["uid"][1:])]
        assert r_hat.item() == pytest.approx(sum(outcomes) / len(outcomes), abs=1e-6)

    # the first mini-batch's loss and gradient norm equal nftune's own update on the same
    # answers, π_old and weights (float32, two forward implementations; measured: within 1e-7
    # relative)
    first = ranks[0]["updates"][0]
    ours = nftune_first_minibatch(tiny_model, batch, ranks[0]["old_log_probs"], loss_mode)
    assert ours["grad_norm"] > 1e-2  # a real signal, not 0 == 0
    assert abs(ours["loss"]) > 1e-3
    assert first["loss"][0] == pytest.approx(ours["loss"], rel=1e-5, abs=1e-7)
    assert first["grad_norm"][0] == pytest.approx(ours["grad_norm"], rel=1e-5)
    assert first["actor/r_hat"][0] == pytest.approx(ours["r_hat_mean"], abs=1e-6)
    assert len(first["loss"]) == 2  # two mini-batches, two optimizer steps per update_actor

    # both ranks report the same and hold the same full weights after every call
    for mine, theirs in zip(ranks[0]["updates"], ranks[1]["updates"], strict=True):
        for key in ("loss", "grad_norm", "lr", "actor/loss_pos", "actor/r_hat"):
            assert mine[key] == theirs[key], key
    weights = {(r, s): load_file(str(tmp_path / "run" / f"rank{r}-step{s}.safetensors"))
               for r in range(WORLD) for s in range(3)}
    for step in range(3):
        for name, value in weights[(0, step)].items():
            assert torch.equal(value, weights[(1, step)][name]), (step, name)

    def moved(step: int) -> float:
        return max((weights[(0, step)][k] - weights[(0, 0)][k]).abs().max().item()
                   for k in weights[(0, 0)])

    # verl's warm-up (lr_warmup_steps, constant schedule) counts update_actor calls — rollout
    # steps, not optimizer steps — and starts at 0: the first rollout step trains at lr 0,
    # the second at lr / warm-up
    warmup = 10  # the recipe's actor.optim.lr_warmup_steps
    assert moved(1) == 0.0
    assert moved(2) > 1e-5
    assert ranks[0]["updates"][0]["lr"] == [pytest.approx(LR * 1 / warmup)]
    assert ranks[0]["updates"][1]["lr"] == [pytest.approx(LR * 2 / warmup)]
