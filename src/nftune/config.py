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

from nftune.sampling import Sampling, is_greedy

# ---------------------------------------------------------------------------------------------
# Generation engines, declared here so that the config can validate a name without importing
# torch; the classes live in nftune.rollout. Adding an engine: its class there, one line here.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSpec:
    """A generation engine: where its class is and what the config must know of it."""

    path: str  # "module:Class"
    # True if generate(record_logprobs=True) gives π_old's log-probs as the trainer's own
    # forward computes them (then old_logprobs: generate saves that forward)
    records_logprobs: bool


ENGINES: dict[str, EngineSpec] = {
    "hf": EngineSpec("nftune.rollout:HFEngine", records_logprobs=True),
    "vllm": EngineSpec("nftune.rollout:VLLMEngine", records_logprobs=False),
}


def engine_class(name: str) -> type:
    """The class of engine ``name`` (imported on first use)."""
    import importlib

    if name not in ENGINES:
        raise ValueError(f"engine: unknown {name!r}; valid: {sorted(ENGINES)}")
    module, _, cls = ENGINES[name].path.partition(":")
    return getattr(importlib.import_module(module), cls)

# where and on what a run executes: free to differ on resume (a run directory can move)
RESUME_FREE_KEYS = ("output_dir", "data_dir", "device", "verify_workers",
                    "vllm_gpu_memory_utilization", "vllm_sleep", "gradient_checkpointing",
                    "fit_check", "distributed_timeout_s")
# may change on resume with --allow-changes: bookkeeping and evaluation, never what is trained;
# steps only with a constant learning rate (the cosine schedule depends on it)
RESUME_SAFE_KEYS = ("steps", "save_every", "keep_checkpoints", "eval_every", "eval_data",
                    "eval_limit", "eval_k", "eval_temperature", "eval_top_p",
                    "eval_max_new_tokens", "report_to", "verify_timeout_s", "run_name",
                    "final_dtype", "wandb_project", "log_completions_every",
                    "log_completions_prompts")


def resume_safe_keys(lr_schedule: str) -> set[str]:
    """The keys of ``RESUME_SAFE_KEYS`` a run under ``lr_schedule`` may change on resume:
    ``steps`` only with a constant learning rate after warm-up, where the first steps of a
    longer run are the shorter run's (a cosine schedule is stretched by it)."""
    return set(RESUME_SAFE_KEYS) - ({"steps"} if lr_schedule != "constant" else set())


