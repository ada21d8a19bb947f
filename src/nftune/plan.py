"""The fit check: what a run will hold in memory, component by component, decided from the
model's config.json and the run's config before anything loads (``nftune plan``, and the start
of ``nftune train``, which refuses a run that cannot fit).

The memory model is counted from the shapes, not fitted: weights, gradients and AdamW's two
moments (present from the second optimizer step on, so through every later backward: the
steady state), bf16 autocast's weight copies, activations kept for backward (8 H + 4 I + 4 kv
values per token and layer from Qwen2's layer, :data:`nftune.policy.ACTIVATION_TERMS`; with
gradient checkpointing each layer's float32 input plus one layer's worth), the log-probs' chunks
of vocabulary-sized tensors, generation's KV cache and logits (Hugging Face engine), and a
colocated vLLM's share. ``benchmarks/memory.py`` checks it against measurements.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from nftune.config import TrainConfig
from nftune.policy import activation_bytes, uses_gradient_checkpointing

GIB = 2**30
# the share of the memory a plan may fill: the rest is left to the allocator's slack
# (fragmentation, cached blocks) and to what the model does not count
FIT_MARGIN = 0.9
# beyond the tensors: the CUDA context and kernels (about 0.5 GiB on recent cards, not yet
# measured by this project), or on the CPU the Python process with torch and transformers
# imported (measured: 0.44 GiB RSS)
PROCESS_BYTES = {"cuda": int(0.6 * GIB), "cpu": int(0.45 * GIB)}
# the log-probs from the hidden states: logits, their float32 log-softmax and gradient, one
# chunk of nftune.update.LOGIT_CHUNK_ELEMENTS at a time
LOGPROB_CHUNK_BYTES = 3 * 2**25 * 4
# a prompt's length when the plan is made before the data is read (nftune plan without data)
ASSUMED_PROMPT_TOKENS = 256
# what vLLM takes of its share beyond weights and KV cache (CUDA graphs, activations)
VLLM_OVERHEAD_BYTES = int(1.5 * GIB)


@dataclass(frozen=True)
class Shape:
    """A decoder-only model's shape, as its config.json gives it."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    context: int | None = None

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def parameters(self) -> int:
        """Every parameter (Qwen2/Llama layout: attention with q/k/v biases, a gated MLP, two
        norms per layer, embeddings and an LM head unless tied)."""
        h, kv = self.hidden, self.kv_width
        per_layer = 2 * h * h + 2 * h * kv + h + 2 * kv + 3 * h * self.intermediate + 2 * h
        return self.layers * per_layer + self.vocab * h * (1 if self.tied else 2) + h

    def linear_parameters(self) -> int:
        """The decoder's linear layers (what LoRA's all-linear adapts; no embeddings, head)."""
        h, kv = self.hidden, self.kv_width
        return self.layers * (2 * h * h + 2 * h * kv + 3 * h * self.intermediate)

    def config(self) -> SimpleNamespace:
        """The shape under a Hugging Face config's names (what :mod:`nftune.policy` reads)."""
        return SimpleNamespace(hidden_size=self.hidden, intermediate_size=self.intermediate,
                               num_hidden_layers=self.layers, num_attention_heads=self.heads,
                               num_key_value_heads=self.kv_heads)

    def lora_parameters(self, rank: int) -> int:
        """LoRA A (r × in) and B (out × r) on every linear layer of the decoder."""
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        return self.layers * rank * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))


def shape_from_config(values: dict, context_key: str = "max_position_embeddings") -> Shape:
    return Shape(values["hidden_size"], values["intermediate_size"], values["num_hidden_layers"],
                 values["num_attention_heads"],
                 values.get("num_key_value_heads") or values["num_attention_heads"],
                 values["vocab_size"], bool(values.get("tie_word_embeddings", False)),
                 values.get(context_key))


def _known(hidden, inter, layers, heads, kv, vocab, tied, context) -> Shape:
    return Shape(hidden, inter, layers, heads, kv, vocab, tied, context)


