"""The policy π_θ: loading the model and tokenizer, where it runs, at what precision, and the
optimizer and learning-rate schedule that update it. (LoRA and gradient checkpointing belong
here.)"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from nftune.config import TrainConfig


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def load_tokenizer(path: str):
    """The tokenizer of the model at ``path``. Character-level tokenizers saved as
    ``PreTrainedTokenizerFast`` are loaded as such (``AutoTokenizer`` would swap a qwen2
    directory's tokenizer for the byte-level Qwen one)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not path:
        raise ValueError("model: no model given (--model PATH_OR_HUB_ID)")
    local = Path(path)
    looks_local = path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").exists():
        raise FileNotFoundError(f"model: {path} is not a model directory (no config.json)")
    tok_class = AutoTokenizer
    tok_config = local / "tokenizer_config.json"
    if tok_config.exists():
        declared = json.loads(tok_config.read_text()).get("tokenizer_class")
        if declared in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            tok_class = PreTrainedTokenizerFast
    try:
        tokenizer = tok_class.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(f"model: cannot load {path} ({err})") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"model: the tokenizer of {path} has no EOS token")
    return tokenizer


def load_policy(path: str, device: torch.device, safetensors_only: bool = False):
    """The causal LM and its tokenizer (:func:`load_tokenizer`). ``safetensors_only`` (for
    checkpoints nftune wrote) never reads a pickle-based weights file that may sit beside
    them."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, **({"use_safetensors": True} if safetensors_only else {}))
    except OSError as err:
        raise FileNotFoundError(f"model: cannot load {path} ({err})") from None
    return model.to(device), tokenizer


def precision(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The precision of the update's forward passes: bf16 autocast when ``cfg.bf16``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                             betas=(cfg.adam_beta1, cfg.adam_beta2))


def make_scheduler(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then constant or cosine to 0 at
    the last of ``steps × minibatches``."""
    total = max(1, cfg.steps * cfg.minibatches)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