def _absolute_py_files(spec: str) -> str:
    """``spec`` (comma-separated ``file.py``, ``file.py:function*weight``, modules) with each
    ``.py`` file that exists written as its absolute path; the rest as it is."""
    def absolute(part: str) -> str:
        stem, dot_py, rest = part.strip().partition(".py")
        path = Path(stem + dot_py).expanduser()
        if dot_py and (not rest or rest.startswith(":")) and path.is_file():
            return str(path.resolve()) + rest
        return part.strip()

    return ",".join(absolute(p) for p in spec.split(",")) if spec else spec


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- what to train ---
    model: str = _option("", "Hugging Face causal LM directory or hub id (the policy π_θ).")
    train_data: str = _option("", "Question set: known name (dapo17k, math500, ...), "
                                  ".jsonl/.json/.parquet file, or hub dataset id.")
    data_dir: str | None = _option(None, "Directory with <name>.jsonl files for known set names "
                                         "(default: $NFTUNE_DATA_DIR, else the hub).")
    train_limit: int | None = _option(None, "Use only the first N training questions.")
    template: str = _option("dapo", "Prompt template: dapo | boxed | raw | chat | chat:<inner>. "
                                    "The verifier's answer extraction follows it.")
    algo: str = _option("nft", "Objective: nft | rft | grpo | dr_grpo | dapo | infonca, or one "
                               "registered by a plugin.")
    plugins: str = _option("", "Comma-separated Python modules or .py files imported before the "
                               "run; they may register objectives.")
    output_dir: str = _option("runs/nft", "Where metrics.jsonl, checkpoints/ and config.yaml go.")
    seed: int = _option(0, "Seed of the data order, sampling and initialisation of the run.")
    device: str = _option("auto", "auto | cpu | cuda | cuda:N.")
    bf16: str = _option("auto", "bf16 autocast for every forward pass: sampling, π_old's "
                                "log-probs and the update alike (log-softmax, master weights and "
                                "AdamW's states stay fp32); vLLM then runs in bf16. auto: on for "
                                "CUDA (with TF32 for what stays fp32), off on CPU (where bf16 "
                                "matmuls can be slower than fp32); true | false to choose. "
                                "Decided and logged at start.")
    fit_check: bool = _option(True, "Refuse, before the model loads, a run that the memory "
                                    "model (nftune plan) says cannot fit the device; false "
                                    "to run it anyway.")
    gradient_checkpointing: str = _option(
        "auto", "Recompute each layer's activations in backward instead of keeping them (less "
                "memory, ~1/3 more compute). auto: on where the activations of one micro-batch "
                "(micro_batch_tokens, estimated from the model's config) would exceed 1/8 of the "
                "device's memory (a GPU's, or the machine's RAM) — every model from 0.5B up at "
                "the default budget, not the demo's tiny model; true | false to choose.")
    lora_rank: int = _option(0, "LoRA rank r (PEFT); 0 = train every weight. Only adapters "
                                "train and are checkpointed; final/ holds the merged model.")
    lora_alpha: float | None = _option(None, "LoRA α; the update is scaled by α / r "
                                             "(default 2 r).")
    lora_dropout: float = _option(0.0, "LoRA dropout. Above 0 the update's π_θ is noisier than "
                                       "π_old's (dropout is off when sampling): keep 0 for "
                                       "exact ratios.")
    lora_target_modules: str = _option("all-linear", "Modules that get adapters: all-linear "
                                                     "(every linear layer but the LM head) or "
                                                     "names, e.g. q_proj,v_proj.")
    base_dtype: str = _option("float32", "With LoRA: dtype of the frozen base weights, float32 "
                                         "| bfloat16 (half the memory); adapters and their "
                                         "optimizer stay float32.")
    # --- Algorithm 1: rollout ---
    rollout_engine: str = _option("hf", "Generation engine: hf (Hugging Face generate on the "
                                        "trained model) | vllm (vLLM in this process; the "
                                        "vllm extra).")
    vllm_gpu_memory_utilization: float = _option(0.4, "vllm: fraction of GPU memory for vLLM's "
                                                      "weights and KV cache; the trainer "
                                                      "shares the card.")
    vllm_sleep: bool = _option(False, "vllm: free vLLM's weights and KV cache from the end of "
                                      "each step's rollout (after its last refill) through the "
                                      "update (GPU only); on waking the weights come back first, "
                                      "are pushed, then the KV cache.")
    vllm_max_model_len: int | None = _option(None, "vllm: longest prompt + answer vLLM serves "
                                                   "(default: the run's longest prompt, training "
                                                   "and evaluation sets, + the larger answer "
                                                   "budget, within the model's context).")
    steps: int = _option(100, "Rollout steps (paper: ~320 at 7B).")
    prompts_per_step: int = _option(16, "Questions per rollout step, after filtering (paper: 512).")
    answers_per_prompt: int = _option(8, "K, answers sampled per question (paper: 16).")
    max_new_tokens: int = _option(256, "Response length limit; longer answers are truncated and "
                                       "count as wrong (paper: 4K).")
    temperature: float = _option(1.0, "Sampling temperature of rollouts; every log-prob of π_old "
                                      "and π_θ is of logits / temperature, the distribution "
                                      "sampled from (paper: 1.0).")
    top_p: float = _option(1.0, "Nucleus sampling of rollouts (1.0 = off). It only restricts "
                                "which tokens are drawn: log-probs stay over the full vocabulary.")
    top_k: int = _option(0, "Top-k of rollouts (0 = off; generate's own default would be 50).")
    gen_batch_size: int = _option(64, "Answers per generate call.")
    old_logprobs: str | None = _option(None, "Where π_old's per-token log-probs come from: "
                                             "generate (recorded from the sampling steps' own "
                                             "logits, no extra pass; hf only) | recompute (a "
                                             "no-grad forward over the rollout). Default: "
                                             "generate with hf in float32, else recompute.")
    tis_cap: float = _option(0.0, "vllm: truncated importance sampling, each token's loss "
                                  "times min(π_old / π_vllm, tis_cap), for vLLM's numerical "
                                  "mismatch (0 = off; verl and TRL use 2 to 5).")
    dynamic_sampling: bool | None = _option(None, "Keep only questions with 0 < r̂ < 1 and "
                                                  "generate more until the batch is full "
                                                  "(default: on for nft, rft, dapo, infonca; off "
                                                  "for grpo, dr_grpo).")
    max_gen_batches: int = _option(4, "Most generation rounds per step when dynamic sampling.")
    overlong_shaping: bool | None = _option(None, "DAPO's soft penalty for answers in the last "
                                                  "overlong_buffer of max_new_tokens "
                                                  "(default: on for dapo only).")
    overlong_buffer: float = _option(0.25, "Fraction of max_new_tokens in which the overlong "
                                           "penalty ramps from 0 to −1 (DAPO: 4K of 20K).")
    # --- Algorithm 1: update ---
    minibatches: int = _option(4, "Optimizer steps per rollout; later ones are off-policy "
                                  "(paper: 16).")
    micro_batch_tokens: int = _option(16384, "Padded tokens per forward/backward; bounds memory, "
                                             "never changes the gradient.")
    lr: float = _option(1e-6, "AdamW learning rate (paper: 1e-6).")
    warmup_steps: int = _option(10, "Linear warm-up, in optimizer steps (minibatches per "
                                    "rollout step); the paper's verl recipe warms up over 10 "
                                    "rollout steps = 160 here at minibatches 16.")
    lr_schedule: str = _option("constant", "After warm-up: constant | cosine.")
    weight_decay: float = _option(0.0, "AdamW weight decay.")
    adam_beta1: float = _option(0.9, "AdamW β1.")
    adam_beta2: float = _option(0.999, "AdamW β2.")
    grad_clip: float = _option(1.0, "Clip the global gradient norm (0 = off).")
    # --- objective hyper-parameters (None: the objective's registered default) ---
    eps: float | None = _option(None, "NFT: clip ε of the negative ratio (default 1.0, the "
                                      "paper's).")
    weight: str | None = _option(None, "NFT/RFT prompt weight ω: dr_grpo (1 − r̂) | grpo "
                                       "(sqrt((1 − r̂)/r̂)) | one (default: dr_grpo for nft, "
                                       "one for rft).")
    clip_low: float | None = _option(None, "GRPO/Dr.GRPO/DAPO: lower clip ε_low (default 0.2).")
    clip_high: float | None = _option(None, "GRPO/Dr.GRPO/DAPO: upper clip ε_high, "
                                            "clip-higher (default 0.28).")
    beta: float | None = _option(None, "InfoNCA: β (default 0.1; the paper ablates 0.1, 0.02, "
                                       "0.01).")
    sft_coef: float | None = _option(None, "InfoNCA: weight of the SFT term on correct answers "
                                           "(default 1.0).")
    objective_args: str = _option("", "Hyper-parameters without a key of their own (a plugin "
                                      "objective's): name=value,name=value.")
    max_nan_steps: int = _option(3, "Stop after this many optimizer steps in a row with a "
                                    "non-finite loss or gradient.")
    # --- several ranks (torchrun) ---
    distributed_strategy: str = _option(
        "ddp", "Under torchrun --nproc-per-node N: ddp (every rank holds the whole model; "
               "gradients summed) | fsdp (FSDP2: parameters, gradients and AdamW's states "
               "sharded across the ranks, for full fine-tunes that do not fit one device). "
               "Ignored by one process (docs/scale.md).")
    distributed_timeout_s: float = _option(600.0, "Under torchrun: the longest any rank waits "
                                                  "for the others in a collective before the "
                                                  "run fails (a rank that died ends the rest).")
    # --- verification ---
    reward: str = _option("math", "The reward: math (nftune's verifier), package.module:function "
                                  "or file.py:function, several as f*0.9,g*0.1 "
                                  "(docs/rewards.md).")
    verify_workers: int | None = _option(None, "Verifier processes (default: CPU count, max 8).")
    verify_timeout_s: float = _option(5.0, "Time limit per verification (and per call of a "
                                           "reward function).")
    # --- evaluation during training ---
    eval_every: int = _option(0, "Evaluate every N steps and at the end (0 = never).")
    eval_data: str = _option("", "Comma-separated evaluation sets (names or paths).")
    eval_limit: int | None = _option(None, "Evaluate on the first N questions of each set.")
    eval_k: int = _option(1, "Samples per evaluation question (avg@k); above 1 needs "
                                "eval_temperature above 0.")
    eval_temperature: float = _option(0.0, "Evaluation temperature (0 = greedy).")
    eval_top_p: float = _option(1.0, "Evaluation nucleus sampling.")
    eval_max_new_tokens: int | None = _option(None, "Evaluation response limit "
                                                    "(default: max_new_tokens).")
    # --- bookkeeping ---
    save_every: int = _option(50, "Checkpoint every N steps (0 = only final/).")
    keep_checkpoints: int = _option(2, "Keep the last N step checkpoints.")
    report_to: str = _option("none", "none | tensorboard | wandb (wandb offline works without "
                                     "network).")
    run_name: str | None = _option(None, "The run's name in W&B and the model card (default: "
                                         "the output directory's name).")
    wandb_project: str | None = _option(None, "W&B project (default: $WANDB_PROJECT, else "
                                              "nftune).")
    log_completions_every: int = _option(10, "Every N steps write a few prompts' K answers, "
                                             "rewards and r̂ to completions.jsonl (and W&B / "
                                             "TensorBoard); 0 = never.")
    log_completions_prompts: int = _option(2, "How many prompts of the step's first round "
                                              "log_completions_every logs.")
    final_dtype: str = _option("auto", "dtype of final/'s weights: auto (the base model's "
                                       "declared dtype) | float32 | bfloat16 | float16.")

    def resolve(self) -> TrainConfig:
        """Fill per-algorithm defaults and validate; returns self."""
        from nftune.objectives import get_objective
        from nftune.plugins import import_plugins

        # a .py file named relative to where the run starts is recorded absolute: a resume
        # from another directory (or with --config RUN/config.yaml) finds the same file
        self.plugins = _absolute_py_files(self.plugins)
        self.reward = _absolute_py_files(self.reward)
        import_plugins(self.plugins)
        self.gradient_checkpointing = _auto_switch(self.gradient_checkpointing)
        self.bf16 = _auto_switch(self.bf16)
        objective = get_objective(self.algo)
        extra = self.extra_hparams()
        for name in list(extra) + [n for n in OBJECTIVE_KEYS if getattr(self, n) is not None]:
            if name not in objective.hparams:
                raise ValueError(f"{name}: not a hyper-parameter of {self.algo} "
                                 f"(it takes: {', '.join(objective.hparams) or 'none'})")
        for name, default in objective.hparams.items():
            if name in OBJECTIVE_KEYS and getattr(self, name) is None:
                setattr(self, name, default)
        from nftune.reward import parse_reward_spec

        parse_reward_spec(self.reward)
        if self.eps is not None and not 0.0 < self.eps <= 1.0:
            raise ValueError(f"eps: {self.eps}: NFT's clip ε must lie in (0, 1]")
        if self.rollout_engine not in ENGINES:
            raise ValueError(f"rollout_engine: unknown {self.rollout_engine!r}; "
                             f"valid: {sorted(ENGINES)}")
        records = ENGINES[self.rollout_engine].records_logprobs
        if self.bf16 not in ("auto", "true", "false"):
            raise ValueError(f"bf16: auto, true or false, got {self.bf16!r}")
        half = self.uses_bf16() or self.base_dtype == "bfloat16"
        if self.old_logprobs is None:
            self.old_logprobs = "generate" if records and not half else "recompute"
        if self.old_logprobs == "generate" and not records:
            raise ValueError(f"old_logprobs: generate needs an engine that records the "
                             f"trainer's log-probs (hf); {self.rollout_engine}'s differ from the "
                             "trainer's forward, so π_old is recomputed (old_logprobs: recompute)")
        if self.old_logprobs == "generate" and half:
            raise ValueError("old_logprobs: generate is not on-policy in bf16 (step-by-step "
                             "decoding rounds differently from the update's forward, by up to "
                             "0.09 in log-prob): use recompute")
        if self.tis_cap and not (self.rollout_engine == "vllm" and objective.token_level):
            raise ValueError("tis_cap: needs rollout_engine vllm and an objective whose loss is "
                             f"a token mean ({self.algo} with {self.rollout_engine})")
        if self.lora_alpha is None and self.lora_rank:
            self.lora_alpha = 2.0 * self.lora_rank
        if self.dynamic_sampling is None:
            self.dynamic_sampling = objective.dynamic_sampling
        if self.overlong_shaping is None:
            self.overlong_shaping = objective.overlong_shaping
        if self.overlong_shaping and not objective.overlong_shaping:
            raise ValueError(f"overlong_shaping: {self.algo} does not use a shaped reward")
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
            (self.distributed_strategy in ("ddp", "fsdp"), "distributed_strategy: ddp or fsdp"),
            (self.distributed_timeout_s > 0, "distributed_timeout_s: must be positive"),
            (self.eval_k >= 1, "eval_k: must be at least 1"),
            (self.eval_k == 1 or not is_greedy(self.eval_temperature),
             f"eval_k: greedy evaluation (eval_temperature 0) gives one answer per question; "
             f"{self.eval_k} samples need eval_temperature above 0"),
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
            (self.log_completions_every >= 0, "log_completions_every: 0 (never) or more"),
            (self.log_completions_prompts >= 1, "log_completions_prompts: at least 1"),
            (self.gradient_checkpointing in ("auto", "true", "false"),
             "gradient_checkpointing: auto, true or false"),
            (self.final_dtype in ("auto", "float32", "bfloat16", "float16"),
             "final_dtype: auto, float32, bfloat16 or float16"),
            (0 < self.overlong_buffer < 1, "overlong_buffer: a fraction in (0, 1)"),
            (self.eps is None or self.eps > 0, "eps: must be positive"),
            (self.max_new_tokens >= 1, "max_new_tokens: must be at least 1"),
            (self.tis_cap == 0 or self.tis_cap >= 1, "tis_cap: 0 (off) or at least 1"),
            (0 < self.vllm_gpu_memory_utilization <= 1,
             "vllm_gpu_memory_utilization: a fraction in (0, 1]"),
            (self.lora_rank >= 0, "lora_rank: 0 (off) or more"),
            (0 <= self.lora_dropout < 1, "lora_dropout: in [0, 1)"),
            (self.base_dtype in ("float32", "bfloat16"), "base_dtype: float32 or bfloat16"),
            (self.base_dtype == "float32" or self.lora_rank > 0,
             "base_dtype: bfloat16 needs lora_rank > 0 (a full fine-tune keeps float32 "
             "weights for AdamW)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def uses_bf16(self, device_type: str | None = None) -> bool:
        """``bf16`` resolved for a device type ("cuda", "cpu"; default: the one ``device``
        picks): true/false as set, auto on CUDA only."""
        if self.bf16 != "auto":
            return self.bf16 == "true"
        if device_type is None:
            import torch

            cuda = self.device.startswith("cuda") or (self.device == "auto"
                                                      and torch.cuda.is_available())
            device_type = "cuda" if cuda else "cpu"
        return device_type == "cuda"

    def extra_hparams(self) -> dict[str, Any]:
        """``objective_args`` as a dict, each value typed as YAML reads it."""
        out = {}
        for item in filter(None, (part.strip() for part in self.objective_args.split(","))):
            name, eq, value = item.partition("=")
            if not eq or not name.strip():
                raise ValueError(f"objective_args: expected name=value, got {item!r}")
            out[name.strip()] = yaml.safe_load(value)
        return out

    def rollout_sampling(self) -> Sampling:
        """How training answers are sampled (``answers_per_prompt`` of them per question)."""
        return Sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                        max_new_tokens=self.max_new_tokens, n=self.answers_per_prompt,
                        seed=self.seed)

    def eval_sampling(self) -> Sampling:
        """How in-training evaluation samples (``eval_k`` answers per question)."""
        return Sampling(temperature=self.eval_temperature, top_p=self.eval_top_p, top_k=0,
                        max_new_tokens=self.eval_max_new_tokens or self.max_new_tokens,
                        n=self.eval_k, seed=self.seed)

    def objective_hparams(self) -> dict[str, Any]:
        """The objective's hyper-parameters for this run: the config's keys, then
        ``objective_args``, then the registered defaults."""
        from nftune.objectives import get_objective

        hparams = dict(get_objective(self.algo).hparams)
        hparams.update({k: getattr(self, k) for k in hparams
                        if k in OBJECTIVE_KEYS and getattr(self, k) is not None})
        hparams.update(self.extra_hparams())
        return hparams

    def check_resume(self, saved: dict[str, Any], allow_changes: bool = False,
                     moved: tuple[str, ...] | list[str] = ()) -> list[str]:
        """Compare with the config a checkpoint was saved under. Returns the keys that changed
        (each safe to change on resume, allowed by ``allow_changes``); raises ValueError naming
        every changed key otherwise. ``moved``: input keys whose new paths hold the run's
        files (:func:`nftune.checkpoint.moved_inputs`), free to differ."""
        free = (*RESUME_FREE_KEYS, *moved)
        now = {k: v for k, v in self.to_dict().items() if k not in free}
        changed = [k for k in now if k in saved and saved[k] != now[k]]
        changed += [k for k in saved if k not in now and k not in free]
        if not changed:
            return []
        safe = resume_safe_keys(self.lr_schedule)
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


# the config keys that are objectives' hyper-parameters (others go through objective_args)
OBJECTIVE_KEYS = ("eps", "weight", "clip_low", "clip_high", "beta", "sft_coef")


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


# how a YAML file or the command line may spell a boolean
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _auto_switch(value: Any) -> str:
    """"auto", "true" or "false" from a YAML boolean or any of the command line's spellings
    (anything else is left for validation to name)."""
    text = str(value).lower()
    if text in TRUE_WORDS:
        return "true"
    if text in FALSE_WORDS:
        return "false"
    return text


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
            if text in TRUE_WORDS:
                return True
            if text in FALSE_WORDS:
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