# the config.json shapes of the families users start from, for planning offline by hub id
KNOWN_SHAPES: dict[str, Shape] = {
    "qwen/qwen2.5-0.5b": _known(896, 4864, 24, 14, 2, 151936, True, 32768),
    "qwen/qwen2.5-1.5b": _known(1536, 8960, 28, 12, 2, 151936, True, 131072),
    "qwen/qwen2.5-3b": _known(2048, 11008, 36, 16, 2, 151936, True, 32768),
    "qwen/qwen2.5-7b": _known(3584, 18944, 28, 28, 4, 152064, False, 131072),
    "qwen/qwen2.5-14b": _known(5120, 13824, 48, 40, 8, 152064, False, 131072),
    "qwen/qwen2.5-math-1.5b": _known(1536, 8960, 28, 12, 2, 151936, True, 4096),
    "qwen/qwen2.5-math-7b": _known(3584, 18944, 28, 28, 4, 152064, False, 4096),
    "meta-llama/llama-3.2-1b": _known(2048, 8192, 16, 32, 8, 128256, True, 131072),
    "meta-llama/llama-3.2-3b": _known(3072, 8192, 28, 24, 8, 128256, True, 131072),
    "meta-llama/llama-3.1-8b": _known(4096, 14336, 32, 32, 8, 128256, False, 131072),
}
for _name in list(KNOWN_SHAPES):  # the instruct variants share their base's shape
    org, _, model = _name.partition("/")
    KNOWN_SHAPES[f"{org}/{model}-instruct"] = KNOWN_SHAPES[_name]
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "vocab_size")


def read_shape(model: str) -> Shape:
    """The shape of ``model``: a local directory's config.json (a multimodal config's text
    part), or a known hub id (:data:`KNOWN_SHAPES`). A file or key that cannot be read is an
    error naming it."""
    local = Path(model).expanduser()
    if local.is_dir():
        path = local / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found (the fit check reads the model's "
                                    "config.json)")
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot be read as JSON ({err})") from None
        values = values.get("text_config", values) if isinstance(values, dict) else {}
        missing = [k for k in SHAPE_KEYS if not isinstance(values.get(k), int)]
        if missing:
            raise ValueError(f"{path}: no integer {', '.join(missing)} (the fit check needs the "
                             "decoder's shape)")
        return shape_from_config(values)
    known = KNOWN_SHAPES.get(model.lower())
    if known is None:
        raise ValueError(f"model: {model!r} is neither a local model directory nor a known hub "
                         f"id ({', '.join(sorted(k for k in KNOWN_SHAPES if 'instruct' not in k))}"
                         "); download it and pass its directory")
    return known


def parse_memory(text: str) -> int:
    """Bytes from '80GB', '79.6GiB', '24 GB', '512MB' (units required: GB is 10^9 bytes,
    GiB 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"--gpu-memory: {text!r}: expected a size with its unit, e.g. 80GB or "
                         "79.6GiB")
    number, unit = float(match.group(1)), match.group(2).upper()
    power = "KMGT".index(unit[0]) + 1
    return int(number * (1024**power if "I" in unit else 1000**power))


class DoesNotFit(ValueError):
    """A run the memory model says cannot fit its device (the message is the plan)."""


@dataclass
class Plan:
    """A run's memory, component by component (bytes), the verdict and what to change."""

    device: str
    device_bytes: int
    components: dict[str, int]
    phases: dict[str, int]  # the trainer's peak in each phase of a step
    available: int  # what the trainer may fill (the margin and vLLM's share off)
    vllm_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    largest_micro_batch_tokens: int | None = None
    advice: list[str] = field(default_factory=list)
    vllm_fits: bool = True  # vLLM's share holds its weights and one answer's KV cache

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.available and self.vllm_fits

    def report(self) -> str:
        width = max(len(k) for k in [*self.components, *self.phases]) + 2
        lines = [f"memory plan on {self.device} ({self.device_bytes / GIB:.1f} GiB):"]
        lines += [f"  {name:<{width}}{size / GIB:8.2f} GiB" for name, size in
                  self.components.items() if size]
        lines.append("  peak by phase:")
        lines += [f"    {name:<{width - 2}}{size / GIB:8.2f} GiB" for name, size in
                  self.phases.items()]
        lines.append(f"  the trainer may fill {self.available / GIB:.2f} GiB "
                     f"({FIT_MARGIN:.0%} of the device" +
                     (f", less vLLM's {self.vllm_bytes / GIB:.2f} GiB)" if self.vllm_bytes
                      else ")"))
        lines += [f"  {note}" for note in self.notes]
        verdict = "fits" if self.fits else "does not fit"
        lines.append(f"verdict: {verdict} (peak {self.peak / GIB:.2f} GiB)")
        if self.largest_micro_batch_tokens is not None:
            lines.append(f"largest micro_batch_tokens that fits: "
                         f"{self.largest_micro_batch_tokens:,}")
        lines += [f"  to fit: {a}" for a in self.advice]
        return "\n".join(lines)


