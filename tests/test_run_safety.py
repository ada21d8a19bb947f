"""Runs a hostile or unlucky user meets: planted pickles, damaged checkpoints, torn metrics,
changed configs on resume, nonsense settings, Ctrl-C."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_run_config

from nftune.checkpoint import MANIFEST, CheckpointError, sha256_file
from nftune.config import build_config
from nftune.train import train


def config(tiny_base, files, out, **kw):
    return tiny_run_config(tiny_base, files, out, **{
        "steps": 4, "save_every": 1, "keep_checkpoints": 3, "seed": 5, **kw})


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


@pytest.fixture(scope="module")
def finished_run(tiny_base, arithmetic_files, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints after steps 1, 2 and 3."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(config(tiny_base, arithmetic_files, out), progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["step-1", "step-2", "step-3"]
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


class _Payload:
    """Unpickling this creates a file: proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _rewrite_manifest(checkpoint: Path) -> None:
    """What an attacker who edits a checkpoint would do: make the manifest match."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"] = {p.relative_to(checkpoint).as_posix():
                         {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                         for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


# --- 1. nothing from a run directory is executed ---------------------------------------------


def test_planted_pickles_beside_a_checkpoint_are_never_loaded(run_copy, tiny_base,
                                                              arithmetic_files, tmp_path):
    marker = tmp_path / "pwned"
    for checkpoint in (run_copy / "checkpoints").iterdir():
        for name in ("trainer_state.pt", "pytorch_model.bin", "optimizer.pt", "rng_state.pth",
                     "training_args.bin"):
            torch.save({"step": _Payload(marker)}, checkpoint / name)
        _rewrite_manifest(checkpoint)
    train(config(tiny_base, arithmetic_files, run_copy), resume=True, progress=False)
    assert not marker.exists()
    assert steps_logged(run_copy) == [1, 2, 3, 4]


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json",
                                  "tokenizer_config.json", "trainer_state.json",
                                  "trainer_state.safetensors", MANIFEST])
def test_every_checkpoint_file_replaced_by_a_pickle_runs_nothing(run_copy, tiny_base,
                                                                 arithmetic_files, tmp_path,
                                                                 name):
    marker = tmp_path / "pwned"
    for checkpoint in (run_copy / "checkpoints").iterdir():
        (checkpoint / name).write_bytes(pickle.dumps(_Payload(marker)))
        if name != MANIFEST:
            _rewrite_manifest(checkpoint)
    with pytest.raises((CheckpointError, ValueError, OSError)):
        train(config(tiny_base, arithmetic_files, run_copy), resume=True, progress=False)
    assert not marker.exists()


def test_a_model_swapped_for_a_pickle_weights_file_is_refused(run_copy, tiny_base,
                                                              arithmetic_files, tmp_path):
    marker = tmp_path / "pwned"
    for checkpoint in (run_copy / "checkpoints").iterdir():
        (checkpoint / "model.safetensors").unlink()
        torch.save({"w": _Payload(marker)}, checkpoint / "pytorch_model.bin")
        _rewrite_manifest(checkpoint)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        train(config(tiny_base, arithmetic_files, run_copy), resume=True, progress=False)
    assert not marker.exists()


# --- 7. resume checks what it finds -----------------------------------------------------------


def test_a_truncated_checkpoint_falls_back_to_the_one_before(run_copy, tiny_base,
                                                             arithmetic_files):
    weights = run_copy / "checkpoints" / "step-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    train(config(tiny_base, arithmetic_files, run_copy), resume=True, progress=False)
    log = (run_copy / "train.log").read_text()
    assert "step-3" in log and "truncated" in log and "step-2" in log
    assert "resumed from " + str(run_copy / "checkpoints" / "step-2") in log
    assert steps_logged(run_copy) == [1, 2, 3, 4]


def test_bit_flipped_weights_are_caught_before_loading(run_copy, tiny_base, arithmetic_files):
    weights = run_copy / "checkpoints" / "step-3" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor: loads fine, wrong number
    weights.write_bytes(bytes(data))
    train(config(tiny_base, arithmetic_files, run_copy), resume=True, progress=False)
    log = (run_copy / "train.log").read_text()
    assert "SHA-256" in log and "resumed from " + str(run_copy / "checkpoints" / "step-2") in log


def test_no_intact_checkpoint_is_a_clear_error(run_copy, tiny_base, arithmetic_files):
    for checkpoint in (run_copy / "checkpoints").iterdir():
        (checkpoint / "trainer_state.safetensors").write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "-m", "nftune.cli", "train", "--model", str(tiny_base),
         "--train-data", str(arithmetic_files["train"]), "--template", "raw",
         "--output-dir", str(run_copy), "--resume", "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "no intact checkpoint" in done.stderr and "step-1" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_torn_last_metrics_line_is_dropped(run_copy, tiny_base, arithmetic_files):
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:3]) + "\n" + lines[3][:17])  # crash mid-write
    train(config(tiny_base, arithmetic_files, run_copy), resume=True, progress=False)
    assert steps_logged(run_copy) == [1, 2, 3, 4]
    assert "torn last line" in (run_copy / "train.log").read_text()


def test_a_bad_metrics_line_in_the_middle_is_an_error(run_copy, tiny_base, arithmetic_files):
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = "{not json"
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl: line 2"):
        train(config(tiny_base, arithmetic_files, run_copy), resume=True, progress=False)


def test_stale_temporary_checkpoints_are_removed(run_copy, tiny_base, arithmetic_files):
    stale = run_copy / "checkpoints" / ".tmp-step-9-12345"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    # a crash between moving final/ aside and moving its replacement in
    (run_copy / "final").rename(run_copy / ".old-final-999")
    train(config(tiny_base, arithmetic_files, run_copy), resume=True, progress=False)
    assert not stale.exists() and not (run_copy / ".old-final-999").exists()
    assert (run_copy / "final" / "model.safetensors").exists()


def test_saved_checkpoints_are_complete(finished_run):
    for checkpoint in (finished_run / "checkpoints").iterdir():
        listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
        on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*")
                   if p.is_file() and p.name != MANIFEST}
        assert set(listed) == on_disk
        assert not {p.name for p in checkpoint.iterdir()} & {"trainer_state.pt"}
    # final/ is the model alone: resuming needs the step checkpoints, not it
    assert not {p.name for p in (finished_run / "final").iterdir()} & {
        MANIFEST, "trainer_state.json", "trainer_state.safetensors"}


# --- 8. a resumed run is the run its config.yaml describes -------------------------------------


def test_resume_refuses_a_changed_config(run_copy, tiny_base, arithmetic_files):
    before = (run_copy / "config.yaml").read_text()
    cfg = config(tiny_base, arithmetic_files, run_copy, algo="grpo", lr=0.5, seed=9)
    with pytest.raises(ValueError) as err:
        train(cfg, resume=True, progress=False, allow_changes=True)
    for key in ("algo", "lr", "seed"):
        assert key in str(err.value)
    assert (run_copy / "config.yaml").read_text() == before


def test_resume_takes_safe_changes_only_when_allowed(run_copy, tiny_base, arithmetic_files):
    cfg = config(tiny_base, arithmetic_files, run_copy, steps=5)
    with pytest.raises(ValueError, match="--allow-changes"):
        train(cfg, resume=True, progress=False)
    train(cfg, resume=True, progress=False, allow_changes=True)
    assert steps_logged(run_copy) == [1, 2, 3, 4, 5]
    assert "steps: 5" in (run_copy / "config.yaml").read_text()


REWARD_FILE = """
def ends_right(responses, rows):
    return [float(r.strip().endswith(str(row["answer"]))) for r, row in zip(responses, rows)]
