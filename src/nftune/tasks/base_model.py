"""The demo's base model: a tiny Qwen2 taught the arithmetic task by a short supervised warm-up
on noisy worked solutions, saved as a normal HF model directory and cached."""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nftune.data import format_prompt
from nftune.tasks.arithmetic import make_problems
from nftune.tasks.tiny_model import char_tokenizer, save_model_dir, tiny_qwen2

TEMPLATE = "raw"  # the prompt is the expression itself; the solution starts on the next line


@dataclass(frozen=True)
class BaseSpec:
    """Everything that determines the base model; its hash names the cache entry."""

    level: int = 2
    seed: int = 0
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    train_problems: int = 4000
    noise: float = 0.3  # probability that a worked step is off by a little
    sft_steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3

    def key(self) -> str:
        return "-".join(f"{k}{v}" for k, v in asdict(self).items()).replace(".", "p")


def sft_example(problem_text: str, solution: str) -> tuple[str, str]:
    """(prompt, completion): the completion is what the model learns to write."""
    return format_prompt(problem_text, TEMPLATE), "\n" + solution


def build_base_model(path: str | Path, spec: BaseSpec = BaseSpec(), progress=None) -> Path:
    """Train the base model from scratch and save it to ``path`` (atomically)."""
    path = Path(path)
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    tokenizer = char_tokenizer()
    model = tiny_qwen2(tokenizer, hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
                       kv_heads=max(1, spec.heads // 2), seed=spec.seed)
    problems = make_problems(spec.train_problems, "train", spec.seed, spec.level)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.lr,
                                                   total_steps=spec.sft_steps, pct_start=0.1)
    eos = tokenizer.eos_token_id
    model.train()
    start = time.perf_counter()
    for step in range(spec.sft_steps):
        rows, targets = [], []
        for p in rng.sample(problems, spec.batch_size):
            prompt, completion = sft_example(p.text, p.solution(rng, spec.noise)[0])
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
            rows.append(prompt_ids + completion_ids)
            targets.append([-100] * len(prompt_ids) + completion_ids)  # loss on the answer only
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        attn = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None])
        loss = model(input_ids=ids, attention_mask=attn.long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, spec.sft_steps, loss.item())
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model_dir(model, tokenizer, tmp)
    (tmp / "nftune_base.json").write_text(json.dumps(
        {"spec": asdict(spec), "sft_seconds": round(time.perf_counter() - start, 1)}, indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def cached_base_model(cache_dir: str | Path, spec: BaseSpec = BaseSpec(), rebuild: bool = False,
                      progress=None) -> tuple[Path, bool]:
    """The base model for ``spec`` from the cache, building it if missing (or ``rebuild``).
    Returns (model dir, whether it was built now)."""
    path = Path(cache_dir) / spec.key()
    if path.exists() and (path / "nftune_base.json").exists() and not rebuild:
        return path, False
    return build_base_model(path, spec, progress), True