def estimate(shape: Shape, *, tokens: int, checkpointing: bool, lora_rank: int = 0,
             bf16_base: bool = False, autocast: bool = False, logits_tokens: int | None = None,
             gen_answers: int = 0, gen_tokens: int = 0, shards: int = 1
             ) -> tuple[dict[str, int], dict[str, int]]:
    """(components, phases) in bytes of a trainer step: a micro-batch of ``tokens`` padded
    tokens; ``logits_tokens``: log-probs from the whole micro-batch's logits over that many
    answer tokens instead of the hidden-state chunks; ``gen_answers`` × ``gen_tokens``: one
    Hugging Face ``generate`` call's KV cache (0: generation elsewhere); ``shards``: one rank
    of an FSDP run over that many (a full fine-tune), holding 1/N of the weights, gradients
    and moments, plus what it gathers whole: the embeddings and head (FSDP's root) and two
    decoder layers (the one computing and the next, prefetched), with a layer's and the
    root's unsharded gradients before they are reduce-scattered."""
    total, linear = shape.parameters(), shape.linear_parameters()
    adapters = shape.lora_parameters(lora_rank) if lora_rank else 0
    trainable = adapters if lora_rank else total
    half_base = lora_rank and bf16_base
    weights = total * (2 if half_base else 4) + adapters * 4
    gradients, moments = trainable * 4, trainable * 8
    # autocast keeps a bf16 copy of each float32 weight a matmul uses, for backward
    casts = (linear + shape.vocab * shape.hidden) * 2 if autocast and not half_base else 0
    if shards > 1 and not lora_rank:
        root = shape.vocab * shape.hidden * (1 if shape.tied else 2) + shape.hidden
        layer = (total - root) // shape.layers
        weights = total * 4 // shards + (root + 2 * layer) * 4
        gradients, moments = total * 4 // shards + (root + layer) * 4, total * 8 // shards
        casts = (root + 2 * layer) * 2 if autocast else 0
    half = autocast or half_base
    every_layer = activation_bytes(shape.config(), tokens, 2 if half else 4)
    # checkpointing keeps each layer's float32 input and recomputes one layer at a time
    activations = tokens * shape.hidden * 4 * shape.layers + every_layer // shape.layers \
        if checkpointing else every_layer
    vocab = logits_tokens * shape.vocab * 4 * 2 if logits_tokens else LOGPROB_CHUNK_BYTES
    kv = gen_answers * gen_tokens * 2 * shape.layers * shape.kv_width * (2 if half else 4)
    gen_logits = gen_answers * shape.vocab * 4 * 3  # a step's logits, log-softmax, probs
    components = {"weights": weights, "gradients": gradients, "AdamW moments": moments,
                  "autocast weight copies": casts, "activations": activations,
                  "log-prob chunks": vocab, "generation KV cache": kv,
                  "generation logits": gen_logits if gen_answers else 0}
    phases = {"backward": weights + moments + gradients + casts + activations + vocab,
              "optimizer step": weights + moments + gradients}
    if gen_answers:
        phases["generation"] = weights + moments + casts + kv + gen_logits
    return components, phases


