"""Peak memory of the steady-state update step (the second optimizer step: AdamW's moments
exist through its forward and backward) of a real-size model: nftune's options one at a time
and together, and TRL's GRPOTrainer on the same batch, each beside the memory model of the fit
check (``nftune.plan``).

Usage: python benchmarks/memory.py [--arch qwen2.5-0.5b] [--rows 4] [--tokens 1024]
                                   [--only before,default,...] [--device cpu|cuda]
                                   [--save FILE.jsonl]
       python benchmarks/memory.py --results FILE.jsonl [--rows ... --tokens ...]

On ``--device cuda`` the figures are CUDA's peak allocated (``torch.cuda.max_memory_allocated``:
what tensors held at the worst moment, compared with the memory model without its process
overhead) and peak reserved (what the caching allocator held). On the CPU the figure is the
process's peak RSS over the second step (VmHWM, reset before it through /proc/self/clear_refs).

A model built from Qwen2.5-0.5B's config with random weights (vocabulary 151,936) takes two
optimizer steps on one micro-batch of ``rows`` answers × ``tokens`` response tokens (after a
64-token prompt), each configuration in its own process; printed: the second step's peak and
the ratio to TRL's peak. Every process runs with glibc's mmap threshold fixed
(``MALLOC_MMAP_THRESHOLD_=131072``): by default glibc raises the threshold after the first large
tensor is freed, later mid-size tensors (AdamW's moments, one per weight matrix) then land on a
heap that never shrinks below its high-water mark, and the peak grows by whatever the freed
activations left behind (+2.8 GiB on the defaults: 11.55 against 8.79 GiB) — an effect of the
CPU allocator, not of the update, that GPU caching allocators do not share. Configurations:

    before    the update as it was before issue 20: log-probs from the (tokens × vocabulary)
              logits of the whole micro-batch; full fine-tune, float32, AdamW
    hidden    before, but log-probs from the hidden states through the LM head, a chunk of
              tokens at a time
    ckpt      before + gradient_checkpointing
    lora      before + LoRA r = 16 on every linear layer (float32 base)
    default   nftune's defaults: hidden, gradient_checkpointing auto (on for this model at
              this micro-batch; the output says), full fine-tune, float32
    bf16      default + bf16 autocast (bf16: true; the default on CUDA)
    all       default + LoRA r = 16 + bfloat16 base
    trl       TRL's GRPOTrainer with its defaults (gradient checkpointing on) but float32 like
              nftune's defaults (TRL's default bf16=True autocast runs bfloat16 matmuls, which
              this CPU does in a single-threaded reference kernel: hours a step), same batch,
              its own compute_loss, backward and AdamW step
    trl_nockpt  the same with gradient_checkpointing=False
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = ("before", "hidden", "ckpt", "lora", "default", "bf16", "all", "trl", "trl_nockpt")
# (log-probs from logits, gradient checkpointing, LoRA r = 16, bfloat16 base, bf16 autocast)
# per configuration
OPTIONS = {"before": (True, False, False, False, False),
           "hidden": (False, False, False, False, False),
           "ckpt": (True, True, False, False, False), "lora": (True, False, True, False, False),
           "default": (False, None, False, False, False),
           "bf16": (False, None, False, False, True), "all": (False, True, True, True, False)}
# None: the config's default, gradient_checkpointing auto (on at these shapes: see the output)
PROMPT = 64


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


def _peak_rss_gb() -> float:
    """The process's peak RSS since the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return _rss_gb()


