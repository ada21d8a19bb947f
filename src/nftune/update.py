"""Algorithm 1, step 6: the mini-batch updates, and the differentiable log-prob kernel and
micro-batch packing they run on (also used for π_old's no-grad recompute).

A rollout's questions are split into ``minibatches``; each takes one optimizer step, its
answers packed into micro-batches of at most ``micro_batch_tokens`` padded tokens whose
gradients accumulate, each normalised by the whole mini-batch's counts, so the step's
gradient does not depend on the packing.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import TYPE_CHECKING

import torch

from nftune.config import TrainConfig
from nftune.objectives import ObjectiveInput, get_objective, objective_loss
from nftune.parallel import SINGLE, World
from nftune.policy import precision

if TYPE_CHECKING:
    from nftune.rollout import Rollout

Tensor = torch.Tensor
log = logging.getLogger("nftune")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss kept being NaN); the message says why."""


# ---------------------------------------------------------------------------------------------
# Per-token log-probs of a batch of answers, and packing answers into micro-batches
# ---------------------------------------------------------------------------------------------


def position_ids_for(attention_mask: Tensor) -> Tensor:
    """Positions as Hugging Face ``generate`` assigns them to left-padded rows."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


# float32 logits handled per chunk of rows: bounds the temporaries of the log-softmax
LOGIT_CHUNK_ELEMENTS = 2**25


class _PickedLogSoftmax(torch.autograd.Function):
    """log softmax(s·x)_a for one chunk of logits x and inverse temperature s, keeping only x and
    logsumexp(s·x) for backward: d/dx_j = g · s · (1[j = a] − exp(s·x_j − logsumexp(s·x))),
    recomputed from the logits (no scaled copy is kept)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, scale: float) -> Tensor:
        x = logits.float() * scale
        index = target.unsqueeze(-1)
        picked = torch.log_softmax(x, dim=-1).gather(-1, index).squeeze(-1)
        lse = x.gather(-1, index).squeeze(-1) - picked
        ctx.save_for_backward(logits, index, lse)
        ctx.scale = scale
        return picked

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, index, lse = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        out = torch.exp(logits.float() * ctx.scale - lse.unsqueeze(-1)).mul_(-g)
        out.scatter_add_(-1, index, g)
        return out.mul_(ctx.scale).to(logits.dtype), None, None


