"""The training configuration: one dataclass, one help string per field, YAML + CLI overrides.

Fields left as ``None`` take the paper's per-algorithm default in :meth:`TrainConfig.resolve`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

ALGOS = ("nft", "rft", "grpo", "dr_grpo", "dapo", "infonca")


# where and on what a run executes: free to differ on resume (a run directory can move)
RESUME_FREE_KEYS = ("output_dir", "data_dir", "device", "verify_workers")
# may change on resume with --allow-changes: bookkeeping and evaluation, never what is trained;
# steps only with a constant learning rate (the cosine schedule depends on it)
RESUME_SAFE_KEYS = ("steps", "save_every", "keep_checkpoints", "eval_every", "eval_data",
                    "eval_limit", "eval_k", "eval_temperature", "eval_top_p",
                    "eval_max_new_tokens", "report_to", "verify_timeout_s")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- what to train ---
    model: str = _f("", "Hugging Face causal LM directory or hub id (the policy π_θ).")
    train_data: str = _f("", "Question set: known name (dapo17k, math500, ...), "
                             ".jsonl/.json/.parquet file, or hub dataset id.")
    data_dir: str | None = _f(None, "Directory with <name>.jsonl files for known set names "
                                    "(default: $NFTUNE_DATA_DIR, else the hub).")
    train_limit: int | None = _f(None, "Use only the first N training questions.")
    template: str = _f("dapo", "Prompt template: dapo | boxed | raw | chat | chat:<inner>. "
                               "The verifier's answer extraction follows it.")
    algo: str = _f("nft", "Objective: nft | rft | grpo | dr_grpo | dapo | infonca.")
    output_dir: str = _f("runs/nft", "Where metrics.jsonl, checkpoints/ and config.yaml go.")
    seed: int = _f(0, "Seed of the data order, sampling and initialisation of the run.")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N.")
    bf16: bool = _f(False, "bf16 autocast for forward passes (log-softmax stays fp32).")
    # --- Algorithm 1: rollout ---
    steps: int = _f(100, "Rollout steps (paper: ~320 at 7B).")
    prompts_per_step: int = _f(16, "Questions per rollout step, after filtering (paper: 512).")
    answers_per_prompt: int = _f(8, "K, answers sampled per question (paper: 16).")
    max_new_tokens: int = _f(256, "Response length limit; longer answers are truncated and "
                                  "count as wrong (paper: 4K).")
    temperature: float = _f(1.0, "Sampling temperature of rollouts; every log-prob of π_old "
                                 "and π_θ is of logits / temperature, the distribution "
                                 "sampled from (paper: 1.0).")
    top_p: float = _f(1.0, "Nucleus sampling of rollouts (1.0 = off). It only restricts "
                           "which tokens are drawn: log-probs stay over the full vocabulary.")
    top_k: int = _f(0, "Top-k of rollouts (0 = off; generate's own default would be 50).")
    gen_batch_size: int = _f(64, "Answers per generate call.")
    old_logprobs: str = _f("generate", "Where π_old's per-token log-probs come from: "
                                       "generate (recorded from the sampling steps' own "
                                       "logits, no extra pass) | recompute (a no-grad "
                                       "forward over the rollout).")
    dynamic_sampling: bool | None = _f(None, "Keep only questions with 0 < r̂ < 1 and "
                                             "generate more until the batch is full "
                                             "(default: on for nft, rft, dapo, infonca; off "
                                             "for grpo, dr_grpo).")
    max_gen_batches: int = _f(4, "Most generation rounds per step when dynamic sampling.")
    overlong_shaping: bool | None = _f(None, "DAPO's soft penalty for answers in the last "
                                             "overlong_buffer of max_new_tokens "
                                             "(default: on for dapo only).")
    overlong_buffer: float = _f(0.25, "Fraction of max_new_tokens in which the overlong "
                                      "penalty ramps from 0 to −1 (DAPO: 4K of 20K).")
    # --- Algorithm 1: update ---
    minibatches: int = _f(4, "Optimizer steps per rollout; later ones are off-policy "
                             "(paper: 16).")
    micro_batch_tokens: int = _f(16384, "Padded tokens per forward/backward; bounds memory, "
                                        "never changes the gradient.")
    lr: float = _f(1e-6, "AdamW learning rate (paper: 1e-6).")
    warmup_steps: int = _f(10, "Linear warm-up, in optimizer steps.")
    lr_schedule: str = _f("constant", "After warm-up: constant | cosine.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW β1.")
    adam_beta2: float = _f(0.999, "AdamW β2.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm (0 = off).")
    # --- objective hyper-parameters ---
    eps: float = _f(1.0, "NFT: clip ε of the negative ratio (paper: 1.0).")
    weight: str | None = _f(None, "NFT/RFT prompt weight ω: dr_grpo (1 − r̂) | grpo "
                                  "(sqrt((1 − r̂)/r̂)) | one (default: dr_grpo for nft, "
                                  "one for rft).")
    clip_low: float = _f(0.2, "GRPO/DAPO: lower clip ε_low.")
    clip_high: float = _f(0.28, "GRPO/DAPO: upper clip ε_high (clip-higher).")
    beta: float = _f(0.1, "InfoNCA: β (paper ablates 0.1, 0.02, 0.01).")
    sft_coef: float = _f(1.0, "InfoNCA: weight of the SFT term on correct answers.")
    max_nan_steps: int = _f(3, "Stop after this many optimizer steps in a row with a "
                               "non-finite loss or gradient.")
    # --- verification ---
    verify_workers: int | None = _f(None, "Verifier processes (default: CPU count, max 8).")
    verify_timeout_s: float = _f(5.0, "Time limit per verification.")
    # --- evaluation during training ---
    eval_every: int = _f(0, "Evaluate every N steps and at the end (0 = never).")
    eval_data: str = _f("", "Comma-separated evaluation sets (names or paths).")
    eval_limit: int | None = _f(None, "Evaluate on the first N questions of each set.")
    eval_k: int = _f(1, "Samples per evaluation question (avg@k).")
    eval_temperature: float = _f(0.0, "Evaluation temperature (0 = greedy).")
    eval_top_p: float = _f(1.0, "Evaluation nucleus sampling.")
    eval_max_new_tokens: int | None = _f(None, "Evaluation response limit "
                                               "(default: max_new_tokens).")
    # --- bookkeeping ---
    save_every: int = _f(50, "Checkpoint every N steps (0 = only final/).")
    keep_checkpoints: int = _f(2, "Keep the last N step checkpoints.")
    report_to: str = _f("none", "none | tensorboard | wandb (wandb offline works without "
                                "network).")

    def resolve(self) -> TrainConfig:
        """Fill per-algorithm defaults and validate; returns self."""
        if self.algo not in ALGOS:
            raise ValueError(f"algo: unknown {self.algo!r}; valid: {list(ALGOS)}")
        if self.weight is None:
            self.weight = {"nft": "dr_grpo", "rft": "one"}.get(self.algo)
        if self.dynamic_sampling is None:
            self.dynamic_sampling = self.algo not in ("grpo", "dr_grpo")
        if self.overlong_shaping is None:
            self.overlong_shaping = self.algo == "dapo"
        checks = [
            (self.steps >= 1, f"steps: must be at least 1, got {self.steps}"),
            (self.keep_checkpoints >= 1, "keep_checkpoints: must be at least 1 (0 would delete "
                                         "every checkpoint as it is written)"),
            (self.save_every >= 0, "save_every: must be 0 (only final/) or more"),
            (self.eval_every >= 0, "eval_every: must be 0 (never) or more"),
            (self.gen_batch_size >= 1, "gen_batch_size: must be at least 1"),
            (self.micro_batch_tokens >= 1, "micro_batch_tokens: must be at least 1"),
            (self.max_gen_batches >= 1, "max_gen_batches: must be at least 1"),
            (self.warmup_steps >= 0, "warmup_steps: must be 0 or more"),
            (self.lr >= 0, "lr: must not be negative"),
            (self.temperature > 0, "temperature: must be positive"),
            (0 < self.top_p <= 1, "top_p: must be in (0, 1]"),
            (self.top_k >= 0, "top_k: must be 0 (off) or more"),
            (self.verify_timeout_s > 0, "verify_timeout_s: must be positive"),
            (self.eval_k >= 1, "eval_k: must be at least 1"),
            (self.max_nan_steps >= 1, "max_nan_steps: must be at least 1"),
            (self.answers_per_prompt >= 2, "answers_per_prompt: needs at least 2 answers"),
            (self.prompts_per_step >= 1, "prompts_per_step: must be at least 1"),
            (1 <= self.minibatches <= self.prompts_per_step,
             "minibatches: must be between 1 and prompts_per_step"),
            (self.old_logprobs in ("recompute", "generate"),
             "old_logprobs: must be recompute or generate"),
            (self.lr_schedule in ("constant", "cosine"), "lr_schedule: constant or cosine"),
            (self.report_to in ("none", "tensorboard", "wandb"),
             "report_to: none, tensorboard or wandb"),
            (0 < self.overlong_buffer < 1, "overlong_buffer: a fraction in (0, 1)"),
            (self.eps > 0, "eps: must be positive"),
            (self.max_new_tokens >= 1, "max_new_tokens: must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.weight is not None and self.algo not in ("nft", "rft"):
            raise ValueError(f"weight: only nft and rft take a prompt weight, not {self.algo}")
        return self

    def objective_hparams(self) -> dict[str, Any]:
        """The keyword arguments of ``compute_loss`` for this algorithm."""
        return {
            "nft": {"eps": self.eps, "weight": self.weight},
            "rft": {"weight": self.weight},
            "grpo": {"clip_low": self.clip_low, "clip_high": self.clip_high},
            "dr_grpo": {"clip_low": self.clip_low, "clip_high": self.clip_high},
            "dapo": {"clip_low": self.clip_low, "clip_high": self.clip_high},
            "infonca": {"beta": self.beta, "sft_coef": self.sft_coef},
        }[self.algo]

    def check_resume(self, saved: dict[str, Any], allow_changes: bool = False) -> list[str]:
        """Compare with the config a checkpoint was saved under. Returns the keys that changed
        (each safe to change on resume, allowed by ``allow_changes``); raises ValueError naming
        every changed key otherwise."""
        now = {k: v for k, v in self.to_dict().items() if k not in RESUME_FREE_KEYS}
        changed = [k for k in now if k in saved and saved[k] != now[k]]
        changed += [k for k in saved if k not in now and k not in RESUME_FREE_KEYS]
        if not changed:
            return []
        safe = set(RESUME_SAFE_KEYS) - ({"steps"} if self.lr_schedule != "constant" else set())
        show = ", ".join(f"{k} ({saved.get(k)!r} → {now.get(k)!r})" for k in changed)
        unsafe = [k for k in changed if k not in safe]
        if unsafe:
            raise ValueError(
                f"--resume: the run was trained with another config; changed: {show}. "
                f"{', '.join(unsafe)} cannot change on resume (the run would no longer be the "
                "one config.yaml describes); start a new run in another --output-dir")
        if not allow_changes:
            raise ValueError(f"--resume: changed: {show}. These may change on resume: pass "
                             "--allow-changes to accept them")
        return changed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def field_help() -> list[tuple[str, str, Any]]:
    """(name, help, default) for every field: the source of docs/config.md and --help."""
    return [(f.name, f.metadata["help"], f.default) for f in dataclasses.fields(TrainConfig)]


def config_markdown() -> str:
    """docs/config.md: every field, its default and its help (a test keeps the file current)."""
    lines = ["# Configuration", "",
             "Every field of `nftune.config.TrainConfig`, settable in a YAML file "
             "(`--config FILE.yaml`) and on the command line (`--key value`, dashes or "
             "underscores). A key that does not exist is an error naming the closest ones. "
             "`None` means the per-algorithm default of the paper, filled in by `resolve()`.",
             "", "| key | default | meaning |", "|---|---|---|"]
    for name, help_text, default in field_help():
        lines.append(f"| `{name}` | `{default!r}` | {help_text.replace('|', '/')} |")
    lines += ["", "Regenerate with `python -c \"from nftune.config import config_markdown; "
              "print(config_markdown(), end='')\" > docs/config.md`.", ""]
    return "\n".join(lines)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML or command-line value to the field's type."""
    args = [a for a in get_args(hint) if a is not type(None)]
    optional = get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint)
    target = args[0] if optional else hint
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none",
                                                                                    "null")):
        if optional:
            return None
        raise ValueError(f"{name}: a value is required")
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if target is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() \
                else int(value)
        if target is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {getattr(target, '__name__', target)}, "
                         f"got {value!r}") from None


def build_config(yaml_path: str | None = None, overrides: dict[str, Any] | None = None
                 ) -> TrainConfig:
    """Defaults ← YAML file ← overrides (e.g. from the command line); unknown keys are errors
    that name the closest valid keys."""
    values: dict[str, Any] = {}
    if yaml_path:
        path = Path(yaml_path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: config file not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
        values.update(loaded)
    values.update(overrides or {})
    hints = get_type_hints(TrainConfig)
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint}")
        kwargs[name] = _coerce(name, value, hints[name])
    return TrainConfig(**kwargs).resolve()


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs → dict (values typed later)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}; use --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"--{key}: missing value")
            value = tokens[i + 1]
            i += 1
        out[key] = value
        i += 1
    return out
