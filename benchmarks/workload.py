"""The benchmarks' shared workload: the demo's base model, arithmetic questions, and nftune's
trainer configured for P questions × K answers with M mini-batches.

Heavy imports stay inside the functions: the verifier's worker processes may import the
calling script, and should not pay for torch on start-up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "nftune" / "demo-base"))


def base_model(cache: str) -> Path:
    from nftune.tasks.base_model import BaseSpec, cached_base_model

    path, _ = cached_base_model(cache, BaseSpec())
    return path


def questions(n: int = 2000):
    from nftune.tasks.arithmetic import make_questions

    return make_questions(n, "train", 0, 2)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU, {torch.get_num_threads()} torch threads"


def workload_config(args: argparse.Namespace, workdir: Path, **overrides: Any):
    """nftune's resolved config for the workload (questions written to ``workdir``)."""
    from nftune.config import build_config

    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps(q.__dict__) + "\n" for q in questions()))
    settings = dict(
        model=str(base_model(args.cache)), train_data=str(data), template="raw", algo="grpo",
        output_dir=str(workdir / "nftune"), prompts_per_step=args.prompts,
        answers_per_prompt=args.k, max_new_tokens=args.new_tokens,
        minibatches=args.minibatches, lr=1e-6, warmup_steps=0,
        gen_batch_size=args.prompts * args.k, verify_workers=2)
    settings.update(overrides)
    cfg = build_config(None, settings)
    cfg.resolve()
    return cfg


def make_trainer(cfg):
    """The trainer ``nftune train`` builds (model, data, AdamW and schedule, verifier with its
    pool starting in the background); drive it with ``trainer.step()``."""
    from nftune.train import Trainer

    return Trainer(cfg)
