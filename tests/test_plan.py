"""The fit check (nftune plan, and the start of nftune train) against figures counted by hand:
parameter counts of published models, each component's bytes, the largest micro-batch, the
verdicts, and a run refused before its model loads."""

import json
from dataclasses import replace

import pytest
from helpers import run_cli, tiny_run_config

from nftune.plan import (
    GIB,
    KNOWN_SHAPES,
    PROCESS_BYTES,
    Shape,
    estimate,
    parse_memory,
    plan_run,
    read_shape,
)


def test_parameter_counts_are_the_published_ones():
    """Qwen2.5-0.5B has 494,032,768 parameters (its model card: 0.49B; the count of its
    safetensors), Qwen2.5-7B 7,615,616,512 (7.61B), Llama-3.1-8B 8,030,261,248 (8.03B; no
    attention biases there: 32 layers × (4,096 + 2 × 1,024) fewer)."""
    assert KNOWN_SHAPES["qwen/qwen2.5-0.5b"].parameters() == 494_032_768
    assert KNOWN_SHAPES["qwen/qwen2.5-7b"].parameters() == 7_615_616_512
    llama = KNOWN_SHAPES["meta-llama/llama-3.1-8b"]
    assert llama.parameters() - 32 * (4096 + 2 * 1024) == 8_030_261_248
    # LoRA r = 16 on all linear layers of 0.5B: 24 × 16 × (2·1792 + 2·1024 + 3·5760)
    assert KNOWN_SHAPES["qwen/qwen2.5-0.5b"].lora_parameters(16) == 8_798_208


def test_components_by_hand():
    """A full fine-tune in fp32 without checkpointing: 4 + 4 + 8 bytes a parameter; each
    token keeps (8 H + 4 I + 4 kv) floats per layer; with checkpointing one float32 H per
    layer plus one layer's worth; bf16 autocast halves the layer's values and keeps a bf16
    copy of every matmul weight; LoRA on a bf16 base: 2 bytes a base weight, the adapters'
    own 4 + 4 + 8."""
    shape = Shape(hidden=64, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=100,
                  tied=True)
    n = shape.parameters()
    parts, phases = estimate(shape, tokens=1000, checkpointing=False)
    per_token_layer = 8 * 64 + 4 * 256 + 4 * 32
    assert (parts["weights"], parts["gradients"], parts["AdamW moments"]) == (4 * n, 4 * n, 8 * n)
    assert parts["activations"] == 1000 * 2 * per_token_layer * 4
    assert phases["backward"] == 16 * n + parts["activations"] + parts["log-prob chunks"]
    ckpt, _ = estimate(shape, tokens=1000, checkpointing=True, autocast=True)
    assert ckpt["activations"] == 1000 * 64 * 4 * 2 + 1000 * per_token_layer * 2
    assert ckpt["autocast weight copies"] == (shape.linear_parameters() + 100 * 64) * 2
    lora, lora_phases = estimate(shape, tokens=1000, checkpointing=True, lora_rank=4,
                                 bf16_base=True)
    a = shape.lora_parameters(4)
    assert lora["weights"] == 2 * n + 4 * a and lora["AdamW moments"] == 8 * a
    assert lora["autocast weight copies"] == 0
    assert lora_phases["optimizer step"] == 2 * n + 16 * a


def test_largest_micro_batch_by_hand(tiny_base, arithmetic_files):
    """Without checkpointing the backward grows by layers × (8 H + 4 I + 4 kv) × 4 bytes a
    token over a fixed part: the largest micro-batch is what is left over that, rounded down."""
    cfg = tiny_run_config(tiny_base, arithmetic_files, None, gradient_checkpointing="false",
                          device="cpu")
    shape = read_shape(str(tiny_base))
    device = 2 * GIB
    plan = plan_run(cfg, shape, "cpu", device, prompt_tokens=20)
    fixed = 16 * shape.parameters() + plan.components["log-prob chunks"] + PROCESS_BYTES["cpu"]
    per_token = shape.layers * (8 * shape.hidden + 4 * shape.intermediate
                                + 4 * shape.kv_width) * 4
    assert plan.fits
    assert plan.largest_micro_batch_tokens == (int(device * 0.9) - fixed) // per_token