def plan_run(cfg: TrainConfig, shape: Shape, device_type: str, device_bytes: int,
             prompt_tokens: int | None = None, checkpointing: bool | None = None,
             ranks: int = 1) -> Plan:
    """The fit check of ``cfg`` on a device of ``device_bytes``: each component, the verdict,
    the largest ``micro_batch_tokens`` that fits and what to change if it does not.
    ``prompt_tokens``: the run's longest prompt (default :data:`ASSUMED_PROMPT_TOKENS`);
    ``checkpointing``: as resolved (default: as ``gradient_checkpointing`` decides);
    ``ranks``: one device of a torchrun over that many (FSDP shards a full fine-tune; DDP
    holds it whole on every device)."""
    prompt = prompt_tokens if prompt_tokens is not None else ASSUMED_PROMPT_TOKENS
    sequence = prompt + cfg.max_new_tokens
    if checkpointing is None:
        checkpointing = _checkpointing(cfg, shape, device_type, device_bytes)
    vllm = cfg.rollout_engine == "vllm"
    options = dict(checkpointing=checkpointing, lora_rank=cfg.lora_rank,
                   bf16_base=cfg.base_dtype == "bfloat16",
                   autocast=cfg.uses_bf16(device_type))
    gen = {} if vllm else dict(gen_answers=cfg.gen_batch_size, gen_tokens=sequence)
    shards = ranks if ranks > 1 and cfg.distributed_strategy == "fsdp" else 1
    options["shards"] = shards

    def at(tokens: int):
        # a micro-batch holds at least one whole answer, however small the budget
        return estimate(shape, tokens=max(tokens, sequence), **options, **gen)

    components, phases = at(cfg.micro_batch_tokens)
    process = PROCESS_BYTES.get(device_type, PROCESS_BYTES["cpu"])
    components["process (CUDA context / Python)" if device_type == "cuda" else
               "process (Python, torch)"] = process
    phases = {k: v + process for k, v in phases.items()}
    usable = int(device_bytes * FIT_MARGIN)
    plan = Plan(device_type, device_bytes, components, phases, usable)
    if ranks > 1:
        plan.device = f"each of {ranks} {device_type} devices"
        plan.notes.append(f"{ranks} ranks, {cfg.distributed_strategy}: " + (
            f"weights, gradients and AdamW's moments sharded {shards} ways" if shards > 1 else
            "the whole model, gradients and moments on every rank"))
    if prompt_tokens is None:
        plan.notes.append(f"prompts assumed {ASSUMED_PROMPT_TOKENS} tokens (nftune train "
                          "measures the longest)")
    plan.notes.append(f"gradient checkpointing {'on' if checkpointing else 'off'}; "
                      f"bf16 autocast {'on' if options['autocast'] else 'off'}; "
                      + (f"LoRA r{cfg.lora_rank}, {cfg.base_dtype} base" if cfg.lora_rank
                         else "full fine-tune"))
    if vllm:
        _plan_vllm(plan, cfg, shape, device_type, device_bytes, sequence, options["autocast"])
    if plan.peak > plan.available:
        _advise(plan, cfg, shape, device_type, device_bytes, prompt_tokens, at, process, ranks)
    else:
        plan.largest_micro_batch_tokens = _largest_tokens(at, process, plan.available,
                                                          cfg.micro_batch_tokens)
    return plan


def _checkpointing(cfg, shape: Shape, device_type: str, device_bytes: int) -> bool:
    import torch

    return uses_gradient_checkpointing(cfg, shape.config(), device_bytes,
                                       torch.device(device_type))


