"""What a run leaves behind: ``final/``, a Hugging Face model directory — weights in the dtype
the base model declares, the tokenizer, generation config, ``nftune_config.yaml`` and a model
card in the hub's format — with no optimizer or trainer state (those live in the step
checkpoints, for resuming). A LoRA run's ``final/`` holds the merged model plus ``adapter/``.
Also the disk-space arithmetic the trainer states at start and checks before every write.
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from nftune.config import TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONFIG_FILE = "nftune_config.yaml"


class DiskSpaceError(OSError):
    """Not enough free space for a write; nothing was written and nothing deleted."""


# ---------------------------------------------------------------------------------------------
# dtype
# ---------------------------------------------------------------------------------------------


def declared_dtype(model_path: str) -> torch.dtype:
    """The dtype a model directory or hub id declares (its config's ``dtype``, formerly
    ``torch_dtype``); float32 if it declares none."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return torch.float32
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = DTYPES.get(value.removeprefix("torch."))
    return value if isinstance(value, torch.dtype) else torch.float32


def final_dtype(cfg: TrainConfig) -> torch.dtype:
    """``final/``'s dtype: ``cfg.final_dtype``, where ``auto`` is the base model's own."""
    return declared_dtype(cfg.model) if cfg.final_dtype == "auto" else DTYPES[cfg.final_dtype]


# the largest weights file save_pretrained writes before sharding (transformers 5's default)
MAX_SHARD_BYTES = 50 * 10**9
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                      torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


def _tensor_header(shapes: list[tuple[str, torch.dtype, tuple[int, ...]]]
                   ) -> tuple[bytes, list[int]]:
    """A safetensors header for tensors of these names, dtypes and shapes, in this order, and
    each tensor's size in bytes (the layout of the format's specification: an 8-byte little-
    endian length, a JSON table of offsets padded to 8 bytes, then the raw tensors)."""
    import json

    table: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    sizes, offset = [], 0
    for name, dtype, shape in shapes:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        table[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        sizes.append(size)
        offset += size
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, sizes


def write_weights(directory: Path, shapes: list[tuple[str, torch.dtype, tuple[int, ...]]],
                  tensors, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write ``tensors`` (an iterator of (name, tensor) in the order of ``shapes``) as a Hugging
    Face model's weights — ``model.safetensors``, or shards and their index past
    ``max_shard_bytes`` — one tensor at a time: each is copied to host memory, written and
    dropped, so nothing close to the whole model's size is ever held. Returns the files."""
    import json

    element = {name: torch.empty((), dtype=dtype).element_size() for name, dtype, _ in shapes}
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    filled = 0
    for entry in shapes:
        size = math.prod(entry[2]) * element[entry[0]]
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(entry)
        filled += size
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    stream = iter(tensors)
    for file_name, shard in zip(names, shards, strict=True):
        header, _ = _tensor_header(shard)
        with open(directory / file_name, "wb") as f:
            f.write(header)
            for want, dtype, shape in shard:
                name, tensor = next(stream)
                if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                    raise ValueError(f"write_weights: expected {want} {dtype} {shape}, got "
                                     f"{name} {tensor.dtype} {tuple(tensor.shape)}")
                host = tensor.detach().contiguous().cpu().reshape(-1)
                f.write(memoryview(host.view(torch.uint8).numpy()))
                del host, tensor
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s) * element[n]
                                                for n, _, s in shapes)},
                 "weight_map": {n: f for f, shard in zip(names, shards, strict=True)
                                for n, _, _ in shard}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [directory / n for n in names]


def save_model_weights(model, directory: Path, dtype: torch.dtype) -> None:
    """The policy as a plain model directory in ``dtype`` (LoRA merged, adapters in
    ``adapter/``), written one tensor at a time (:func:`nftune.policy.merged_weights`,
    :func:`write_weights`): a save holds at most one layer's merged weight beyond the model.
    A weight that shares storage with an earlier one (tied embeddings) is written once, as
    ``save_pretrained`` does; the loader ties it again from the config."""
    from nftune.policy import is_lora, merged_weights

    base = model.get_base_model() if is_lora(model) else model
    seen, shapes, skip = set(), [], set()
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key in seen and tensor.numel():
            skip.add(name)
            continue
        seen.add(key)
        shapes.append((name, dtype if tensor.is_floating_point() else tensor.dtype,
                       tuple(tensor.shape)))
    directory.mkdir(parents=True, exist_ok=True)
    write_weights(directory, shapes, merged_weights(model, dtype, frozenset(skip)))
    config = copy.deepcopy(base.config)
    config.dtype = dtype  # the saved weights' dtype, which loaders read
    config.save_pretrained(directory)
    if getattr(base, "generation_config", None) is not None and base.can_generate():
        base.generation_config.save_pretrained(directory)
    if is_lora(model):
        model.save_pretrained(directory / "adapter", safe_serialization=True)


# ---------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------


