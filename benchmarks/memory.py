"""Peak memory of one update step (forward, backward, optimizer step) of a real-size model:
nftune's options one at a time and together, and TRL's GRPOTrainer on the same batch.

Usage: python benchmarks/memory.py [--arch qwen2.5-0.5b] [--rows 4] [--tokens 1024]
                                   [--only before,default,...] [--device cpu|cuda]
       python benchmarks/memory.py --table [--rows 4 --tokens 4032]

On ``--device cuda`` the figure is CUDA's peak allocator figure
(``torch.cuda.max_memory_allocated``, what tensors held at the worst moment, without the
caching allocator's slack or the CUDA context), and the memory model is compared without its
CPU-process overhead.

A model built from Qwen2.5-0.5B's config with random weights (vocabulary 151,936) takes one
optimizer step on one micro-batch of ``rows`` answers × ``tokens`` response tokens (after a
64-token prompt), each configuration in its own process; printed: the process's peak RSS and the
ratio to TRL's peak. Every process runs with glibc's mmap threshold fixed
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

CONFIGS = ("before", "hidden", "ckpt", "lora", "default", "all", "trl", "trl_nockpt")
# (log-probs from logits, gradient checkpointing, LoRA r = 16, bfloat16 base) per configuration
OPTIONS = {"before": (True, False, False, False), "hidden": (False, False, False, False),
           "ckpt": (True, True, False, False), "lora": (True, False, True, False),
           "default": (False, None, False, False), "all": (False, True, True, True)}
# None: the config's default, gradient_checkpointing auto (on at these shapes: see the output)
PROMPT = 64


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


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

    logits, ckpt, lora, bf16_base = OPTIONS[name]
    update.LOGPROBS_FROM_HIDDEN_STATES = not logits
    cfg = build_config(None, dict(model=model_dir, train_data="unused", device=device,
                                  minibatches=1, micro_batch_tokens=rows * (PROMPT + tokens),
                                  warmup_steps=0, lr=1e-6,
                                  gradient_checkpointing="auto" if ckpt is None else ckpt,
                                  lora_rank=16 if lora else 0,
                                  base_dtype="bfloat16" if bf16_base else "float32"))
    torch.manual_seed(0)
    model, _ = build_policy(cfg, torch.device(device))
    loaded = _current_rss_gb() if device == "cpu" else torch.cuda.memory_allocated() / 2**30
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    batch = _batch(rows, tokens, model.config.vocab_size)
    if device != "cpu":
        batch = _to(batch, device)
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    metrics, _ = update_policy(model, optimizer, scheduler, batch, cfg, 0)
    assert metrics["optimizer_steps"] == 1, metrics
    return {"loaded_gb": loaded, "seconds": time.perf_counter() - start,
            "gradient_checkpointing": bool(model.is_gradient_checkpointing)}


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
    start = time.perf_counter()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    optimizer.step()
    return {"loaded_gb": loaded, "seconds": time.perf_counter() - start,
            "gradient_checkpointing": bool(trainer.model.is_gradient_checkpointing)}


# ---------------------------------------------------------------------------------------------
# The memory model (docs/performance.md): what one update step holds at its peak
# ---------------------------------------------------------------------------------------------

GIB = 2**30
OVERHEAD_GIB = 0.6  # the Python process with torch and transformers imported (measured: 0.44)
# activations autograd keeps per token and decoder layer, in floats of the compute dtype: the
# count nftune's gradient_checkpointing: auto decides by (8 H + 4 I + 4 kv, from Qwen2's layer)
from nftune.policy import ACTIVATION_TERMS  # noqa: E402


def count_params(shape: dict) -> tuple[int, int]:
    """(all parameters, LoRA r=16 adapter parameters on every linear layer but the head)."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    v = shape["vocab_size"]
    per_layer = h * h * 2 + h * kv * 2 + h + 2 * kv + 3 * h * i + 2 * h
    total = layers * per_layer + v * h * (1 if shape["tie_word_embeddings"] else 2) + h
    r = 16  # A (r × in) and B (out × r) per linear layer
    lora = layers * r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    return total, lora


