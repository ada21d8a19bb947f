"""Dynamic sampling through verl's own code: the v1 trainer's replay buffer, built from the
example recipe (``algorithm.filter_groups``: enable, metric ``acc``), keeps only groups whose
answers are neither all right nor all wrong (0 < r̂ < 1) and refills the batch with new
questions. tests/verl_replay_run.py runs it (local Ray, TransferQueue) in its own process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("NFTUNE_REQUIRE_VERL"):
    import verl  # noqa: F401 — CI installs the test extra: a missing verl is a failure
else:
    pytest.importorskip("verl", reason="the test extra installs verl")

# the outcomes of the answers to each question, in the order the rollout produces them
GROUPS = [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0],  # the first batch
          [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1], [0, 1, 1, 1],  # refills
          [1, 1, 1, 1], [0, 0, 1, 0]]
BATCH = 4


def test_recipes_filter_groups_keeps_mixed_groups_and_refills(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"groups": GROUPS, "batch_size": BATCH}))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "verl_replay_run.py"),
                           str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["replay_buffer"] == "verl.trainer.ppo.v1.replay_buffer.ReplayBuffer"
    assert result["filter_metric"] == "acc"

    # by hand: the first batch has two uniform groups (q0 all right, q2 all wrong); verl's sync
    # mode asks for two new questions per evicted one (4); of those q5 is uniform again, and
    # four of the five mixed questions on hand fill the batch (which four: verl orders them by
    # the step that asked for them, all step 1 here, so any)
    mixed = {f"q{i}" for i, g in enumerate(GROUPS) if 0 < sum(g) < len(g)}
    assert result["refills"] == [4]
    assert result["produced"] == [f"q{i}" for i in range(8)]
    batch = result["batch"]
    assert len(batch) == BATCH
    assert set(batch) <= mixed
    for uid, outcomes in batch.items():  # every answer of a kept question reaches the update
        assert outcomes == [bool(x) for x in GROUPS[int(uid[1:])]], uid
        assert 0 < sum(outcomes) < len(outcomes)
    metrics = result["metrics"]
    assert metrics["training/filter_groups/evicted_samples"] == 3  # q0, q2, q5
    assert metrics["training/filter_groups/discarded_surplus_samples"] == 1  # 5 mixed, 4 kept