def _hub_dataset(name: str) -> str | None:
    from nftune.data import KNOWN_SETS

    known = KNOWN_SETS.get(name)
    if known is not None:
        return known.repo
    return name if name.count("/") == 1 and not Path(name).exists() else None


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(cfg: TrainConfig, rows: list[dict[str, Any]], dtype: torch.dtype,
               run_name: str) -> str:
    """README.md for ``final/``: the hub's YAML header (base_model, library_name, tags,
    datasets), then what was trained, how, the last step's metrics, the held-out evaluation
    if one ran, and the command that reproduces it."""
    import yaml

    from nftune import __version__

    datasets = [d for d in [_hub_dataset(cfg.train_data)] if d]
    header = {"base_model": cfg.model, "library_name": "transformers",
              "tags": ["nftune", cfg.algo, "reinforcement-learning", "math"]}
    if datasets:
        header["datasets"] = datasets
    hparams = cfg.objective_hparams()
    last = rows[-1] if rows else {}
    train_keys = ("reward_mean", "reward_mean_trained", "entropy", "kept_fraction",
                  "response_length", "truncated_fraction", "lr")
    train_rows = [f"| {k} | {_number(last[k])} |" for k in train_keys if k in last]
    eval_rows = [f"| {k.removeprefix('eval/')} | {_number(v)} |" for k, v in last.items()
                 if k.startswith("eval/")]
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {run_name}", "",
             f"`{cfg.model}` fine-tuned online with **{cfg.algo}** by nftune {__version__}: "
             f"{cfg.answers_per_prompt} answers per question, verified, trained on the right "
             "and the wrong ones.", "",
             "## Training", "",
             "| setting | value |", "|---|---|",
             f"| objective | `{cfg.algo}` ({', '.join(f'{k}={v}' for k, v in hparams.items())}) |",
             f"| training data | `{cfg.train_data}` (template `{cfg.template}`) |",
             f"| reward | `{cfg.reward}` |",
             f"| steps | {last.get('step', 0)} of {cfg.steps} |",
             f"| questions × answers per step | {cfg.prompts_per_step} × "
             f"{cfg.answers_per_prompt} |",
             f"| mini-batches per step | {cfg.minibatches} |",
             f"| learning rate | {cfg.lr} ({cfg.lr_schedule}, warm-up {cfg.warmup_steps} "
             "optimizer steps) |",
             f"| max new tokens, temperature | {cfg.max_new_tokens}, {cfg.temperature} |",
             f"| LoRA | {'rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'no (full)'} |",
             f"| weights | {str(dtype).removeprefix('torch.')} |", ""]
    if train_rows:
        lines += ["## The last step's training metrics", "", "| metric | value |", "|---|---|",
                  *train_rows, ""]
    if eval_rows:
        lines += [f"## Held-out evaluation (step {last.get('step')}, `{cfg.eval_data}`)", "",
                  "| metric | value |", "|---|---|", *eval_rows, ""]
    lines += ["## Reproduce", "", "```bash",
              f"nftune train --config {CONFIG_FILE}   # the run's whole configuration", "```",
              "", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained("path/to/final")',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/final")', "```", ""]
    return "\n".join(lines)


def save_final_model(directory: Path, model, tokenizer, cfg: TrainConfig,
                     rows: list[dict[str, Any]]) -> None:
    """``final/`` written whole or not at all (a temporary directory, then a rename)."""
    from nftune.checkpoint import write_atomically

    dtype = final_dtype(cfg)

    def fill(tmp: Path) -> None:
        save_model_weights(model, tmp, dtype)
        tokenizer.save_pretrained(tmp)
        cfg.save(tmp / CONFIG_FILE)
        (tmp / "README.md").write_text(model_card(cfg, rows, dtype, Path(cfg.output_dir).name),
                                       encoding="utf-8")

    write_atomically(directory, fill)


# ---------------------------------------------------------------------------------------------
# Disk space
# ---------------------------------------------------------------------------------------------


def _distinct(tensors) -> list[torch.Tensor]:
    """Each tensor once: tensors that share storage (tied embeddings) count once."""
    return list({(t.data_ptr(), t.dtype, t.numel()): t for t in tensors}.values())


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in _distinct(tensors))


# a checkpoint's small files: trainer_state.json (the config, the optimizer's layout),
# manifest.json, the model's config files
CHECKPOINT_OVERHEAD = 16 * 1024


def checkpoint_bytes(model) -> int:
    """A step checkpoint's size: what it stores of the model (all weights, or a LoRA run's
    adapters) plus AdamW's two float32 moments per trained weight and the small files."""
    from nftune.policy import is_lora

    trained = [p for p in model.parameters() if p.requires_grad]
    stored = trained if is_lora(model) else list(model.state_dict().values())
    return _tensor_bytes(stored) + 2 * sum(p.numel() for p in trained) * 4 + CHECKPOINT_OVERHEAD


def final_bytes(model, dtype: torch.dtype) -> int:
    """``final/``'s size: every weight in ``dtype`` (plus a LoRA run's adapters)."""
    from nftune.policy import is_lora

    base = model.get_base_model() if is_lora(model) else model
    weights = [p for n, p in base.state_dict().items() if ".lora_" not in n]
    size = sum(t.numel() for t in _distinct(weights))
    adapters = _tensor_bytes([p for p in model.parameters() if p.requires_grad]) \
        if is_lora(model) else 0
    return size * torch.empty((), dtype=dtype).element_size() + adapters


def tokenizer_bytes(tokenizer) -> int:
    """What the tokenizer's files take (saved once to a temporary directory)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def free_bytes(directory: Path) -> int:
    """Free space on the filesystem that holds ``directory`` (or its nearest existing parent)."""
    path = directory
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_space(directory: Path, needed: int, what: str) -> None:
    """Raise :class:`DiskSpaceError` naming ``directory`` and the bytes ``what`` needs if the
    filesystem has less free (a margin of 1% or 16 MB is kept)."""
    free = free_bytes(directory)
    margin = max(16 * 10**6, needed // 100)
    if free < needed + margin:
        raise DiskSpaceError(
            f"{directory}: writing {what} needs {human(needed)} ({needed} bytes) and "
            f"{human(free)} is free; nothing was written and earlier checkpoints are untouched "
            "(free space, lower keep_checkpoints, or pick another --output-dir)")
