"""The policy π_θ: loading the model and tokenizer, where it runs, at what precision, LoRA
adapters and gradient checkpointing, how it is saved, and the optimizer and learning-rate
schedule that update it."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from nftune.config import TrainConfig


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return torch.device(name)


# values a decoder layer keeps for backward per token: 8 H + 4 I + 4 kv (counted from Qwen2's
# layer: norms, attention projections and output, the MLP's gate, up, activation and product)
ACTIVATION_TERMS = (8, 4, 4)


def activation_bytes(model_config, tokens: int, bytes_per_value: int = 4) -> int | None:
    """Activations a full forward keeps for backward over ``tokens`` tokens, all layers, by
    :data:`ACTIVATION_TERMS`; None if the config does not say the decoder's shape."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") \
        else model_config
    hidden = getattr(text, "hidden_size", None)
    layers = getattr(text, "num_hidden_layers", None)
    if not hidden or not layers:
        return None
    inner = getattr(text, "intermediate_size", None) or 4 * hidden
    heads = getattr(text, "num_attention_heads", None) or 1
    kv = hidden // heads * (getattr(text, "num_key_value_heads", None) or heads)
    a, b, c = ACTIVATION_TERMS
    return tokens * layers * (a * hidden + b * inner + c * kv) * bytes_per_value


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of a GPU, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def training_memory_bytes(cfg: TrainConfig, device: torch.device,
                          device_bytes: int | None = None) -> int:
    """What the trainer has of the device: all of it, less vLLM's share where vLLM runs
    colocated on a GPU and keeps its memory through the update (``vllm_sleep`` false)."""
    total = device_memory_bytes(device) if device_bytes is None else device_bytes
    if device.type == "cuda" and cfg.rollout_engine == "vllm" and not cfg.vllm_sleep:
        return int(total * (1 - cfg.vllm_gpu_memory_utilization))
    return total


def uses_gradient_checkpointing(cfg: TrainConfig, model_config=None,
                                device_bytes: int | None = None,
                                device: torch.device | None = None) -> bool:
    """``gradient_checkpointing`` resolved: true/false as set; auto is on where one
    micro-batch's activations (``micro_batch_tokens``; bf16 compute halves them) would exceed 1/8 of
    the memory the trainer has of the device (:func:`training_memory_bytes`; ``device_bytes``:
    the device's total), or where the model's config does not say its shape."""
    if cfg.gradient_checkpointing != "auto":
        return cfg.gradient_checkpointing == "true"
    if model_config is None:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(cfg.model)
    device = device or pick_device(cfg.device)
    available = training_memory_bytes(cfg, device, device_bytes)
    half = cfg.uses_bf16(device.type) or (cfg.lora_rank > 0 and cfg.base_dtype == "bfloat16")
    need = activation_bytes(model_config, cfg.micro_batch_tokens, 2 if half else 4)
    return need is None or need > available / 8


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


