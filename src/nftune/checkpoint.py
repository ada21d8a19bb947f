"""The run directory: atomic checkpoints, their pruning, and the append-only metrics log."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(directory: Path, model, tokenizer, state: dict[str, Any]) -> None:
    """Write a HF model dir + trainer state into a temp dir, then rename it into place."""
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    if directory.exists():
        old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = [(int(p.name.split("-")[1]), p) for p in (output_dir / "checkpoints").glob("step-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.pt").exists()]
    return max(found)[1] if found else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    found = sorted((int(p.name.split("-")[1]), p)
                   for p in (output_dir / "checkpoints").glob("step-*")
                   if p.name.split("-")[1].isdigit())
    for _, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path)


class MetricsLog:
    """metrics.jsonl, one line per step, appended and flushed; optional TensorBoard / W&B."""

    def __init__(self, path: Path, report_to: str, config: dict[str, Any]):
        self.file = path.open("a", encoding="utf-8")
        self.backend: Any = None
        self.kind = report_to
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.backend = SummaryWriter(str(path.parent / "tensorboard"))
        elif report_to == "wandb":
            import wandb

            self.backend = wandb.init(project="nftune", dir=str(path.parent), config=config,
                                      mode=os.environ.get("WANDB_MODE", "offline"))

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.kind == "tensorboard":
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.backend.add_scalar(key, value, row["step"])
        elif self.kind == "wandb":
            self.backend.log(row, step=row["step"])

    def close(self) -> None:
        self.file.close()
        if self.backend is not None:
            self.backend.close() if self.kind == "tensorboard" else self.backend.finish()


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