def _current_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _batch(rows: int, tokens: int, vocab: int):
    import torch

    from nftune.rollout import Rollout

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, PROMPT + tokens), generator=g)
    return Rollout(
        input_ids=ids, attention_mask=torch.ones_like(ids), prompt_len=PROMPT,
        response_mask=torch.ones(rows, tokens, dtype=torch.long),
        truncated=torch.zeros(rows, dtype=torch.bool),
        group_ids=torch.zeros(rows, dtype=torch.long),
        texts=[""] * rows, old_logprobs=torch.full((rows, tokens), -12.0),
        reward=torch.tensor([1.0, 0.0] * (rows // 2)), r_hat=torch.full((rows,), 0.5))


def run_nftune(name: str, model_dir: str, rows: int, tokens: int, device: str = "cpu") -> dict:
    import torch

    from nftune import update
    from nftune.config import build_config
    from nftune.policy import build_policy, make_optimizer, make_scheduler
    from nftune.update import update_policy

    logits, ckpt, lora, bf16_base, autocast = OPTIONS[name]
    update.LOGPROBS_FROM_HIDDEN_STATES = not logits
    cfg = build_config(None, dict(model=model_dir, train_data="unused", device=device,
                                  minibatches=1, micro_batch_tokens=rows * (PROMPT + tokens),
                                  warmup_steps=0, lr=1e-6,
                                  gradient_checkpointing="auto" if ckpt is None else ckpt,
                                  lora_rank=16 if lora else 0,
                                  base_dtype="bfloat16" if bf16_base else "float32",
                                  bf16="true" if autocast else "false"))
    torch.manual_seed(0)
    model, _ = build_policy(cfg, torch.device(device))
    loaded = _current_rss_gb() if device == "cpu" else torch.cuda.memory_allocated() / 2**30
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    batch = _batch(rows, tokens, model.config.vocab_size)
    if device != "cpu":
        batch = _to(batch, device)
    # the first step creates AdamW's moments; the second is the steady state, with the moments
    # held through its forward and backward: its peak is the one measured
    first = time.perf_counter()
    metrics, _ = update_policy(model, optimizer, scheduler, batch, cfg, 0)
    first = time.perf_counter() - first
    _reset_peak(device)
    start = time.perf_counter()
    metrics, _ = update_policy(model, optimizer, scheduler, batch, cfg, 0)
    assert metrics["optimizer_steps"] == 1, metrics
    return {"loaded_gb": loaded, "seconds": time.perf_counter() - start, "first_s": first,
            "gradient_checkpointing": bool(model.is_gradient_checkpointing)}


def _reset_peak(device: str) -> None:
    """The peak counters from now on: CUDA's allocator statistics, or the process's peak RSS
    (VmHWM, reset to the current RSS through /proc/self/clear_refs)."""
    import torch

    if device == "cpu":
        Path("/proc/self/clear_refs").write_text("5")
    else:
        torch.cuda.reset_peak_memory_stats()


def _to(batch, device: str):
    import dataclasses

    import torch

    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device)
                                         for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def run_trl(name: str, model_dir: str, rows: int, tokens: int, device: str = "cpu") -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from nftune.policy import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    loaded = _current_rss_gb() if device == "cpu" else torch.cuda.memory_allocated() / 2**30
    config = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=rows,
                        num_generations=rows, max_completion_length=tokens,
                        use_cpu=device == "cpu",
                        report_to=[], learning_rate=1e-6, logging_steps=1, save_strategy="no",
                        bf16=False,
                        **({} if name == "trl" else {"gradient_checkpointing": False}))
    data = Dataset.from_dict({"prompt": ["1+1"] * rows})
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(
        completions), args=config, train_dataset=data, processing_class=tokenizer)
    if config.gradient_checkpointing:
        # what Trainer.train() does before its first step (this script calls compute_loss
        # directly, so without this TRL's default checkpointing would never switch on)
        trainer.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=dict(config.gradient_checkpointing_kwargs or {}) or None)
    batch = _batch(rows, tokens, model.config.vocab_size)
    if device != "cpu":
        batch = _to(batch, device)
        torch.cuda.reset_peak_memory_stats()
    completion_mask = batch.response_mask
    inputs = {"prompt_ids": batch.input_ids[:, :PROMPT],
              "prompt_mask": torch.ones(rows, PROMPT, dtype=torch.long, device=device),
              "completion_ids": batch.input_ids[:, PROMPT:], "completion_mask": completion_mask,
              "advantages": batch.reward * 2 - 1,
              "num_items_in_batch": completion_mask.sum().float()}
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop
    optimizer = trainer.create_optimizer()
    first = time.perf_counter()
    for step in range(2):  # the second step, with AdamW's moments present, is measured
        if step == 1:
            first = time.perf_counter() - first
            _reset_peak(device)
            start = time.perf_counter()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"loaded_gb": loaded, "seconds": time.perf_counter() - start, "first_s": first,
            "gradient_checkpointing": bool(trainer.model.is_gradient_checkpointing)}


# ---------------------------------------------------------------------------------------------
# The memory model: nftune.plan's (the fit check of nftune plan and nftune train)
# ---------------------------------------------------------------------------------------------

GIB = 2**30