"""


def _place(where: Path, tiny_base, files) -> dict:
    """A base model, training data and a reward file under ``where``, as a user lays them out;
    the run's settings with those paths (the reward file named relative to ``where``)."""
    shutil.copytree(tiny_base, where / "base")
    shutil.copy(files["train"], where / "train.jsonl")
    (where / "my_rewards.py").write_text(REWARD_FILE)
    return dict(model=str(where / "base"), train_data=str(where / "train.jsonl"),
                reward="my_rewards.py:ends_right")


def test_a_run_moved_with_its_inputs_resumes_exactly_and_other_files_are_refused(
        tiny_base, arithmetic_files, tmp_path, monkeypatch):
    from helpers import same_runs, tiny_run_values

    from nftune.train import Trainer

    first, second = tmp_path / "machine-a", tmp_path / "machine-b"
    first.mkdir()
    paths = _place(first, tiny_base, arithmetic_files)
    monkeypatch.chdir(first)  # the relative reward path is resolved where the run starts

    def settings(where: Path, **kw):
        return build_config(None, {**tiny_run_values(tiny_base, arithmetic_files, where / "run"),
                                   "steps": 2, "save_every": 1, "seed": 5, **paths, **kw})

    with Trainer(settings(first)) as trainer:
        trainer.step()  # the checkpoint after step 1
    assert str(first / "my_rewards.py") in (first / "run" / "config.yaml").read_text()
    shutil.copytree(first, second)  # the run and its inputs, as they reach another machine
    train(settings(first), resume=True, progress=False)  # the reference: step 2 where it began
    reference = [json.loads(x) for x in (first / "run" / "metrics.jsonl").read_text().splitlines()]
    shutil.move(first, tmp_path / "gone")  # nothing at the old paths any more

    monkeypatch.chdir(second)
    paths.update(model=str(second / "base"), train_data=str(second / "train.jsonl"))
    (second / "base" / "README.md").write_text("a card the copy gained: not the model")
    train(settings(second), resume=True, progress=False)
    moved = [json.loads(x) for x in (second / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in moved] == [1, 2] and same_runs(moved, reference)
    log = (second / "run" / "train.log").read_text()
    for key in ("model", "train_data", "reward"):
        assert f"--resume: {key} moved from" in log

    # other data at a new path, or the same path holding other data: refused, naming it
    lines = (second / "train.jsonl").read_text().splitlines(keepends=True)
    (second / "fewer.jsonl").write_text("".join(lines[:-1]))
    for data in (second / "fewer.jsonl", second / "train.jsonl"):
        if data.name == "train.jsonl":
            data.write_text("".join(lines[:-1]))
        with pytest.raises(ValueError, match="not the files the run started with") as err:
            Trainer(settings(second, train_data=str(data)), resume=True)
        assert "train_data" in str(err.value) and "model" not in str(err.value)


# --- 9. nonsense settings fail at once, with the key named --------------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("steps", 0, "steps: must be at least 1"),
    ("steps", -3, "steps: must be at least 1"),
    ("keep_checkpoints", 0, "keep_checkpoints: must be at least 1"),
    ("temperature", 0, "temperature"),
    ("top_p", 1.5, "top_p"),
    ("gen_batch_size", 0, "gen_batch_size"),
])
def test_nonsense_settings_are_errors(key, value, message):
    with pytest.raises(ValueError, match=message):
        build_config(None, {"model": "m", "train_data": "d", key: value})