def predict_gib(shape: dict, rows: int, tokens: int, *, logits: bool, ckpt: bool, lora: bool,
                bf16_base: bool) -> float:
    """Peak GiB of one update step: weights, gradients, AdamW's two moments, activations and
    the vocabulary-sized tensors of the log-probs, whichever phase holds the most."""
    total, adapters = count_params(shape)
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    layers, vocab = shape["num_hidden_layers"], shape["vocab_size"]
    n, answer_tokens = rows * (PROMPT + tokens), rows * tokens
    compute = 2 if (lora and bf16_base) else 4  # bytes per activation
    trainable = adapters if lora else total
    weights = total * (2 if (lora and bf16_base) else 4) + (adapters * 4 if lora else 0)
    a, b, c = ACTIVATION_TERMS
    per_layer = n * (a * h + b * i + c * kv) * compute
    activations = n * h * compute * layers + per_layer if ckpt else per_layer * layers
    # logits and their gradient (float32) for the whole micro-batch, or one chunk of each
    vocab_tensors = answer_tokens * vocab * 4 * 2 if logits else 2**25 * 4 * 3
    backward = activations + vocab_tensors + trainable * 4  # gradients fill as activations go
    optimizer = trainable * 4 + trainable * 8
    return OVERHEAD_GIB + (weights + max(backward, optimizer)) / GIB


def print_table(rows: int = 4, tokens: int = 1024) -> None:
    """Which setting fits which card, by the memory model (docs/performance.md)."""
    from rollout_engines import ARCHS

    settings = {"full fine-tune, no checkpointing": OPTIONS["hidden"],
                "full fine-tune (defaults: checkpointing)": OPTIONS["default"],
                "LoRA r=16 + bf16 base (+ checkpointing)": OPTIONS["all"]}
    cards = (24, 48, 80)
    print(f"| model | setting | peak GiB (micro-batch {rows} × {tokens} tokens) | "
          + " | ".join(f"{c} GB" for c in cards) + " |")
    print("|---|---|---|" + "---|" * len(cards))
    for arch in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"):
        for label, (logits, ckpt, lora, bf16_base) in settings.items():
            gib = predict_gib(ARCHS[arch], rows, tokens, logits=logits,
                              ckpt=ckpt is not False, lora=lora,  # auto: on at these sizes
                              bf16_base=bf16_base) - OVERHEAD_GIB + 1.0  # CUDA context ~1 GiB
            fits = ["yes" if gib * GIB <= c * 1e9 * 0.95 else "no" for c in cards]
            print(f"| {arch} | {label} | {gib:.1f} | " + " | ".join(fits) + " |")


def worker(name: str, model_dir: str, rows: int, tokens: int, device: str = "cpu") -> None:
    run = run_trl if name.startswith("trl") else run_nftune
    result = run(name, model_dir, rows, tokens, device)
    if device == "cpu":
        peak = _rss_gb()
    else:
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**30
    result.update(name=name, peak_gb=peak)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2.5-0.5b")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--only", default=",".join(CONFIGS))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--table", action="store_true",
                        help="print the memory model's table for 0.5B / 1.5B / 7B and stop")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model_dir, args.rows, args.tokens, args.device)
        return

    from rollout_engines import ARCHS, build_model_dir

    if args.table:
        print_table(args.rows, args.tokens)
        return

    with tempfile.TemporaryDirectory() as tmp:
        build_model_dir(args.arch, tmp, "float32")
        what = "peak RSS per process" if args.device == "cpu" else \
            "CUDA peak allocated per process (torch.cuda.max_memory_allocated)"
        print(f"{args.arch}, random weights, float32 on disk; one update step on {args.rows} "
              f"answers × {args.tokens} tokens (+ {PROMPT}-token prompts) on {args.device}; "
              + what)
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
            results[name] = r = json.loads(lines[-1][7:])
            model = ""
            if name in OPTIONS:
                logits, ckpt, lora, bf16_base = OPTIONS[name]
                predicted = predict_gib(ARCHS[args.arch], args.rows, args.tokens, logits=logits,
                                        ckpt=r["gradient_checkpointing"], lora=lora,
                                        bf16_base=bf16_base)
                if args.device != "cpu":  # tensors only: no Python process in the figure
                    predicted -= OVERHEAD_GIB
                model = f"; memory model {predicted:5.2f} GiB ({predicted / r['peak_gb'] - 1:+.0%})"
            ckpt_state = "on" if r["gradient_checkpointing"] else "off"
            print(f"  {name:12s} peak {r['peak_gb']:6.2f} GiB (checkpointing {ckpt_state}; step "
                  f"{r['seconds']:6.1f} s{model})",
                  flush=True)
        trl = results.get("trl", {}).get("peak_gb")
        if trl:
            print("ratios to TRL's peak (float32, its default gradient checkpointing on):")
            for name, r in results.items():
                print(f"  {name:11s} {r['peak_gb'] / trl:.2f}×")
        vocab_bytes = args.rows * args.tokens * 151936 * 4 / 2**30
        print(f"one (answers × tokens × vocabulary) float32 tensor: {vocab_bytes:.2f} GiB")


if __name__ == "__main__":
    main()