def predict_gib(arch: str, name: str, rows: int, tokens: int, ckpt: bool, device: str) -> float:
    """nftune.plan's steady-state peak of one update step (backward or optimizer step, no
    generation) for configuration ``name`` at this micro-batch, with the process's overhead."""
    from rollout_engines import ARCHS

    from nftune.plan import PROCESS_BYTES, estimate, shape_from_config

    logits, _, lora, bf16_base, autocast = OPTIONS[name]
    shape = shape_from_config(ARCHS[arch])
    _, phases = estimate(shape, tokens=rows * (PROMPT + tokens), checkpointing=ckpt,
                         lora_rank=16 if lora else 0, bf16_base=bf16_base, autocast=autocast,
                         logits_tokens=rows * tokens if logits else None)
    # CUDA's allocator figure holds tensors only: no process in it
    return (max(phases.values()) + (PROCESS_BYTES["cpu"] if device == "cpu" else 0)) / GIB


def compare(arch: str, results: dict, rows: int, tokens: int, device: str) -> None:
    """Each measurement beside the memory model, and the ratios to TRL's peak."""
    key = "peak_gb"
    for name, r in results.items():
        model = ""
        if name in OPTIONS:
            predicted = predict_gib(arch, name, rows, tokens, r["gradient_checkpointing"],
                                    device)
            model = f"; memory model {predicted:5.2f} GiB ({predicted / r[key] - 1:+.0%})"
        reserved = f", reserved {r['reserved_gb']:.2f}" if r.get("reserved_gb") else ""
        ckpt_state = "on" if r["gradient_checkpointing"] else "off"
        print(f"  {name:12s} peak {r[key]:6.2f} GiB{reserved} (checkpointing {ckpt_state}; "
              f"second step {r['seconds']:6.1f} s{model})", flush=True)
    trl = results.get("trl", {}).get(key)
    if trl:
        print("ratios to TRL's peak (float32, gradient checkpointing on in both):")
        for name, r in results.items():
            print(f"  {name:11s} {r[key] / trl:.2f}×")


def worker(name: str, model_dir: str, rows: int, tokens: int, device: str = "cpu") -> None:
    run = run_trl if name.startswith("trl") else run_nftune
    result = run(name, model_dir, rows, tokens, device)
    if device == "cpu":
        peak, reserved = _peak_rss_gb(), None
    else:
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**30
        reserved = torch.cuda.max_memory_reserved() / 2**30
    result.update(name=name, peak_gb=peak, reserved_gb=reserved)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2.5-0.5b")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--only", default=",".join(CONFIGS))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--save", default=None, help="append each result (JSON) to this file")
    parser.add_argument("--results", default=None,
                        help="a --save file: print its measurements against the memory model")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model_dir, args.rows, args.tokens, args.device)
        return

    from rollout_engines import build_model_dir

    if args.results:  # measurements saved by an earlier run, against today's model
        rows = [json.loads(x) for x in Path(args.results).read_text().splitlines() if x.strip()]
        compare(args.arch, {r["name"]: r for r in rows}, args.rows, args.tokens, args.device)
        return

    with tempfile.TemporaryDirectory() as tmp:
        build_model_dir(args.arch, tmp, "float32")
        what = "peak RSS per process" if args.device == "cpu" else \
            "CUDA peak allocated and reserved per process"
        print(f"{args.arch}, random weights, float32 on disk; the second of two update steps "
              f"(AdamW's moments present) on {args.rows} answers × {args.tokens} tokens "
              f"(+ {PROMPT}-token prompts) on {args.device}; " + what)
        results = {}
        for name in args.only.split(","):
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get(
                "MALLOC_MMAP_THRESHOLD_", "131072")}
            proc = subprocess.run([sys.executable, __file__, "--worker", name, "--model-dir", tmp,
                                   "--rows", str(args.rows), "--tokens", str(args.tokens),
                                   "--device", args.device],
                                  capture_output=True, text=True, env=env)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"  {name}: failed\n{proc.stderr[-2000:]}")
                continue
            results[name] = json.loads(lines[-1][7:])
            if args.save:
                with open(args.save, "a") as f:
                    f.write(lines[-1][7:] + "\n")
            compare(args.arch, {name: results[name]}, args.rows, args.tokens, args.device)
        trl = results.get("trl", {}).get("peak_gb")
        if trl:
            print("ratios to TRL's peak (float32, gradient checkpointing on in both):")
            for name, r in results.items():
                print(f"  {name:11s} {r['peak_gb'] / trl:.2f}×")
        vocab_bytes = args.rows * args.tokens * 151936 * 4 / 2**30
        print(f"one (answers × tokens × vocabulary) float32 tensor: {vocab_bytes:.2f} GiB")


if __name__ == "__main__":
    main()
