"""Two ranks on CPU (torchrun, gloo) against one process: the same global batch gives the same
update, a run with two ranks resumes exactly after a kill, and a rank that fails ends the run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import same_runs
from safetensors.torch import load_file

from nftune.checkpoint import load_state

HERE = Path(__file__).parent


def env() -> dict[str, str]:
    # one thread a rank: two ranks on two cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(*args, ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={ranks}", *map(str, args)]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize(("algo", "minibatches", "steps", "strategy", "lora_rank"), [
    ("nft", 2, 3, "ddp", 0), ("dapo", 1, 2, "ddp", 0), ("nft", 2, 2, "ddp", 4),
    ("nft", 2, 1, "fsdp", 0), ("dapo", 1, 1, "fsdp", 0)])
def test_two_ranks_update_as_one_process_on_the_same_global_batch(
        tiny_base, arithmetic_files, tmp_path, algo, minibatches, steps, strategy, lora_rank):
    worker = [HERE / "distributed_update.py", tiny_base, arithmetic_files["train"], tmp_path,
              algo, minibatches, steps, strategy, lora_rank]
    single = run([sys.executable, *map(str, worker)])
    assert single.returncode == 0, single.stderr[-3000:]
    double = run(torchrun(*worker))
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "single.json").read_text())
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    updated = 0
    for step, expected in enumerate(one["rows"]):
        rows = [rank["rows"][step] for rank in ranks]
        # each rank trained on its share only, the shares add up to the global batch
        assert sum(r["local_answers"] for r in rows) == expected["local_answers"]
        assert all(0 < r["local_answers"] < expected["local_answers"] for r in rows) or \
            expected["groups"] == 1
        if strategy == "ddp":  # the replicas hold the same weights after every step
            assert rows[0]["weights"] == rows[1]["weights"]
        else:  # the shards, gathered on rank 0, are one process's weights
            assert rows[1]["weights"] is None
            assert relative(rows[0]["weight_sum"], expected["weight_sum"]) < 1e-6
        for r in rows:
            assert r["metrics"]["optimizer_steps"] == expected["metrics"]["optimizer_steps"]
            for key in ("loss", "loss_pos", "loss_neg", "grad_norm", "grad_share_wrong"):
                if key in expected["metrics"]:
                    assert relative(r["metrics"][key], expected["metrics"][key]) < 1e-5, \
                        (step, key, r["metrics"][key], expected["metrics"][key])
        updated += expected["metrics"]["optimizer_steps"]
    assert updated, "no update happened: nothing was compared"
    # evaluation split across the ranks: the numbers of one process
    assert ranks[0]["eval"] == ranks[1]["eval"] == one["eval"]


RUN = ["--template", "raw", "--steps", "4", "--prompts-per-step", "4",
       "--answers-per-prompt", "4", "--max-new-tokens", "24", "--lr", "2e-4", "--minibatches",
       "2", "--save-every", "2", "--verify-workers", "1", "--seed", "3", "--no-progress",
       "--device", "cpu"]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_run_killed_and_resumed_continues_exactly(tiny_base, arithmetic_files,
                                                           tmp_path, strategy):
    args = ["-m", "nftune", "train", "--model", tiny_base, "--train-data",
            arithmetic_files["train"], *RUN, "--distributed-strategy", strategy,
            "--eval-data", arithmetic_files["test"], "--eval-limit", "7", "--eval-every", "2"]
    straight = tmp_path / "straight"
    done = run(torchrun(*args, "--output-dir", straight))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: final model") == 1  # rank 0 speaks for the run

    killed = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(*args, "--output-dir", killed), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step-2" / "manifest.json").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    assert not (killed / "final").exists()
    # written once, by rank 0, with each rank's random state
    state = load_state(killed / "checkpoints" / "step-2")
    assert len(state["rng"]["ranks"]) == 2
    assert not torch.equal(state["rng"]["ranks"][0]["torch"], state["rng"]["ranks"][1]["torch"])
    resumed = run(torchrun(*args, "--output-dir", killed, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # every step's metrics once
    assert "eval/test/avg@1" in b[1] and "eval/test/avg@1" in b[3]
    assert any(r["optimizer_steps"] for r in a[2:]), "nothing trained after the checkpoint"
    assert same_runs(a, b)
    wa = load_file(straight / "final" / "model.safetensors")
    wb = load_file(killed / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (straight / "train.log").exists() and not list(straight.glob("*rank*"))


def test_a_rank_that_raises_ends_the_whole_run_with_its_error(tiny_base, arithmetic_files,
                                                              tmp_path):
    checks = tmp_path / "checks.py"
    checks.write_text("import os\n\n\ndef correct(responses, rows):\n"
                      "    if os.environ.get('RANK') == '1':\n"
                      "        raise ValueError('rank one cannot grade')\n"
                      "    return [0.0] * len(responses)\n")
    start = time.time()
    failed = run(torchrun("-m", "nftune", "train", "--model", tiny_base, "--train-data",
                          arithmetic_files["train"], *RUN, "--reward", f"{checks}:correct",
                          "--output-dir", tmp_path / "run"), timeout=200)
    assert failed.returncode != 0
    assert "rank one cannot grade" in failed.stderr
    assert time.time() - start < 120  # no rank waited out the collectives' timeout
    assert not (tmp_path / "run" / "final").exists()


def test_fsdp_with_lora_is_refused_with_a_clear_message(tiny_base, arithmetic_files,
                                                         tmp_path):
    refused = run(torchrun("-m", "nftune", "train", "--model", tiny_base,
                           "--train-data", arithmetic_files["train"], *RUN,
                           "--distributed-strategy", "fsdp", "--lora-rank", "4",
                           "--output-dir", tmp_path / "run"), timeout=200)
    assert refused.returncode != 0
    assert "fsdp shards full fine-tunes" in refused.stderr
    assert not (tmp_path / "run" / "final").exists()
