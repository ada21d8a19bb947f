"""Transient memory of a LoRA run's weight push (to vLLM) and of writing ``final/``: the merged
weights one layer at a time (``nftune.policy.merged_weights``, ``nftune.artifact.
save_model_weights``) against the former whole-dictionary merge, at a real model's shape.

Usage: python benchmarks/lora_merge_memory.py [--arch qwen2.5-0.5b] [--rank 16]
                                               [--base-dtype bfloat16]

A model of the arch's shape with random weights is loaded as a LoRA run loads it (adapters of
rank ``--rank`` on every linear layer, the base in ``--base-dtype``; B set non-zero so that
every merge does arithmetic), then in its own process each of:

    push         consume ``merged_weights(model)`` as vLLM's ``reload_weights`` does (each
                 tensor used, then dropped)
    save         ``save_model_weights`` to a temporary directory in the base's dtype
    push_before  the former push: every adapted layer's float32 delta built first, then a merged
                 copy of the whole state dict (the code before this benchmark's commit), consumed
                 the same way
    save_before  the former save: that merged dict, cast, handed to ``save_pretrained``

Printed: the peak resident memory above what the loaded model took (every weight read once
first, so that pages of a mapped file count as the model's; the peak is then reset through
/proc/self/clear_refs), next to the model's own weights in memory
and one layer's largest merged weight in float32. CPU only (the figures are host memory; on a
GPU the same arithmetic runs on the card).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

OPERATIONS = ("push", "save", "push_before", "save_before")
GIB = 2**30


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _former_merged_state_dict(model) -> dict:
    """The merge as it was: a float32 delta for every adapted layer, then the whole dict."""
    import torch
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                deltas[f"{name}.weight"] = sum(module.get_delta_weight(a).float()
                                               for a in module.active_adapters)
        merged = {}
        for name, tensor in base.state_dict().items():
            if ".lora_" in name:
                continue
            name = name.replace(".base_layer.", ".")
            merged[name] = (tensor.float() + deltas[name]).to(tensor.dtype) \
                if name in deltas else tensor
    return merged


def worker(operation: str, model_dir: str, rank: int, base_dtype: str) -> dict:
    import torch

    from nftune.artifact import save_model_weights
    from nftune.config import build_config
    from nftune.policy import build_policy, merged_weights

    cfg = build_config(None, dict(model=model_dir, train_data="unused", device="cpu",
                                  lora_rank=rank, base_dtype=base_dtype,
                                  gradient_checkpointing="false"))
    model, _ = build_policy(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    weights = sum(t.numel() * t.element_size() for t in
                  {t.data_ptr(): t for t in model.state_dict().values()}.values())
    largest = max(t.numel() for n, t in model.state_dict().items() if "base_layer" in n) * 4
    dtype = getattr(torch, base_dtype)
    with torch.no_grad():  # every page of the weights resident (a loaded file may be mapped)
        for tensor in model.state_dict().values():
            tensor.sum()
    with tempfile.TemporaryDirectory() as tmp:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = _status("VmRSS")
        if operation == "push":
            count = sum(1 for _ in merged_weights(model))
        elif operation == "push_before":
            count = len(list(_former_merged_state_dict(model).items()))
        elif operation == "save":
            save_model_weights(model, Path(tmp), dtype)
            count = 1
        else:
            state = {n: t.to(dtype) for n, t in _former_merged_state_dict(model).items()}
            model.get_base_model().save_pretrained(tmp, state_dict=state)
            del state
            count = 1
        peak = _status("VmHWM")
    return {"operation": operation, "transient_gib": (peak - before) / GIB,
            "weights_gib": weights / GIB, "largest_layer_f32_gib": largest / GIB,
            "tensors": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2.5-0.5b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--base-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--only", default=",".join(OPERATIONS))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.model_dir, args.rank, args.base_dtype)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from rollout_engines import build_model_dir

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        build_model_dir(args.arch, tmp, args.base_dtype)
        print(f"{args.arch}, random weights, LoRA r{args.rank} on every linear layer, "
              f"{args.base_dtype} base; transient = peak RSS above the loaded model")
        results = {}
        for op in args.only.split(","):
            proc = subprocess.run([sys.executable, __file__, "--worker", op, "--model-dir", tmp,
                                   "--rank", str(args.rank), "--base-dtype", args.base_dtype],
                                  capture_output=True, text=True, env=env)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"  {op}: failed\n{proc.stderr[-2000:]}")
                continue
            results[op] = r = json.loads(lines[-1][7:])
            print(f"  {op:12s} transient {r['transient_gib']:6.3f} GiB = "
                  f"{r['transient_gib'] / r['weights_gib']:5.2f}x the model's weights "
                  f"({r['weights_gib']:.3f} GiB; one layer's float32 merge "
                  f"{r['largest_layer_f32_gib']:.3f} GiB)", flush=True)
        for op in ("push", "save"):
            if op in results and f"{op}_before" in results:
                print(f"{op}: {results[f'{op}_before']['transient_gib']:.3f} -> "
                      f"{results[op]['transient_gib']:.3f} GiB")


if __name__ == "__main__":
    main()