def _plan_vllm(plan: Plan, cfg, shape: Shape, device_type: str, device_bytes: int,
               sequence: int, half: bool) -> None:
    """vLLM's share beside the trainer: held through the update unless it sleeps; inside it,
    vLLM's weights, its overhead and the KV cache, which must hold at least one answer."""
    share = int(device_bytes * cfg.vllm_gpu_memory_utilization) if device_type == "cuda" else 0
    weights = shape.parameters() * (2 if half else 4)
    kv_per_token = 2 * shape.layers * shape.kv_width * (2 if half else 4)
    plan.components["vLLM share (weights + KV cache)"] = share
    if device_type != "cuda":
        plan.notes.append("vLLM on the CPU: its KV cache is VLLM_CPU_KVCACHE_SPACE, outside "
                          "this plan")
        return
    kv = share - weights - VLLM_OVERHEAD_BYTES
    answers = kv // max(1, kv_per_token * sequence)
    if answers < 1:
        plan.vllm_fits = False
        plan.notes.append(f"vLLM: its share ({share / GIB:.1f} GiB) does not hold its weights "
                          f"({weights / GIB:.1f} GiB), overhead and one {sequence}-token "
                          "answer's KV cache: raise vllm_gpu_memory_utilization")
    else:
        plan.notes.append(f"vLLM: {weights / GIB:.1f} GiB of weights, KV cache for ~{answers:,} "
                          f"answers of {sequence} tokens at once")
    if cfg.vllm_sleep:  # asleep through the update; awake beside the trainer's weights+moments
        rollout = plan.components["weights"] + plan.components["AdamW moments"] + share
        plan.phases["rollout (vLLM awake)"] = rollout + PROCESS_BYTES["cuda"]
    else:
        plan.vllm_bytes = share
        plan.available = int(device_bytes * FIT_MARGIN) - share


def _largest_tokens(at, process: int, available: int, start: int) -> int | None:
    """The largest micro-batch (tokens) whose peak stays within ``available``; None if even
    one answer does not fit."""
    def fits(tokens: int) -> bool:
        return max(at(tokens)[1].values()) + process <= available

    if not fits(1):
        return None
    low, high = 1, max(start, 1)
    while fits(high):
        low, high = high, high * 2
        if high > 2**24:  # more than any micro-batch a run would take
            return low
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def _advise(plan: Plan, cfg, shape: Shape, device_type: str, device_bytes: int,
            prompt_tokens, at, process: int, ranks: int = 1) -> None:
    """What to change for a run that does not fit, each suggestion checked by the model."""
    plan.largest_micro_batch_tokens = _largest_tokens(at, process, plan.available,
                                                      cfg.micro_batch_tokens)
    if plan.largest_micro_batch_tokens:
        plan.advice.append(f"--micro-batch-tokens {plan.largest_micro_batch_tokens}")
    import dataclasses

    tries = []
    if cfg.gradient_checkpointing != "true":
        tries.append(("--gradient-checkpointing true", {"gradient_checkpointing": "true"}))
    if not cfg.lora_rank:
        tries.append(("--lora-rank 16 --base-dtype bfloat16 --lr 1e-5",
                      {"lora_rank": 16, "lora_alpha": 32.0, "base_dtype": "bfloat16",
                       "gradient_checkpointing": "true"}))
    if cfg.rollout_engine == "vllm" and not cfg.vllm_sleep:
        tries.append(("--vllm-sleep true", {"vllm_sleep": True}))
    if ranks > 1 and cfg.distributed_strategy != "fsdp" and not cfg.lora_rank:
        tries.insert(0, ("--distributed-strategy fsdp", {"distributed_strategy": "fsdp"}))
    for flags, change in tries:
        other = plan_run(dataclasses.replace(cfg, **change), shape, device_type, device_bytes,
                         prompt_tokens, ranks=ranks)
        if other.fits:
            plan.advice.append(f"{flags} (peak {other.peak / GIB:.1f} GiB)")
    if not plan.advice:
        plan.advice.append("more GPUs: torchrun --nproc-per-node N with --distributed-strategy "
                           "fsdp shards weights, gradients and AdamW's moments across them "
                           "(nftune plan --ranks N; docs/scale.md), verl across nodes")