def cli(*args):
    return run_cli(*args)


def test_objectives_with_too_few_answers_is_an_error():
    done = cli("objectives", "--k", "0")
    assert done.returncode == 2 and "--k" in done.stderr and "Traceback" not in done.stderr


def test_a_huge_prompt_is_refused_by_name(tmp_path):
    from nftune.data import load_questions

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "a", "problem": "1+1", "answer": "2"}) + "\n" +
                    json.dumps({"id": "b", "problem": "x" * 50_000_000, "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl: row 2: field 'problem' is 50,000,000 "):
        load_questions(str(path))


def test_eval_output_under_a_file_fails_before_grading(tmp_path):
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"benchmark": "b", "id": "1", "response": "x"}) + "\n")
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    done = cli("eval", "--responses", str(responses), "--output", str(blocker / "out"))
    assert done.returncode == 2 and "--output" in done.stderr
    assert "Traceback" not in done.stderr


def test_resume_without_a_checkpoint_says_so_on_the_console(tiny_base, arithmetic_files,
                                                            tmp_path):
    done = cli("train", "--model", str(tiny_base), "--train-data",
               str(arithmetic_files["train"]), "--template", "raw", "--steps", "1",
               "--prompts-per-step", "2", "--answers-per-prompt", "2", "--max-new-tokens", "8",
               "--minibatches", "1",
               "--verify-workers", "1", "--output-dir", str(tmp_path / "o"), "--resume",
               "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "no checkpoint" in done.stderr


# --- 10. Ctrl-C -----------------------------------------------------------------------------------


def test_ctrl_c_prints_one_line_naming_the_checkpoint(tiny_base, arithmetic_files, tmp_path):
    out = tmp_path / "run"
    # a new session stands in for the terminal: Ctrl-C goes to its whole process group
    proc = subprocess.Popen(
        [sys.executable, "-m", "nftune.cli", "train", "--model", str(tiny_base),
         "--train-data", str(arithmetic_files["train"]), "--template", "raw",
         "--steps", "200", "--prompts-per-step", "4", "--answers-per-prompt", "4",
         "--max-new-tokens", "24", "--save-every", "1", "--verify-workers", "2",
         "--output-dir", str(out), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-1" / MANIFEST).exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # mid-step
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines()
             if line.strip() and not line.startswith("nftune: warning")]
    assert len(lines) == 1, stderr
    assert "interrupted" in lines[0] and "step-" in lines[0] and "--resume" in lines[0]
