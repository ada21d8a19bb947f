"""benchmarks/gpu_check.py, the GPU window's script, at the demo's shape on the CPU: every stage
finishes in its own process and leaves its figures, so the script cannot rot between GPU runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _without(tmp_path, *modules: str) -> dict:
    """An environment in which importing ``modules`` fails as for a package not installed."""
    blocked = tmp_path / "blocked"
    for name in modules:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('No module named {name!r}')\n")
    return {**os.environ, "PYTHONPATH": str(blocked)}


def test_gpu_check_runs_every_stage_on_cpu(tmp_path):
    """Every stage, with what the lent GPU machines lack (device/KINDS.md: no datasets, no
    math-verify; the check's reward comes from a file) impossible to import."""
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                           "--device", "cpu", "--small", "--out", str(out),
                           "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=400,
                          env=_without(tmp_path, "datasets", "math_verify", "trl", "vllm"))
    assert proc.returncode == 0, proc.stderr
    # only the figures are in --out (what a GPU machine ships back); model and run in --work
    assert [p.name for p in out.iterdir()] == ["results.jsonl"]
    assert (tmp_path / "work" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "work" / "run" / "final" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    done = {r["of"]: r for r in rows if r["stage"] == "done"}
    assert set(done) == {"env", "build", "update", "generate", "trainer", "numerics",
                         "largest"}
    assert all(r["rc"] == 0 for r in done.values()), [r["error"] for r in done.values()]
    env = next(r for r in rows if r["stage"] == "env")
    assert env["device"] == "cpu" and set(env["importable"]) >= {"vllm", "trl", "flash_attn"}
    assert env["importable"]["vllm"] is False and env["importable"]["trl"] is False  # blocked
    updates = {r["config"]: r for r in rows if r["stage"] == "update"}
    assert set(updates) == {"fp32_ckpt", "bf16_ckpt", "lora16_bf16_base"}
    for r in updates.values():
        assert r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0 and r["model_gib"] > 0
    generated = [r for r in rows if r["stage"] == "generate"]
    assert [(r["batch"], r["record_logprobs"], r["weights"]) for r in generated] == [
        (8, False, "float32"), (8, True, "float32"), (32, False, "float32"),
        (32, True, "float32"), (32, False, "float32")]  # the trainer's four, then evaluation's
    trainer = next(r for r in rows if r["stage"] == "trainer")
    assert len(trainer["step_seconds"]) == 3 and "model.safetensors" in trainer["final_files"]
    numerics = next(r for r in rows if r["stage"] == "numerics")
    # float32 on the CPU: recording π_old while decoding equals the recompute to rounding
    assert numerics["recorded_vs_recomputed_max_bf16_false"] < 1e-3
    # bf16 rounds to 8 bits of mantissa: its log-probs differ from fp32's, by more than fp32's
    # own recorded-vs-recomputed rounding
    assert numerics["bf16_vs_fp32_logprob_max"] > numerics["recorded_vs_recomputed_max_bf16_false"]
    assert 0 < numerics["bf16_vs_fp32_logprob_mean"] <= numerics["bf16_vs_fp32_logprob_max"]
    assert isinstance(numerics["same_update_twice_bitwise"], bool)
    largest = next(r for r in rows if r["stage"] == "largest")
    assert largest["tries"] and largest["tries"][0]["tokens"] <= 4096  # --small's cap
    assert largest["largest_measured"] == max(t["tokens"] for t in largest["tries"] if t["fits"])


def test_shape_flags_reach_every_stage(tmp_path):
    """A rehearsal's flags (here: micro-batch tokens, answer length, batch sizes) are passed
    to each stage's own process, not only parsed by the driver."""
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                           "--device", "cpu", "--small", "--stages", "build,update,generate",
                           "--tokens", "384", "--new-tokens", "4", "--batches", "8,16",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["tokens"] for r in rows if r["stage"] == "update"} == {384}
    generated = [r for r in rows if r["stage"] == "generate"]
    assert [r["batch"] for r in generated] == [8, 8, 16, 16, 16]
    # 4 new tokens at most: the sampled tokens per second times seconds is the tokens made
    assert all(r["tokens_per_s"] * r["seconds"] <= r["batch"] * 4 + 1e-6 for r in generated)


def test_largest_builds_micro_batches_of_a_runs_rows(tmp_path):
    """At 11,520 tokens the 'largest' stage packs rows of a run's length (~2,304 tokens): five
    would leave the half-right, half-wrong batch one reward short, so it must pick an even
    count; the stage finishes and reports its tries."""
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                           "--device", "cpu", "--small", "--stages", "build,largest",
                           "--largest-cap", str(5 * 2304), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    done = {r["of"]: r for r in rows if r["stage"] == "done"}
    assert done["largest"]["rc"] == 0, done["largest"]["error"]
    largest = next(r for r in rows if r["stage"] == "largest")
    assert largest["tries"][0] == {"tokens": 5 * 2304, "fits": True}