def plan_for_config(cfg: TrainConfig, device_bytes: int | None = None,
                    prompt_tokens: int | None = None, ranks: int = 1) -> Plan:
    """:func:`plan_run` for ``cfg`` on its own device (``device_bytes``: its memory instead of
    the device's, e.g. a card not in this machine, planned as CUDA)."""
    from nftune.policy import device_memory_bytes, pick_device

    if device_bytes is not None:
        device_type = "cuda"
    else:
        device = pick_device(cfg.device)
        device_type, device_bytes = device.type, device_memory_bytes(device)
    return plan_run(cfg, read_shape(cfg.model), device_type, device_bytes, prompt_tokens,
                    ranks=ranks)


# the fit table of README and docs/gpu.md: models, cards (GB = 10^9 bytes) and settings
FIT_TABLE_MODELS = ["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-Math-7B",
                    "meta-llama/Llama-3.1-8B"]
FIT_TABLE_CARDS = [24, 48, 80]
FIT_TABLE_SETTINGS = {
    "full fine-tune (defaults: bf16 autocast, checkpointing auto)": {},
    "full fine-tune, no checkpointing": {"gradient_checkpointing": "false"},
    "LoRA r16 + bf16 base": {"lora_rank": 16, "base_dtype": "bfloat16"},
    "LoRA r16 + bf16 base + vLLM 0.4, asleep in the update": {
        "lora_rank": 16, "base_dtype": "bfloat16", "rollout_engine": "vllm",
        "vllm_sleep": True},
}
FIT_TABLE_RUN = {"max_new_tokens": 2048}


def fit_markdown() -> str:
    """The fit table as README and docs/gpu.md show it (a test keeps both current)."""
    base = TrainConfig(**FIT_TABLE_RUN)
    return (f"By `nftune plan` (`python -c \"from nftune.plan import fit_markdown; "
            f"print(fit_markdown())\"`): micro-batches of {base.micro_batch_tokens:,} tokens, "
            f"answers of {base.max_new_tokens:,} new tokens after {ASSUMED_PROMPT_TOKENS}-token "
            f"prompts, Hugging Face generation {base.gen_batch_size} answers at a time unless "
            f"vLLM; 'fits' = within {FIT_MARGIN:.0%} of the card.\n\n"
            + fit_table(FIT_TABLE_MODELS, FIT_TABLE_CARDS, FIT_TABLE_SETTINGS, base))


def fit_table(models: list[str], cards_gb: list[int], settings: dict[str, dict],
              base: TrainConfig) -> str:
    """A markdown table of peak GiB and the verdict per card, from :func:`plan_run` (the fit
    tables of README and docs/gpu.md)."""
    import dataclasses

    head = f"| model | setting | peak GiB ({cards_gb[-1]} GB card) | " + \
        " | ".join(f"{c} GB" for c in cards_gb) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(cards_gb)]
    for model in models:
        shape = read_shape(model)
        for label, change in settings.items():
            cfg = dataclasses.replace(base, model=model, **change)
            plans = [plan_run(cfg, shape, "cuda", c * 10**9) for c in cards_gb]
            lines.append(f"| {model} | {label} | {plans[-1].peak / GIB:.1f} | " +
                         " | ".join("fits" if p.fits else "no" for p in plans) + " |")
    return "\n".join(lines)




def check_fit(cfg: TrainConfig, device_type: str, device_bytes: int,
              prompt_tokens: int | None, ranks: int = 1) -> Plan | None:
    """The check ``nftune train`` makes before loading the model: the plan, or None where
    the model's shape is unknown offline (a hub id not in :data:`KNOWN_SHAPES`); raises
    :class:`DoesNotFit` with the plan when the run cannot fit."""
    local = Path(cfg.model).expanduser().is_dir()
    if not local and cfg.model.lower() not in KNOWN_SHAPES:
        return None
    plan = plan_run(cfg, read_shape(cfg.model), device_type, device_bytes, prompt_tokens,
                    ranks=ranks)
    if not plan.fits:
        raise DoesNotFit("the run does not fit in memory by nftune's memory model (`nftune "
                         "plan` prints the same; --fit-check false runs it anyway):\n"
                         + plan.report())
    return plan