def token_logprobs(logits: Tensor, targets: Tensor, with_entropy: bool = False,
                   temperature: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits / temperature) at ``targets`` and optionally the entropy of that
    distribution (a diagnostic, without gradient), (B, R) each, in float32.

    Computed a few rows at a time, and the backward recomputes the softmax from the logits, so
    no full-size (B, R, V) log-softmax is ever kept: the logits are the only vocabulary-wide
    tensor alive.
    """
    scale = 1.0 / temperature
    rows = max(1, LOGIT_CHUNK_ELEMENTS // max(1, logits.shape[1] * logits.shape[2]))
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    logprobs, entropy = [], []
    for chunk, target in zip(logits.split(rows), targets.split(rows), strict=True):
        if needs_grad:
            logprobs.append(_PickedLogSoftmax.apply(chunk, target, scale))
        if with_entropy or not needs_grad:
            with torch.no_grad():
                logp = torch.log_softmax(chunk.float() * scale, dim=-1)
                if not needs_grad:
                    logprobs.append(logp.gather(-1, target.unsqueeze(-1)).squeeze(-1))
                if with_entropy:
                    entropy.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(logprobs), torch.cat(entropy) if with_entropy else None


def _head_precision(hidden: Tensor, weight: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the head's matmul: the surrounding autocast's or the weight's, dtype of the
    log-softmax: at least float32)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
        else weight.dtype
    return dtype, torch.promote_types(dtype, torch.float32)


class _HeadLogprob(torch.autograd.Function):
    """log softmax(s · h Wᵀ)_a for final hidden states h (N, H) through the LM head W (V, H), a
    chunk of tokens at a time: the (N, V) logits never exist at once, in forward or backward.
    Keeps h, W and the per-token logsumexp; backward recomputes each chunk's logits
    (d/dlogits_j = g · s · (1[j = a] − p_j)) and accumulates dh and dW (if W trains)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor, scale: float,
                chunk: int) -> Tensor:
        dtype, acc = _head_precision(hidden, weight)
        picked, lse = [], []
        w = weight.to(dtype)
        for h, a in zip(hidden.split(chunk), target.split(chunk), strict=True):
            x = torch.nn.functional.linear(h.to(dtype), w).to(acc) * scale
            norm = torch.logsumexp(x, dim=-1)
            picked.append(x.gather(-1, a.unsqueeze(-1)).squeeze(-1) - norm)
            lse.append(norm)
        ctx.save_for_backward(hidden, weight, target, torch.cat(lse))
        ctx.scale, ctx.chunk, ctx.dtype = scale, chunk, dtype
        return torch.cat(picked)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, target, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        acc = torch.promote_types(ctx.dtype, torch.float32)  # as in forward
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = hidden[rows].to(ctx.dtype)
            x = torch.nn.functional.linear(h, w).to(acc) * ctx.scale
            g = grad[rows].to(acc).unsqueeze(-1)
            d = torch.exp(x - lse[rows].unsqueeze(-1)).mul_(-g)
            d.scatter_add_(-1, target[rows].unsqueeze(-1), g)
            d = d.mul_(ctx.scale).to(ctx.dtype)
            grad_hidden[rows] = (d @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (d.t() @ h).to(acc)
        return (grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None,
                None, None, None)


def head_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, with_entropy: bool = False,
                  temperature: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """:func:`token_logprobs` from the final hidden states (B, R, H) and the LM head's weight
    (V, H) instead of the logits: log softmax(h Wᵀ / temperature) at ``targets``, (B, R) in
    float32, and optionally the entropy (a diagnostic, without gradient); the logits exist a
    chunk of tokens at a time only, in forward and backward."""
    b, r, size = hidden.shape
    flat, flat_targets = hidden.reshape(b * r, size), targets.reshape(b * r)
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // weight.shape[0])
    scale = 1.0 / temperature
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if needs_grad:
        logprobs = _HeadLogprob.apply(flat, weight, flat_targets, scale, chunk).view(b, r)
        if not with_entropy:
            return logprobs, None
    # no gradient (π_old's recompute), or the entropy diagnostic: one pass over the chunks,
    # the log-prob rounded as _HeadLogprob.forward rounds it (π_old then equals the update's)
    dtype, acc = _head_precision(hidden, weight)
    picked, entropy = [], []
    with torch.no_grad():
        w = weight.to(dtype)
        for h, a in zip(flat.split(chunk), flat_targets.split(chunk), strict=True):
            x = torch.nn.functional.linear(h.to(dtype), w).to(acc) * scale
            norm = torch.logsumexp(x, dim=-1)
            picked.append(x.gather(-1, a.unsqueeze(-1)).squeeze(-1) - norm)
            logp = x.sub_(norm.unsqueeze(-1))
            entropy.append(-(logp.exp() * logp).sum(-1))
    if not needs_grad:
        logprobs = torch.cat(picked).view(b, r)
    return logprobs, torch.cat(entropy).view(b, r) if with_entropy else None


# False: always take log-probs from the logits (how the update worked before; for benchmarks)
LOGPROBS_FROM_HIDDEN_STATES = True


def logits_from_hidden_states(model) -> bool:
    """True if the model's logits are exactly its LM head (no bias, soft-capping or scale)
    applied to its decoder's output, so :func:`head_logprobs` can stand in for them."""
    head = model.get_output_embeddings()
    config = model.config
    return (isinstance(head, torch.nn.Linear) and head.bias is None
            and hasattr(model, "get_decoder")
            and not getattr(config, "final_logit_softcapping", None)
            and getattr(config, "logit_scale", None) in (None, 1.0))


def response_logprobs(model, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                      with_entropy: bool = False, temperature: float = 1.0
                      ) -> tuple[Tensor, Tensor | None]:
    """Per-token log π(a_t | q, a_<t) of the response columns, (B, R), and optionally the
    policy's entropy at each of them, in float32 whatever the model's dtype. π is the
    distribution answers are sampled from: the model's logits divided by ``temperature``.

    For the usual causal LM (:func:`logits_from_hidden_states`) the decoder's final hidden
    states go through the LM head a chunk of tokens at a time (:func:`head_logprobs`), so no
    (tokens × vocabulary) tensor is ever held for the batch; otherwise from the logits of the
    response positions (:func:`token_logprobs`)."""
    width = input_ids.shape[1] - prompt_len
    position_ids = position_ids_for(attention_mask)
    targets = input_ids[:, prompt_len:]
    if LOGPROBS_FROM_HIDDEN_STATES and logits_from_hidden_states(model):
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, use_cache=False).last_hidden_state
        return head_logprobs(hidden[:, prompt_len - 1:-1], model.get_output_embeddings().weight,
                             targets, with_entropy, temperature)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=width + 1, use_cache=False).logits[:, :-1]
    return token_logprobs(logits, targets, with_entropy, temperature)


