"""The stranger's rehearsal (tests/test_rehearsal.py) in the vLLM environment: the model a run
leaves in final/ is evaluated with `nftune eval --engine vllm` and with the Hugging Face
engine, greedily, on the same hub-layout questions: the same answers, graded the same.

final/ is written in float32 here (`final_dtype`): `nftune eval`'s Hugging Face engine computes
in float32 and vLLM in the model's own dtype, so with bfloat16 weights the two would round
differently and a near-tie could change a greedy answer."""

import json
import os
import sys
from pathlib import Path

import pytest

if os.environ.get("NFTUNE_REQUIRE_VLLM"):
    import vllm  # noqa: F401 — CI's vLLM environment: a missing vLLM fails here
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (the vLLM environment of .ci/run)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from helpers import run_cli  # noqa: E402
from rehearsal import hub_layout_files, stranger_model  # noqa: E402


def test_vllm_and_hf_evaluate_a_strangers_final_model_alike(tmp_path):
    model = stranger_model(tmp_path / "model")
    files = hub_layout_files(tmp_path / "data")
    out = tmp_path / "run"
    trained = run_cli("train", "--model", model, "--train-data", files["train"],
                      "--output-dir", out, "--steps", "2", "--template", "chat:raw",
                      "--prompts-per-step", "8", "--answers-per-prompt", "4",
                      "--max-new-tokens", "24", "--lr", "1e-4", "--verify-workers", "1",
                      "--save-every", "0", "--no-progress", "--final-dtype", "float32")
    assert trained.returncode == 0, trained.stderr[-3000:]
    results = {}
    for engine in ("hf", "vllm"):
        done = run_cli("eval", "--model", out / "final", "--engine", engine,
                       "--benchmarks", "math500", "--data-dir", files["bench"],
                       "--template", "chat:raw", "--k", "1", "--temperature", "0",
                       "--max-new-tokens", "24", "--limit", "24", "--verify-workers", "1",
                       "--output", tmp_path / f"eval-{engine}")
        assert done.returncode == 0, done.stderr[-3000:]
        results[engine] = json.loads((tmp_path / f"eval-{engine}.json").read_text())
    hf, vl = (results[e]["items"]["math500"] for e in ("hf", "vllm"))
    assert len(hf) == len(vl) == 24
    assert [i["responses"] for i in vl] == [i["responses"] for i in hf]
    assert [i["correct"] for i in vl] == [i["correct"] for i in hf]
    assert results["vllm"]["summary"] == results["hf"]["summary"]
