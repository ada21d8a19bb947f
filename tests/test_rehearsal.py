"""A stranger's rehearsal, end to end: a Qwen2-architecture model with a trained byte-level BPE
tokenizer and a chat template with a system prompt (tests/rehearsal.py), data files in the
hub's column layouts → ``nftune train`` (full and LoRA) → ``final/`` → ``nftune eval`` with the
Hugging Face engine. The vLLM environment repeats the evaluation with ``--engine vllm``
(tests/vllm_engine/test_vllm_rehearsal.py)."""

import json

import pytest
import torch
import yaml
from helpers import run_cli
from rehearsal import hub_layout_files, stranger_model


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    root = tmp_path_factory.mktemp("stranger")
    return stranger_model(root / "model"), hub_layout_files(root / "data")


def train_args(model, files, out, *extra):
    return ["train", "--model", model, "--train-data", files["train"], "--output-dir", out,
            "--steps", "2", "--template", "chat:raw", "--prompts-per-step", "8",
            "--answers-per-prompt", "4", "--max-new-tokens", "24", "--lr", "1e-4",
            "--verify-workers", "1", "--save-every", "1", "--no-progress",
            "--eval-data", files["bench"] / "math500.jsonl", "--eval-every", "2",
            "--eval-limit", "8", *extra]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_strangers_model_trains_into_a_model_directory(stranger, tmp_path, mode):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, files = stranger
    out = tmp_path / mode
    lora = ["--lora-rank", "4"] if mode == "lora" else []
    done = run_cli(*train_args(model, files, out, *lora))
    assert done.returncode == 0, done.stderr[-3000:]
    final = out / "final"
    # the hub-layout training file was read and cleaned: DAPO's instruction stripped
    assert "200 questions" in (out / "train.log").read_text()
    # the artifact: the base's dtype, a model card, no trainer state; loads as a stranger would
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    names = {p.name for p in final.iterdir()}
    assert {"README.md", "nftune_config.yaml", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert not any(n.startswith("trainer_state") for n in names)
    assert ("adapter" in names) == (mode == "lora")
    if mode == "lora":
        assert (final / "adapter" / "adapter_config.json").exists()
    header = yaml.safe_load((final / "README.md").read_text().split("---")[1])
    assert header["base_model"] == str(model) and header["library_name"] == "transformers"
    assert "Held-out evaluation" in (final / "README.md").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert loaded.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(final)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "3+4"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\nYou add and subtract")
    # generation stops at either declared EOS
    assert set(loaded.generation_config.eos_token_id) == {
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>")}


def test_a_strangers_final_model_is_evaluated_on_hub_layout_data(stranger, tmp_path):
    from nftune.verify import verify_batch

    model, files = stranger
    out = tmp_path / "run"
    assert run_cli(*train_args(model, files, out)).returncode == 0
    evaluated = run_cli("eval", "--model", out / "final", "--benchmarks", "math500",
                        "--data-dir", files["bench"], "--template", "chat:raw", "--k", "1",
                        "--temperature", "0", "--max-new-tokens", "24", "--limit", "24",
                        "--verify-workers", "1", "--output", tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    items = json.loads((tmp_path / "eval.json").read_text())["items"]["math500"]
    assert len(items) == 24
    # graded as nftune's verifier grades the same texts, the MATH-500 layout's `answer` the gold
    gold = [json.loads(x)["answer"] for x in
            (files["bench"] / "math500.jsonl").read_text().splitlines()]
    texts = [item["responses"][0] for item in items]
    assert [item["gold"] for item in items] == gold
    assert [item["correct"][0] for item in items] == \
        [bool(v) for v in verify_batch(texts, gold, strategy="auto", workers=1)]
    assert all("Answer" in t for t in texts[:5])  # the model answers in its taught format
