"""The policy's memory options against the plain path: LoRA adapters (only they train, the
merged final/ reloads to the same outputs, resume is exact), gradient checkpointing (the same
update), and one precision under bf16 (the first mini-batch is on-policy)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_run_config
from safetensors.torch import load_file

from nftune.objectives import compute_loss
from nftune.policy import load_policy, precision
from nftune.update import response_logprobs

TIMING_KEYS = {"time_generate_s", "time_verify_s", "time_old_logprobs_s", "time_update_s",
               "time_step_s", "tokens_per_s"}
CPU = torch.device("cpu")


def _train(base: Path, data: Path, out: Path, *extra) -> None:
    result = run_cli("train", "--model", base, "--train-data", data, "--template", "raw",
                     "--steps", "2", "--prompts-per-step", "4", "--answers-per-prompt", "4",
                     "--max-new-tokens", "24", "--lr", "1e-2", "--minibatches", "2",
                     "--save-every", "1", "--verify-workers", "1", "--no-progress",
                     "--output-dir", out, *extra)
    assert result.returncode == 0, result.stderr


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lora_trains_only_adapters_and_final_reloads_to_the_same_outputs(tiny_base,
                                                                          arithmetic_files,
                                                                          tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "lora"
    _train(tiny_base, arithmetic_files["train"], run, "--lora-rank", "4")
    rows = _metrics(run / "metrics.jsonl")
    assert sum(r["optimizer_steps"] for r in rows) >= 2

    step = run / "checkpoints" / "step-1"  # adapters only: no full weights in a checkpoint
    assert (step / "adapter_model.safetensors").exists()
    assert not (step / "model.safetensors").exists()
    base_weights = load_file(tiny_base / "model.safetensors")
    adapter = load_file(run / "final" / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert any(t.abs().max() > 0 for n, t in adapter.items() if "lora_B" in n)  # B left 0

    merged = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base), run / "final" / "adapter").eval()
    # the frozen base under the adapters is the base model, bit for bit
    frozen = {n.replace(".base_layer.", "."): t
              for n, t in adapted.get_base_model().state_dict().items() if ".lora_" not in n}
    assert all(torch.equal(frozen[n], t) for n, t in base_weights.items())
    changed = [n for n, t in merged.state_dict().items()
               if n in base_weights and not torch.equal(t, base_weights[n])]
    assert changed  # the merge moved the adapted weights
    ids = torch.randint(3, 60, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


def test_lora_resume_equals_an_uninterrupted_run(tiny_base, arithmetic_files, tmp_path):
    """A LoRA run that stopped after its step-1 checkpoint and is resumed (base from the
    model, adapters and optimizer from the checkpoint) ends with the same step 2 and weights."""
    run = tmp_path / "run"
    _train(tiny_base, arithmetic_files["train"], run, "--lora-rank", "4")
    crashed = tmp_path / "crashed"
    shutil.copytree(run, crashed)
    shutil.rmtree(crashed / "final")
    result = run_cli("train", "--config", crashed / "config.yaml", "--output-dir", crashed,
                     "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr
    a, b = _metrics(run / "metrics.jsonl"), _metrics(crashed / "metrics.jsonl")
    assert {k: v for k, v in a[1].items() if k not in TIMING_KEYS} == \
           {k: v for k, v in b[1].items() if k not in TIMING_KEYS}
    wa = load_file(run / "final" / "adapter" / "adapter_model.safetensors")
    wb = load_file(crashed / "final" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_lora_runs_of_one_seed_are_the_same_run(tiny_base, arithmetic_files, tmp_path):
    """LoRA draws its A matrices when the adapters are made, and torch seeds its default
    generator at random in each process: the run's seed must fix them, or the same config
    gives another run each time (as seen at Qwen2.5-0.5B's shape)."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        _train(tiny_base, arithmetic_files["train"], run, "--lora-rank", "4")
    a, b = (_metrics(run / "metrics.jsonl") for run in runs)
    assert [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in a] == \
           [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in b]
    wa, wb = (load_file(run / "final" / "adapter" / "adapter_model.safetensors")
              for run in runs)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_gradient_checkpointing_gives_the_same_update_in_float64(tiny_base):
    """Recomputing the activations in backward changes where they come from, not the
    gradient: equal to float64 rounding."""
    model, _ = load_policy(str(tiny_base), CPU)
    model = model.double().train()
    torch.manual_seed(0)
    ids = torch.randint(3, 60, (3, 14))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0
    weights = torch.randn(3, 8, dtype=torch.float64)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        logp, _ = response_logprobs(model, ids, attn, 6)
        (logp * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert model.is_gradient_checkpointing
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-12, rtol=1e-9,
                                   msg=name)


def test_gradient_checkpointing_recomputes_each_layer_in_backward(tiny_base, arithmetic_files):
    """What the switch changes: with it every decoder layer runs its forward again during
    backward, without it (auto's choice for this tiny model) once; the gradient is the same."""
    from nftune.policy import build_policy
    from nftune.update import response_logprobs

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    grads, calls = {}, {}
    for ckpt in (True, False):
        cfg = tiny_run_config(tiny_base, arithmetic_files, None, **(
            {"gradient_checkpointing": True} if ckpt else {}))
        assert cfg.gradient_checkpointing == ("true" if ckpt else "auto")
        model, _ = build_policy(cfg, CPU)
        model.train()
        layers = model.model.layers
        calls[ckpt] = 0

        def counted(forward, key=ckpt):
            def run(*args, **kwargs):
                calls[key] += 1
                return forward(*args, **kwargs)
            return run

        for layer in layers:  # (forward hooks do not fire when a checkpoint recomputes)
            layer.forward = counted(layer.forward)
        logprobs, _ = response_logprobs(model, ids, torch.ones_like(ids), 3)
        forwards = calls[ckpt]
        logprobs.sum().backward()
        assert forwards == len(layers)
        grads[ckpt] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert calls[False] == len(layers)  # no recomputation
    assert calls[True] == 2 * len(layers)  # every layer recomputed in backward
    torch.testing.assert_close(grads[True], grads[False], atol=1e-6, rtol=1e-5)


def test_bf16_first_minibatch_is_on_policy(tiny_base, arithmetic_files):
    """With bf16, sampling, π_old and the update run in one precision, and π_old is the
    update's own forward on the update's own micro-batches: the first mini-batch's log R is
    0 bit for bit, its NFT loss 0 and its gradient Prop. 4.1's at R = 1,
    −ω(r − (1 − r) r̂/(1 − r̂)) / N per token (1e-3 relative: the loss's own float32 rounding).
    Packed otherwise, bf16 rounds the rows differently (|log R| 2.3e-5 on this model; recording
    π_old while decoding step by step instead: 0.09)."""
    from nftune.config import engine_class
    from nftune.data import PromptSampler, load_questions
    from nftune.train import collect_rollout
    from nftune.update import micro_batches
    from nftune.verify import Verifier

    cfg = tiny_run_config(tiny_base, arithmetic_files, None, bf16=True, device="cpu",
                          prompts_per_step=8, micro_batch_tokens=300)
    assert cfg.old_logprobs == "recompute"
    model, tokenizer = load_policy(str(tiny_base), CPU)
    questions = load_questions(cfg.train_data).questions
    torch.manual_seed(0)
    with Verifier(1, 5.0) as verifier:
        engine = engine_class("hf").from_config(model, tokenizer, cfg)
        batch, _ = collect_rollout(model, tokenizer, questions, PromptSampler(len(questions), 0),
                                   verifier, cfg, engine)
    assert batch is not None
    groups = int(batch.group_ids.max()) + 1
    assert groups >= 2
    # mini-batch 1 of 2: the first ⌈G/2⌉ questions
    first = batch.select(torch.nonzero(batch.group_ids < (groups + 1) // 2).flatten())
    n = first.response_mask.sum()
    model.train()
    for micro in micro_batches(first, cfg.micro_batch_tokens):
        piece = first.select(micro).trimmed()
        with precision(cfg, CPU):
            logprobs, _ = response_logprobs(model, piece.input_ids, piece.attention_mask,
                                            piece.prompt_len)
        logprobs.retain_grad()
        loss, metrics = compute_loss("nft", logprobs, piece.old_logprobs, piece.response_mask,
                                     piece.reward, piece.r_hat, group_ids=piece.group_ids,
                                     num_tokens=n)
        loss.backward()
        mask = piece.response_mask.bool()
        assert torch.equal(logprobs[mask], piece.old_logprobs[mask])
        assert abs(loss.item()) < 1e-6
        r, r_hat = piece.reward[:, None], piece.r_hat[:, None]
        expected = -(1 - r_hat) * (r - (1 - r) * r_hat / (1 - r_hat)) / n * piece.response_mask
        informative = ((r_hat > 0) & (r_hat < 1)).expand_as(mask) & mask
        torch.testing.assert_close(logprobs.grad[informative], expected[informative].float(),
                                   rtol=1e-3, atol=1e-9)
    assert not math.isnan(metrics["loss"])


def test_gradient_checkpointing_auto_follows_activation_memory(tiny_base, arithmetic_files):
    """auto turns checkpointing on where one micro-batch's activations exceed 1/8 of the
    device's memory. By hand for H = 64, I = 256, 4 heads with 2 kv heads (kv width 32),
    2 layers: (8·64 + 4·256 + 4·32) values × 4 bytes × 2 layers = 13,312 bytes per token; on a
    device of 8 × 2**30 bytes the line is 2**30 / 13,312 = 80,659.7 tokens."""
    from transformers import Qwen2Config

    from nftune.policy import activation_bytes, uses_gradient_checkpointing

    shape = Qwen2Config(hidden_size=64, intermediate_size=256, num_attention_heads=4,
                        num_key_value_heads=2, num_hidden_layers=2, vocab_size=32)
    assert activation_bytes(shape, 1) == 13_312
    device = 8 * 2**30

    def decide(**settings):
        cfg = tiny_run_config(tiny_base, arithmetic_files, None, **settings)
        return uses_gradient_checkpointing(cfg, shape, device)

    assert not decide(micro_batch_tokens=80_659)
    assert decide(micro_batch_tokens=80_660)
    assert not decide(micro_batch_tokens=161_319, bf16=True)  # 2 bytes a value
    assert not decide(micro_batch_tokens=80_659, bf16="auto")  # on the CPU: float32
    assert decide(micro_batch_tokens=161_320, bf16=True)
    # an explicit setting wins, in any of the command line's or YAML's spellings
    assert not decide(micro_batch_tokens=10**7, gradient_checkpointing="off")
    assert decide(micro_batch_tokens=1, gradient_checkpointing=True)
    assert decide(micro_batch_tokens=1, gradient_checkpointing="yes")
    # vLLM colocated on a GPU keeps its share (0.4) through the update unless it sleeps, and
    # bf16: auto computes in bf16 there (6,656 bytes a token): the line is 0.6 · 2**30 / 6,656
    # = 96,791.6 tokens; asleep 161,319.4; on the CPU (float32, no share) 80,659.7
    def beside_vllm(tokens, device_type="cuda", **settings):
        cfg = tiny_run_config(tiny_base, arithmetic_files, None, rollout_engine="vllm",
                              micro_batch_tokens=tokens, **settings)
        return uses_gradient_checkpointing(cfg, shape, device, torch.device(device_type))

    assert not beside_vllm(96_791) and beside_vllm(96_792)
    assert not beside_vllm(161_319, vllm_sleep=True) and beside_vllm(161_320, vllm_sleep=True)
    assert not beside_vllm(80_659, "cpu") and beside_vllm(80_660, "cpu")
    # a config without the decoder's shape: on (memory first)
    assert uses_gradient_checkpointing(tiny_run_config(tiny_base, arithmetic_files, None),
                                       object(), device)


def test_gradient_checkpointing_auto_is_on_for_real_models_off_for_the_demo(tiny_base,
                                                                          arithmetic_files):
    """At the default micro-batch budget (16,384 tokens), on a 24 GB machine and on an 80 GB
    card (lines at 3 and 10 GB): Qwen2.5-0.5B's activations (24 layers, H 896, I 4,864, kv 128)
    are 16,384 · 24 · (8·896 + 4·4,864 + 4·128) · 4 bytes = 42.7 GB — on; the shipped demo
    base's (3 layers, H 96, I 384, kv 48) 16,384 · 3 · (768 + 1,536 + 192) · 4 = 0.49 GB — off."""
    from transformers import AutoConfig, Qwen2Config

    import nftune.tasks
    from nftune.policy import activation_bytes, uses_gradient_checkpointing

    qwen05 = Qwen2Config(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                         num_key_value_heads=2, num_hidden_layers=24, vocab_size=151_936)
    demo = AutoConfig.from_pretrained(Path(nftune.tasks.__file__).parent / "demo_base")
    assert activation_bytes(qwen05, 16_384) == 42_681_237_504
    assert activation_bytes(demo, 16_384) == 490_733_568
    cfg = tiny_run_config(tiny_base, arithmetic_files, None)
    assert cfg.micro_batch_tokens == 16_384
    for device in (24 * 10**9, 80 * 10**9):
        assert uses_gradient_checkpointing(cfg, qwen05, device)
        assert not uses_gradient_checkpointing(cfg, demo, device)


def test_bf16_auto_is_on_for_cuda_and_off_for_cpu(tiny_base, arithmetic_files):
    """``bf16: auto`` (the default) autocasts on CUDA and leaves CPU in float32, where the demo
    runs; an explicit setting wins on either. On CUDA the default then recomputes π_old (a
    step-by-step bf16 decode would not be on-policy), on CPU it keeps recording it."""
    cfg = tiny_run_config(tiny_base, arithmetic_files, None)
    assert cfg.bf16 == "auto"
    assert not cfg.uses_bf16("cpu") and cfg.uses_bf16("cuda")
    with precision(cfg, CPU):
        assert not torch.is_autocast_enabled("cpu")
    for spelling, on in (("false", False), ("no", False), (True, True), ("on", True)):
        explicit = tiny_run_config(tiny_base, arithmetic_files, None, bf16=spelling)
        assert explicit.uses_bf16("cpu") is on and explicit.uses_bf16("cuda") is on
    assert tiny_run_config(tiny_base, arithmetic_files, None, device="cpu").old_logprobs \
        == "generate"
    assert tiny_run_config(tiny_base, arithmetic_files, None, device="cuda").old_logprobs \
        == "recompute"
    import pytest

    with pytest.raises(ValueError, match="bf16: auto, true or false"):
        tiny_run_config(tiny_base, arithmetic_files, None, bf16="maybe")


def _mapped_from(path: Path) -> list[tuple[int, int]]:
    """The address ranges this process has mapped from ``path`` (Linux's /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _inside(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= tensor.data_ptr() < end for start, end in ranges)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_a_resumed_run_holds_its_weights_and_moments_in_memory_of_its_own(
        tiny_base, arithmetic_files, tmp_path):
    """safetensors hands CPU tensors over as views of the mapped file (the control); after a
    resume every weight and AdamW moment is a copy, so no training step rewrites the
    checkpoint's pages copy-on-write, and the mapping is gone."""
    from safetensors.torch import load_file

    from nftune.train import Trainer

    cfg = tiny_run_config(tiny_base, arithmetic_files, tmp_path / "run", steps=6, save_every=1)
    with Trainer(cfg) as trainer:  # to the first step that updates (AdamW's moments exist)
        while trainer.step()["optimizer_steps"] == 0:
            assert trainer.step_done < cfg.steps - 1
        step = trainer.step_done
    checkpoint = tmp_path / "run" / "checkpoints" / f"step-{step}"
    weights_file, state_file = (checkpoint / "model.safetensors",
                                checkpoint / "trainer_state.safetensors")
    control = load_file(weights_file)
    assert all(_inside(t, _mapped_from(weights_file)) for t in control.values())
    del control
    with Trainer(cfg, resume=True) as trainer:
        assert trainer.step_done == step
        moments = [v for state in trainer.optimizer.state.values() for v in state.values()
                   if isinstance(v, torch.Tensor) and v.numel() > 1]
        assert len(moments) == 2 * len(list(trainer.model.parameters()))  # exp_avg, exp_avg_sq
        assert not any(_inside(w, _mapped_from(weights_file))
                       for w in trainer.model.parameters())
        assert not any(_inside(m, _mapped_from(state_file)) for m in moments)