class ResponseLogprobs(torch.nn.Module):
    """:func:`response_logprobs` of ``policy`` as a module's forward: what data parallelism
    wraps (DDP and FSDP act through a module's forward), the policy itself unchanged inside."""

    def __init__(self, policy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                temperature: float = 1.0, with_entropy: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        return response_logprobs(self.policy, input_ids, attention_mask, prompt_len,
                                 with_entropy=with_entropy, temperature=temperature)


def data_parallel(model, world: World, strategy: str = "ddp") -> torch.nn.Module:
    """The update's forward (:class:`ResponseLogprobs`) for ``world``: as it is for one
    process. Under several ranks, ``ddp``: PyTorch's DistributedDataParallel, whose
    construction copies rank 0's weights to every rank; ``fsdp``: FSDP2's ``fully_shard`` on
    each decoder layer and on the forward itself (embeddings, final norm and head), so each
    rank holds 1/N of the weights, gradients and AdamW's states, and every forward of the
    policy (generation, π_old, the update) becomes a collective. Both average gradients over
    the ranks; the losses are scaled by the number of ranks, so the result is their sum."""
    forward = ResponseLogprobs(model)
    if not world.distributed:
        return forward
    device = next(model.parameters()).device
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        layers = getattr(model.get_decoder(), "layers", None)
        if layers is None:
            raise ValueError("distributed_strategy: fsdp needs a decoder with .layers "
                             f"({type(model).__name__} has none); use ddp")
        for layer in layers:
            fully_shard(layer)
        fully_shard(forward)
        with torch.no_grad():  # the first FSDP forward makes its module the root: this one
            forward(*_dummy_input(device))
        # the root keeps its weights gathered after a forward: shard them again, so that the
        # module holds (and the optimizer is given) the sharded parameters
        forward.reshard()
        return forward
    from torch.nn.parallel import DistributedDataParallel

    # gradients as views into DDP's buckets: no second copy of them
    return DistributedDataParallel(forward, device_ids=[device] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def full_policy(forward: torch.nn.Module, model, world: World):
    """The policy with whole weights, for saving: ``model`` itself unless sharded; under FSDP
    every rank sends its shards (a collective) and rank 0 gets a plain copy on the CPU (the
    other ranks None), as Hugging Face's FSDP saving gathers a full state dict."""
    if not is_sharded(forward):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(forward, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
    if not world.is_main:
        return None
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    plain.load_state_dict({k.removeprefix("policy."): v for k, v in full.items()},
                          strict=False, assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    if any(t.is_meta for t in plain.state_dict().values()):
        raise RuntimeError("fsdp: the gathered state dict left weights unset")
    return plain


def optimizer_state(forward: torch.nn.Module, optimizer) -> dict:
    """AdamW's state for a checkpoint: its own state dict, or under FSDP the full one (keyed
    by parameter name, gathered on rank 0; a collective)."""
    if not is_sharded(forward):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(forward, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_optimizer_state(forward: torch.nn.Module, optimizer, state: dict) -> None:
    """:func:`optimizer_state` back into ``optimizer`` (each rank keeps its shards)."""
    if not is_sharded(forward):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(forward, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def is_sharded(forward: torch.nn.Module | None) -> bool:
    """True if ``forward`` is FSDP's: every forward of the policy is then a collective."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(forward, FSDPModule)


def _dummy_input(device: torch.device) -> tuple[Tensor, Tensor, int]:
    """One two-token row: the forward a rank with nothing left in a mini-batch runs so that
    it joins the others' gradient reduction (its loss is multiplied by 0)."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    return ids, torch.ones_like(ids), 1


@torch.no_grad()
def recompute_logprobs(model, rollout: Rollout | None, micro_batch_tokens: int,
                       temperature: float = 1.0, world: World = SINGLE,
                       forward: torch.nn.Module | None = None,
                       packing: list[list[int]] | None = None
                       ) -> tuple[Tensor, Tensor] | None:
    """log π(a_t) and the entropy at every response position, by a no-grad forward, π at the
    sampling ``temperature``, over the micro-batches ``packing`` (rows of ``rollout``; default
    :func:`micro_batches` within ``micro_batch_tokens``). Under FSDP (``forward`` sharded)
    every rank runs as many forwards as the busiest (``rollout`` None: this rank has no
    answers; returns None)."""
    forward = forward or ResponseLogprobs(model)
    micros: list[list[int] | None] = [] if rollout is None else \
        list(packing) if packing is not None else micro_batches(rollout, micro_batch_tokens)
    if is_sharded(forward):
        micros += [None] * (int(world.max(len(micros))[0]) - len(micros))
    device = next(model.parameters()).device
    try:
        return _recompute(forward, rollout, micros, device, temperature)
    finally:
        if is_sharded(forward):
            forward.reshard()  # the root keeps its weights gathered after a forward


def _recompute(forward, rollout: Rollout | None, micros: list[list[int] | None],
               device: torch.device, temperature: float) -> tuple[Tensor, Tensor] | None:
    if rollout is None:
        for _ in micros:
            forward(*_dummy_input(device))
        return None
    logprobs = torch.zeros(rollout.response_mask.shape, dtype=torch.float32,
                           device=rollout.input_ids.device)
    entropy = torch.zeros_like(logprobs)
    for rows in micros:
        if rows is None:
            forward(*_dummy_input(device))
            continue
        part = rollout.select(rows).trimmed()
        lp, ent = forward(part.input_ids, part.attention_mask, part.prompt_len,
                          with_entropy=True, temperature=temperature)
        width = lp.shape[1]
        logprobs[rows, :width] = lp * part.response_mask
        entropy[rows, :width] = ent * part.response_mask
    return logprobs, entropy



def micro_batches(rollout: Rollout, max_tokens: int, keep_groups: bool = False,
                  by_length: bool = True) -> list[list[int]]:
    """Split answers into micro-batches whose padded size (rows × longest sequence) stays
    within ``max_tokens``; with ``keep_groups`` a question's answers stay together.

    With ``by_length`` the answers (or groups) are packed longest first, so each micro-batch
    holds sequences of similar length and pays little padding; the longest come first, so a
    budget that does not fit in memory fails on the first micro-batch. Gradients and recorded
    log-probs do not depend on the order (each row is computed once, losses are sums).
    """
    lengths = (rollout.attention_mask.sum(1)).tolist()
    if keep_groups:
        units: list[list[int]] = []
        for g in torch.unique(rollout.group_ids).tolist():
            units.append(torch.nonzero(rollout.group_ids == g).flatten().tolist())
    else:
        units = [[i] for i in range(len(rollout))]
    if by_length:  # stable: equal lengths keep their order
        units.sort(key=lambda unit: -max(lengths[i] for i in unit))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for unit in units:
        unit_longest = max(lengths[i] for i in unit)
        new_longest = max(longest, unit_longest)
        if current and new_longest * (len(current) + len(unit)) > max_tokens:
            batches.append(current)
            current, new_longest = [], unit_longest
        current = current + unit
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def minibatch_rows(batch: Rollout, num_groups: int, minibatches: int) -> list[Tensor]:
    """The rows of ``batch`` in each of the update's mini-batches: the questions (global
    group ids 0 … ``num_groups`` − 1) split into ``minibatches`` consecutive runs."""
    parts = torch.tensor_split(torch.arange(num_groups), minibatches)
    return [torch.nonzero(torch.isin(batch.group_ids, part.to(batch.group_ids.device))
                          ).flatten() for part in parts]


def keeps_groups(cfg: TrainConfig) -> bool:
    """Whether the update's micro-batches keep a question's answers together."""
    return get_objective(cfg.algo).whole_groups or cfg.overlong_shaping


def update_packing(batch: Rollout, num_groups: int, cfg: TrainConfig) -> list[list[int]]:
    """The micro-batches the update will run, as rows of ``batch``, mini-batch by mini-batch.
    π_old recomputed over these is the update's own forward on the same padded tensors, so
    the first mini-batch starts exactly on-policy; packed any other way, the rows' padding and
    neighbours differ and bf16 kernels round differently (|log R| up to 0.04 at
    Qwen2.5-0.5B's shape, performance.md)."""
    packing = []
    for rows in minibatch_rows(batch, num_groups, cfg.minibatches):
        if len(rows):
            mb = batch.select(rows)
            packing += [rows[micro].tolist() for micro in
                        micro_batches(mb, cfg.micro_batch_tokens, keep_groups=keeps_groups(cfg))]
    return packing


# ---------------------------------------------------------------------------------------------
# One optimizer step per mini-batch
# ---------------------------------------------------------------------------------------------


def truncated_is_weights(batch: Rollout, cap: float) -> Tensor | None:
    """min(π_old / π_engine, cap) per token: the answers were sampled by an engine whose
    probabilities differ slightly from the trainer's π_old (vLLM's kernels); weighting each
    token's loss by the ratio, truncated at ``cap``, corrects for it (truncated importance
    sampling, as verl and TRL offer). None when off or without engine log-probs."""
    if not cap or batch.engine_logprobs is None:
        return None
    log_ratio = (batch.old_logprobs - batch.engine_logprobs) * batch.response_mask
    return torch.exp(log_ratio).clamp(max=cap)


def _accumulating(forward: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Micro-batches before a mini-batch's last keep their gradients on this rank (DDP's
    ``no_sync``); the last one's backward reduces them across ranks."""
    if last or not hasattr(forward, "no_sync"):
        return contextlib.nullcontext()
    return forward.no_sync()


# the per-micro-batch metrics summed over a step (the clip's only where the objective clips)
SUMMED = ("loss", "loss_pos", "loss_neg")
SHARE_WEIGHTED = ("ratio_mean", "clip_fraction", "approx_kl")


def update_policy(model, optimizer, scheduler, batch: Rollout | None, cfg: TrainConfig,
                  nan_streak: int, world: World = SINGLE,
                  forward: torch.nn.Module | None = None) -> tuple[dict[str, float], int]:
    """Split the rollout's questions into ``cfg.minibatches`` mini-batches and take one
    optimizer step on each; micro-batches accumulate into it with the mini-batch's token count
    (and, for objectives that use them, its group and SFT-token counts) as the normalisers.
    Returns (metrics averaged over the steps taken, NaN streak).

    Under several ranks (``world``, ``forward`` from :func:`data_parallel`) ``batch`` is this
    rank's share of the global batch, its ``group_ids`` numbered globally (None: it has no
    answers); the mini-batches are those one process would form from the whole batch, the
    normalisers and every metric are counted over all ranks, each rank runs as many
    micro-batches as the busiest one (a dummy forward with loss 0 where it has none left) and
    the gradients are summed by DDP, so every rank takes the step one process would."""
    forward = forward or ResponseLogprobs(model)
    model.train()
    objective = get_objective(cfg.algo)
    hparams = cfg.objective_hparams()
    local_groups = int(batch.group_ids.max().item()) + 1 if batch is not None and len(batch) \
        else 0
    num_groups = int(world.max(local_groups)[0])
    parts = minibatch_rows(batch, num_groups, cfg.minibatches) \
        if batch is not None and len(batch) else [None] * cfg.minibatches
    keep_groups = keeps_groups(cfg)
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    ratio_max, taken, skipped = 1.0, 0, 0
    for rows in parts:
        mb = batch.select(rows) if rows is not None and len(rows) else None
        signal = mb is not None and bool(objective.signal(mb.reward, mb.r_hat).any())
        if not world.max(signal)[0]:
            skipped += 1
            continue
        # the mini-batch's normalisers, given to every micro-batch (over every rank)
        if mb is None:
            num_tokens, num_groups, num_sft_tokens = (torch.zeros((), device=device), 0,
                                                      torch.zeros((), device=device))
        else:
            num_tokens = mb.response_mask.sum()
            num_groups = len(torch.unique(mb.group_ids[mb.reward > 0]))
            num_sft_tokens = (mb.response_mask * mb.reward[:, None]).sum()
        if world.distributed:
            total = world.sum(num_tokens.item(), num_groups, num_sft_tokens.item())
            num_tokens = torch.tensor(total[0], device=device)
            num_groups = int(total[1])
            num_sft_tokens = torch.tensor(total[2], dtype=torch.float32, device=device)
        num_tokens = num_tokens.clamp(min=1)
        num_groups = max(1, num_groups)
        num_sft_tokens = num_sft_tokens.clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        step_metrics: dict[str, float] = dict.fromkeys(SUMMED, 0.0)
        clipped: dict[str, float] = {}
        finite = True
        # |∂loss/∂log π(a_t)| summed over wrong answers' tokens and over all tokens: how much
        # of the step's weight the wrong answers carry (0 for RFT, which drops them)
        weight_wrong = weight_all = torch.zeros((), device=device)
        micros: list[list[int] | None] = [] if mb is None else \
            micro_batches(mb, cfg.micro_batch_tokens, keep_groups=keep_groups)
        count = int(world.max(len(micros))[0])
        micros += [None] * (count - len(micros))
        for index, micro in enumerate(micros):
            with _accumulating(forward, last=index == count - 1):
                if micro is None:  # nothing left here: join the gradient reduction
                    with precision(cfg, device):
                        logprobs, _ = forward(*_dummy_input(device),
                                              temperature=cfg.temperature)
                    (logprobs.sum() * 0.0).backward()
                    continue
                piece = mb.select(micro).trimmed()
                with precision(cfg, device):
                    logprobs, _ = forward(piece.input_ids, piece.attention_mask,
                                          piece.prompt_len, temperature=cfg.temperature)
                x = ObjectiveInput(
                    logprobs=logprobs, old_logprobs=piece.old_logprobs,
                    mask=piece.response_mask, reward=piece.reward, r_hat=piece.r_hat,
                    group_ids=piece.group_ids, num_tokens=num_tokens, num_groups=num_groups,
                    num_sft_tokens=num_sft_tokens,
                    overlong_penalty=piece.penalty if cfg.overlong_shaping else None,
                    token_weights=truncated_is_weights(piece, cfg.tis_cap),
                    reward_std=piece.r_std)
                loss, m = objective_loss(cfg.algo, x, **hparams)
                if not torch.isfinite(loss):
                    finite = False
                    if not world.distributed:
                        break
                    # the other ranks wait for this backward; its NaN reaches every gradient
                token_grad: list[Tensor] = []
                if logprobs.requires_grad:
                    logprobs.register_hook(lambda g, kept=token_grad: kept.append(g.detach()))
                (loss * world.size).backward()  # DDP averages over the ranks: their sum
            if token_grad:
                weight = token_grad[0].abs() * piece.response_mask
                weight_all = weight_all + weight.sum()
                weight_wrong = weight_wrong + weight[piece.reward == 0].sum()
            share = piece.response_mask.sum().item() / num_tokens.item()
            for key in SUMMED:
                step_metrics[key] += m[key]
            for key in SHARE_WEIGHTED:
                if key in m:  # an objective that clips nothing logs no clip_fraction
                    clipped[key] = clipped.get(key, 0.0) + m[key] * share
            ratio_max = max(ratio_max, m["ratio_max"])
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        finite = not world.max(not finite)[0]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if finite else \
            torch.tensor(math.nan)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm over every rank's shard
            grad_norm = grad_norm.full_tensor()
        if not finite or not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            nan_streak += 1
            log.warning("non-finite loss or gradient: optimizer step skipped (%d in a row)",
                        nan_streak)
            if nan_streak >= cfg.max_nan_steps:
                raise TrainingError(f"{nan_streak} optimizer steps in a row had a non-finite "
                                    "loss or gradient; stopping (the last checkpoint is intact)")
            skipped += 1
            continue
        nan_streak = 0
        optimizer.step()
        scheduler.step()
        taken += 1
        if world.distributed:  # the step's metrics over every rank's micro-batches
            present = world.max(*(key in clipped for key in SHARE_WEIGHTED))
            totals = world.sum(*(step_metrics[key] for key in SUMMED),
                               *(clipped.get(key, 0.0) for key in SHARE_WEIGHTED),
                               weight_wrong.item(), weight_all.item())
            step_metrics = dict(zip(SUMMED, totals[:3], strict=True))
            clipped = {key: value for key, value, there in
                       zip(SHARE_WEIGHTED, totals[3:6], present, strict=True) if there}
            weight_wrong, weight_all = (torch.tensor(v) for v in totals[6:])
            ratio_max = world.max(ratio_max)[0]
        step_metrics.update(clipped)
        step_metrics["grad_norm"] = grad_norm.item()
        total = weight_all.item()
        step_metrics["grad_share_wrong"] = weight_wrong.item() / total if total > 0 else 0.0
        for key, value in step_metrics.items():
            sums[key] = sums.get(key, 0.0) + value
    metrics = {key: value / taken for key, value in sums.items()} if taken else {}
    metrics.update(ratio_max=ratio_max, optimizer_steps=taken, skipped_minibatches=skipped)
    return metrics, nan_streak