def load_policy(path: str, device: torch.device, safetensors_only: bool = False,
                dtype: torch.dtype = torch.float32):
    """The causal LM and its tokenizer (:func:`load_tokenizer`). ``safetensors_only`` (for
    checkpoints nftune wrote) never reads a pickle-based weights file that may sit beside
    them."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, **({"use_safetensors": True} if safetensors_only else {}))
    except OSError as err:
        raise FileNotFoundError(f"model: cannot load {path} ({err})") from None
    return model.to(device), tokenizer


def build_policy(cfg: TrainConfig, device: torch.device, checkpoint: Path | None = None):
    """The policy a run trains, and its tokenizer: ``cfg.model`` (or the checkpoint's weights)
    with gradient checkpointing and LoRA adapters as configured. A LoRA checkpoint holds the
    adapters only: the base comes from ``cfg.model`` again. The frozen base of a LoRA run is
    held in ``cfg.base_dtype``; adapters, and every weight of a full fine-tune, in float32."""
    lora = cfg.lora_rank > 0
    source = str(checkpoint) if checkpoint is not None and not lora else cfg.model
    dtype = getattr(torch, cfg.base_dtype) if lora else torch.float32
    model, tokenizer = load_policy(source, device, safetensors_only=source != cfg.model,
                                   dtype=dtype)
    if not lora:
        own_cpu_weights(model)
    if uses_gradient_checkpointing(cfg, model.config, device=device):
        # recompute each layer's activations in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not lora:
        return model, tokenizer
    from peft import LoraConfig, PeftModel, get_peft_model

    if checkpoint is None:
        targets = cfg.lora_target_modules
        config = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            task_type="CAUSAL_LM",
            target_modules=targets if targets == "all-linear" else
            [t.strip() for t in targets.split(",") if t.strip()])
        return get_peft_model(model, config), tokenizer  # adapters in float32
    if not (checkpoint / "adapter_model.safetensors").exists():
        raise FileNotFoundError(f"{checkpoint}: no adapter_model.safetensors (LoRA checkpoint)")
    return PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True), tokenizer


def own_cpu_weights(model) -> None:
    """Give each CPU weight memory of its own, in place, one tensor at a time.

    safetensors and ``from_pretrained`` hand CPU tensors over as views of the file, mapped
    copy-on-write. A weight or AdamW moment that trains is rewritten every step, so the first
    step after loading faults every page in and copies it, inside the optimizer's loop: at
    Qwen2.5-0.5B's shape on two CPU cores the first step after a resume took 2.2x an owned
    one (benchmarks/first_step_after_load.py, docs/performance.md). Copying once at load is
    a plain read. Weights on another device already own their memory."""
    with torch.no_grad():
        for weight in model.parameters():
            if weight.device.type == "cpu":
                weight.data = weight.data.clone()


def own_cpu_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """:func:`own_cpu_weights` for the optimizer's state after ``load_state_dict``: each CPU
    tensor is replaced by a copy, so the checkpoint file's mapping is released as it goes."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                state[key] = value.clone()


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def merged_weights(model, dtype: torch.dtype | None = None, exclude: frozenset[str] = frozenset()
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under the plain model's names, one tensor at a time, in state-dict
    order: a LoRA-adapted weight is merged as it is reached (W + scale · B A, summed in float32
    and stored in W's dtype), so what is held beyond the model is one layer's delta and its
    merged copy; without LoRA, the model's own tensors. ``dtype`` casts floating tensors (one
    at a time too). Tensors that share storage (tied embeddings) come once per name, sharing
    unless cast; names in ``exclude`` (plain names) are skipped before any work. The trained
    model itself is left as it is."""
    base = model.get_base_model() if is_lora(model) else model
    modules = dict(base.named_modules()) if is_lora(model) else {}
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            if ".lora_" in name or name.replace(".base_layer.", ".") in exclude:
                continue
            owner, _, leaf = name.rpartition(".")
            layer = modules.get(owner.removesuffix(".base_layer")) \
                if owner.endswith(".base_layer") and leaf == "weight" else None
            if layer is not None and getattr(layer, "active_adapters", None):
                merged = tensor.to(torch.float32, copy=True)  # never W itself
                for adapter in layer.active_adapters:
                    merged += layer.get_delta_weight(adapter).float()
                tensor = merged.to(dtype or tensor.dtype)
                del merged
            elif dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            yield name.replace(".base_layer.", "."), tensor


def save_policy(model, directory: Path) -> None:
    """The policy for a step checkpoint: a Hugging Face model directory, or with LoRA the
    adapters alone (``adapter_model.safetensors``, ``adapter_config.json``). ``final/`` is
    written by :func:`nftune.artifact.save_model_weights`."""
    model.save_pretrained(directory, safe_serialization=True)


def precision(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The precision of every forward pass: bf16 autocast where ``bf16`` resolves to on for
    ``device`` (:meth:`TrainConfig.uses_bf16`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.uses_bf16(device.type))


def set_matmul_precision(device: torch.device) -> str:
    """On CUDA, TF32 for the matmuls and convolutions that stay float32 (outside autocast, or
    every one with ``bf16: false``), as TRL and verl run; CPU is left as it is. Returns what was
    set, for the log."""
    if device.type != "cuda":
        return "float32 matmuls in full precision (CPU)"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "TF32 for float32 matmuls (CUDA)"


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the weights that train (every weight, or LoRA's adapters); PyTorch's fused
    kernel on CPU and CUDA (Hugging Face Trainer's default since torch 2.8): one pass per
    tensor instead of the for-each path's temporaries, which added 1.0 GiB to a 0.5B model's
    optimizer step (docs/performance.md)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") for p in trainable) or None
    return torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused)


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