def test_verdicts_and_advice_for_real_models_on_an_80gb_card(tiny_base, arithmetic_files):
    """By the model: a 1.5B full fine-tune in bf16 with checkpointing fits 80 GB; a 7B one
    does not (16 bytes a parameter are 113 GiB alone), and the advice names LoRA, itself
    checked to fit; a 7B LoRA run with vLLM asleep fits."""
    card = parse_memory("80GB")
    base = tiny_run_config(tiny_base, arithmetic_files, None, max_new_tokens=2048)
    small = plan_run(base, read_shape("Qwen/Qwen2.5-Math-1.5B"), "cuda", card)
    assert small.fits and small.components["weights"] == 1_543_714_304 * 4
    big = plan_run(base, read_shape("Qwen/Qwen2.5-Math-7B"), "cuda", card)
    assert not big.fits and big.components["AdamW moments"] == 7_615_616_512 * 8
    assert any("--lora-rank 16" in a for a in big.advice)
    assert "does not fit" in big.report()
    lora = tiny_run_config(tiny_base, arithmetic_files, None, lora_rank=16,
                           base_dtype="bfloat16", rollout_engine="vllm", vllm_sleep=True,
                           max_new_tokens=2048)
    assert plan_run(lora, read_shape("Qwen/Qwen2.5-Math-7B"), "cuda", card).fits


def test_bad_input_names_the_file_key_or_flag(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match=r"config.json: no integer intermediate_size"):
        read_shape(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: cannot be read as JSON"):
        read_shape(str(tmp_path))
    with pytest.raises(ValueError, match="neither a local model directory nor a known hub id"):
        read_shape("someone/unknown-model")
    assert parse_memory("80GB") == 80 * 10**9 and parse_memory("79.6 GiB") == int(79.6 * 2**30)
    with pytest.raises(ValueError, match="--gpu-memory: '80': expected a size with its unit"):
        parse_memory("80")


def test_plan_command_and_train_refuses_before_loading(tiny_base, arithmetic_files, tmp_path):
    """nftune plan exits 0 for a run that fits and 1 for one that does not; nftune train
    refuses the latter with the same plan before its model loads (nothing trained, no
    metrics), and --fit-check false runs it anyway."""
    ok = run_cli("plan", "--model", "Qwen/Qwen2.5-Math-1.5B", "--gpu-memory", "80GB")
    assert ok.returncode == 0 and "verdict: fits" in ok.stdout, ok.stderr
    no = run_cli("plan", "--model", "Qwen/Qwen2.5-Math-7B", "--gpu-memory", "80GB")
    assert no.returncode == 1 and "verdict: does not fit" in no.stdout
    common = ["train", "--model", tiny_base, "--train-data", arithmetic_files["train"],
              "--template", "raw", "--steps", "1", "--prompts-per-step", "2",
              "--answers-per-prompt", "2", "--minibatches", "1", "--max-new-tokens", "8",
              "--verify-workers", "1",
              "--gradient-checkpointing", "false", "--micro-batch-tokens", "1000000000",
              "--device", "cpu", "--no-progress"]
    refused = run_cli(*common, "--output-dir", tmp_path / "refused")
    assert refused.returncode == 2
    assert "does not fit in memory" in refused.stderr and "to fit:" in refused.stderr
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
    forced = run_cli(*common, "--output-dir", tmp_path / "forced", "--fit-check", "false")
    assert forced.returncode == 0, forced.stderr


def test_fsdp_over_8_ranks_shards_a_7b_full_fine_tune_by_hand():
    from nftune.config import TrainConfig
    from nftune.plan import KNOWN_SHAPES, estimate, plan_run

    shape = KNOWN_SHAPES["qwen/qwen2.5-7b"]
    total = 7_615_616_512  # the published count
    root = 152_064 * 3_584 * 2 + 3_584  # embeddings and an untied head, final norm
    layer = (total - root) // 28
    components, _ = estimate(shape, tokens=16_384, checkpointing=True, autocast=True, shards=8)
    assert components["weights"] == total * 4 // 8 + (root + 2 * layer) * 4
    assert components["gradients"] == total * 4 // 8 + (root + layer) * 4
    assert components["AdamW moments"] == total * 8 // 8
    assert components["autocast weight copies"] == (root + 2 * layer) * 2
    cfg = TrainConfig(model="Qwen/Qwen2.5-Math-7B", max_new_tokens=2048)
    card = 80 * 10**9
    one = plan_run(cfg, shape, "cuda", card)
    ddp = plan_run(cfg, shape, "cuda", card, ranks=8)
    fsdp = plan_run(replace(cfg, distributed_strategy="fsdp"), shape, "cuda", card, ranks=8)
    assert not one.fits and ddp.peak == one.peak  # DDP holds the whole model on each rank
    assert fsdp.fits and fsdp.peak < one.peak / 3
    assert any(a.startswith("--distributed-strategy fsdp") for a in ddp.advice)


def test_plan_cli_takes_the_number_of_ranks():
    done = run_cli("plan", "--model", "Qwen/Qwen2.5-Math-7B", "--gpu-memory", "80GB",
                   "--ranks", "8", "--distributed-strategy", "fsdp", "--max-new-tokens", "2048")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 ranks, fsdp" in done.stdout and "verdict: fits" in done.stdout
