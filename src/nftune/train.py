"""Algorithm 1 of the NFT paper: the online loop, the same for all six objectives.

    for each step:
        sample questions; generate K answers each; verify          (collect_rollout)
        r̂_q = mean reward; keep 0 < r̂_q < 1, refill (dynamic sampling)
        record π_old's per-token log-probs
        split into mini-batches, one optimizer step each            (update_policy)
        π_old ← π_θ  (the next rollout is sampled from the updated model)

One model is ever in memory: π_old exists only as the recorded log-probs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nftune.checkpoint import (
    CheckpointError,
    MetricsLog,
    latest_checkpoint,
    load_state,
    prune_checkpoints,
    remove_stale,
    save_checkpoint,
    truncate_metrics,
)
from nftune.config import TrainConfig
from nftune.data import Question, format_prompt, load_questions, strategy_for
from nftune.evaluate import evaluate_questions
from nftune.objectives import compute_loss, informative
from nftune.rollout import (
    Rollout,
    concat_rollouts,
    generate_rollout,
    micro_batches,
    recompute_logprobs,
    response_logprobs,
)
from nftune.verify import Verifier

log = logging.getLogger("nftune")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss kept being NaN); the message says why."""


# ---------------------------------------------------------------------------------------------
# Model, data order, checkpoints
# ---------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def load_policy(path: str, device: torch.device, safetensors_only: bool = False):
    """The causal LM and its tokenizer. Character-level tokenizers saved as
    ``PreTrainedTokenizerFast`` are loaded as such (``AutoTokenizer`` would swap a qwen2
    directory's tokenizer for the byte-level Qwen one). ``safetensors_only`` (for checkpoints
    nftune wrote) never reads a pickle-based weights file that may sit beside them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if not path:
        raise ValueError("model: no model given (--model PATH_OR_HUB_ID)")
    local = Path(path)
    looks_local = path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").exists():
        raise FileNotFoundError(f"model: {path} is not a model directory (no config.json)")
    try:
        tok_class = AutoTokenizer
        tok_config = local / "tokenizer_config.json"
        if tok_config.exists():
            declared = json.loads(tok_config.read_text()).get("tokenizer_class")
            if declared in ("PreTrainedTokenizerFast", "TokenizersBackend"):
                tok_class = PreTrainedTokenizerFast
        tokenizer = tok_class.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, **({"use_safetensors": True} if safetensors_only else {}))
    except OSError as err:
        raise FileNotFoundError(f"model: cannot load {path} ({err})") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"model: the tokenizer of {path} has no EOS token")
    return model.to(device), tokenizer


class PromptSampler:
    """A seeded order over the questions, reshuffled each epoch, resumable from its state."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._permutation()


# ---------------------------------------------------------------------------------------------
# Algorithm 1, steps 1–5: rollout, verification, filtering, old log-probs
# ---------------------------------------------------------------------------------------------


@dataclass
class RolloutStats:
    generated_answers: int
    reward_mean: float
    kept_fraction: float
    response_length: float
    truncated_fraction: float
    gen_batches: int
    time_generate_s: float
    time_verify_s: float
    time_old_logprobs_s: float
    generated_tokens: int


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer_fraction: float
                     ) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to L_max − L_cache, then falling linearly to −1 at
    L_max, with L_cache = buffer_fraction · L_max."""
    cache = max(1, int(round(buffer_fraction * max_new_tokens)))
    start = max_new_tokens - cache
    return ((start - lengths.float()) / cache).clamp(min=-1.0, max=0.0)


def collect_rollout(model, tokenizer, questions: list[Question], sampler: PromptSampler,
                    verifier: Verifier, cfg: TrainConfig) -> tuple[Rollout | None, RolloutStats]:
    """Generate K answers for fresh questions, verify them, keep the informative groups."""
    k = cfg.answers_per_prompt
    kept: list[Rollout] = []
    kept_questions = 0
    rewards, lengths, truncated = [], [], []
    time_gen = time_ver = 0.0
    groups_seen = 0
    rounds = cfg.max_gen_batches if cfg.dynamic_sampling else 1
    for round_ in range(rounds):
        count = cfg.prompts_per_step
        if round_:  # refill: ask for what is missing, scaled by the kept rate so far
            need = cfg.prompts_per_step - kept_questions
            count = min(cfg.prompts_per_step,
                        math.ceil(need / max(kept_questions / groups_seen, 0.25)))
        batch = [questions[i] for i in sampler.take(count)]
        prompts = [format_prompt(q.problem, cfg.template, tokenizer) for q in batch]
        start = time.perf_counter()
        model.eval()
        rollout = generate_rollout(
            model, tokenizer, prompts, k, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            batch_size=cfg.gen_batch_size,
            logprobs_from="generate" if cfg.old_logprobs == "generate" else None)
        time_gen += time.perf_counter() - start
        start = time.perf_counter()
        verdicts = verifier.verify(rollout.texts, [q.answer for q in batch for _ in range(k)])
        time_ver += time.perf_counter() - start
        correct = torch.tensor(verdicts, dtype=torch.float32, device=rollout.input_ids.device)
        correct = correct * (~rollout.truncated).float()  # truncated answers count as wrong
        rollout.correct = correct
        rollout.r_hat = correct.view(-1, k).mean(1).repeat_interleave(k)
        if cfg.overlong_shaping:
            rollout.penalty = overlong_penalty(rollout.response_lengths, cfg.max_new_tokens,
                                               cfg.overlong_buffer)
        rewards.append(correct.cpu())
        lengths.append(rollout.response_lengths.float().cpu())
        truncated.append(rollout.truncated.float().cpu())
        groups_seen += len(batch)
        if cfg.dynamic_sampling:
            keep = informative(rollout.r_hat)
            if keep.any():
                rows = torch.nonzero(keep).flatten()
                kept.append(rollout.select(rows))
                kept_questions += len(rows) // k
        else:
            kept.append(rollout)
            kept_questions += len(batch)
        if kept_questions >= cfg.prompts_per_step:
            break
    rewards_t, lengths_t = torch.cat(rewards), torch.cat(lengths)
    stats = RolloutStats(
        generated_answers=len(rewards_t), reward_mean=rewards_t.mean().item(),
        kept_fraction=(kept_questions / groups_seen) if cfg.dynamic_sampling else 1.0,
        response_length=lengths_t.mean().item(),
        truncated_fraction=torch.cat(truncated).mean().item(), gen_batches=round_ + 1,
        time_generate_s=time_gen, time_verify_s=time_ver, time_old_logprobs_s=0.0,
        generated_tokens=int(lengths_t.sum().item()))
    if not kept:
        return None, stats
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    batch_rollout = concat_rollouts(kept, pad_id)  # also renumbers groups 0..G-1
    if kept_questions > cfg.prompts_per_step:  # the last round overfilled the batch
        batch_rollout = batch_rollout.select(torch.nonzero(
            batch_rollout.group_ids < cfg.prompts_per_step).flatten())
    if cfg.old_logprobs == "recompute":
        start = time.perf_counter()
        batch_rollout.old_logprobs, batch_rollout.entropy = recompute_logprobs(
            model, batch_rollout, cfg.micro_batch_tokens, cfg.temperature)
        stats.time_old_logprobs_s = time.perf_counter() - start
    return batch_rollout, stats


# ---------------------------------------------------------------------------------------------
# Algorithm 1, step 6: mini-batch updates
# ---------------------------------------------------------------------------------------------


def _has_signal(mb: Rollout, algo: str) -> bool:
    if algo == "infonca":
        return bool((mb.correct > 0).any())
    return bool(informative(mb.r_hat).any())


def update_policy(model, optimizer, scheduler, batch: Rollout, cfg: TrainConfig,
                  nan_streak: int) -> tuple[dict[str, float], int]:
    """Split the rollout's questions into ``cfg.minibatches`` mini-batches and take one
    optimizer step on each; micro-batches accumulate into it with the mini-batch's token count
    as the normaliser. Returns (metrics averaged over the steps taken, NaN streak)."""
    model.train()
    hparams = cfg.objective_hparams()
    groups = torch.unique(batch.group_ids)
    parts = torch.tensor_split(groups, cfg.minibatches)
    keep_groups = cfg.algo == "infonca" or cfg.overlong_shaping
    sums: dict[str, float] = {}
    ratio_max, taken, skipped = 1.0, 0, 0
    device_type = batch.input_ids.device.type
    for part in parts:
        rows = torch.nonzero(torch.isin(batch.group_ids, part.to(batch.group_ids.device)))
        mb = batch.select(rows.flatten())
        if len(mb) == 0 or not _has_signal(mb, cfg.algo):
            skipped += 1
            continue
        num_tokens = mb.response_mask.sum().clamp(min=1)
        extra: dict[str, Any] = {}
        if cfg.algo == "infonca":
            extra["num_groups"] = max(1, len(torch.unique(mb.group_ids[mb.correct > 0])))
            extra["num_sft_tokens"] = (mb.response_mask * mb.correct[:, None]).sum().clamp(min=1)
        if cfg.overlong_shaping and cfg.algo == "dapo":
            extra["overlong_penalty"] = mb.penalty
        optimizer.zero_grad(set_to_none=True)
        step_metrics: dict[str, float] = {}
        finite = True
        for micro in micro_batches(mb, cfg.micro_batch_tokens, keep_groups=keep_groups):
            piece = mb.select(micro).trimmed()
            part_extra = dict(extra)
            if "overlong_penalty" in part_extra:
                part_extra["overlong_penalty"] = piece.penalty
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logprobs, _ = response_logprobs(model, piece.input_ids, piece.attention_mask,
                                                piece.prompt_len, temperature=cfg.temperature)
            loss, m = compute_loss(cfg.algo, logprobs, piece.old_logprobs, piece.response_mask,
                                   piece.correct, piece.r_hat, piece.group_ids,
                                   num_tokens=num_tokens, **hparams, **part_extra)
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            share = piece.response_mask.sum().item() / num_tokens.item()
            for key in ("loss", "loss_pos", "loss_neg"):
                step_metrics[key] = step_metrics.get(key, 0.0) + m[key]
            for key in ("ratio_mean", "clip_fraction", "approx_kl"):
                if key in m:  # InfoNCA clips nothing: no clip_fraction
                    step_metrics[key] = step_metrics.get(key, 0.0) + m[key] * share
            ratio_max = max(ratio_max, m["ratio_max"])
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if finite else \
            torch.tensor(math.nan)
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
        step_metrics["grad_norm"] = grad_norm.item()
        for key, value in step_metrics.items():
            sums[key] = sums.get(key, 0.0) + value
    metrics = {key: value / taken for key, value in sums.items()} if taken else {}
    metrics.update(ratio_max=ratio_max, optimizer_steps=taken, skipped_minibatches=skipped)
    return metrics, nan_streak


def make_scheduler(optimizer, cfg: TrainConfig):
    total = max(1, cfg.steps * cfg.minibatches)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _setup_logging(output_dir: Path) -> list[logging.Handler]:
    """Everything to train.log; warnings also to the console."""
    file_handler = logging.FileHandler(output_dir / "train.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("nftune: warning: %(message)s"))
    for handler in (file_handler, console):
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    return [file_handler, console]


def _restore(state: dict[str, Any], checkpoint: Path, optimizer, scheduler,
             sampler: PromptSampler) -> tuple[int, int]:
    """Load a checkpoint's trainer state into the run; returns (step, NaN streak). Any value of
    the wrong kind is a :class:`CheckpointError` naming the checkpoint."""
    try:
        step, nan_streak = state["step"], state["nan_streak"]
        if not (isinstance(step, int) and isinstance(nan_streak, int) and step >= 0):
            raise TypeError("step and nan_streak must be non-negative integers")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict({k: int(v) for k, v in state["sampler"].items()})
        rng = state["rng"]["torch"]
        if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8):
            raise TypeError("rng.torch must be a uint8 tensor")
        torch.set_rng_state(rng)  # sampling is also reseeded every step
        random.setstate(state["rng"]["python"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f"{checkpoint}: trainer state does not fit this run "
                              f"({type(err).__name__}: {err})") from None
    return step, nan_streak


def _evaluate(model, tokenizer, eval_sets, verifier_for, cfg: TrainConfig) -> dict[str, float]:
    out = {}
    for name, questions in eval_sets.items():
        result = evaluate_questions(
            model, tokenizer, questions, name=name, k=cfg.eval_k,
            temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
            max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
            template=cfg.template, batch_size=cfg.gen_batch_size, verifier=verifier_for)
        out[f"eval/{name}/avg@{result.k}"] = result.avg_at_k
        if result.k > 1:
            out[f"eval/{name}/pass@{result.k}"] = result.pass_at_k
    return out


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          allow_changes: bool = False) -> Path:
    """Run Algorithm 1 as configured; returns the final model directory.

    ``resume`` continues from the newest intact checkpoint in ``cfg.output_dir`` (damaged ones
    are reported and skipped); the config must be the one the run was started with, except for
    the keys of ``RESUME_SAFE_KEYS`` when ``allow_changes`` is set."""
    from tqdm.auto import tqdm

    cfg.resolve()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # everything opened below is closed in reverse order however the run ends
    cleanup = contextlib.ExitStack()
    for handler in _setup_logging(out):
        cleanup.callback(handler.close)
        cleanup.callback(log.removeHandler, handler)
    try:
        device = pick_device(cfg.device)
        remove_stale(out)
        checkpoint, state = None, None
        if resume:
            checkpoint = latest_checkpoint(out)
            if checkpoint is None:
                log.warning("--resume: no checkpoint in %s; starting from the beginning", out)
            else:
                state = load_state(checkpoint)
                changed = cfg.check_resume(state.get("config") or {}, allow_changes)
                if changed:
                    log.warning("--resume: changed on resume: %s", ", ".join(changed))
        verifier = cleanup.enter_context(Verifier(cfg.verify_workers, cfg.verify_timeout_s,
                                                  strategy=strategy_for(cfg.template)))
        verifier.start_in_background()  # its warm-up overlaps loading the model and data
        if checkpoint is None:
            model, tokenizer = load_policy(cfg.model, device)
        else:
            try:
                model, tokenizer = load_policy(str(checkpoint), device, safetensors_only=True)
            except Exception as err:  # noqa: BLE001 — whatever the file holds, name the checkpoint
                raise CheckpointError(f"{checkpoint}: cannot load the model "
                                      f"({type(err).__name__}: {err})") from None
        questions = load_questions(cfg.train_data, data_dir=cfg.data_dir, limit=cfg.train_limit)
        eval_sets = {}
        if cfg.eval_every and cfg.eval_data:
            for name in cfg.eval_data.split(","):
                qs = load_questions(name.strip(), data_dir=cfg.data_dir, limit=cfg.eval_limit)
                eval_sets[Path(name.strip()).stem] = qs.questions
        sampler = PromptSampler(len(questions), cfg.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2))
        scheduler = make_scheduler(optimizer, cfg)
        start_step, nan_streak = 0, 0
        if checkpoint is not None:
            start_step, nan_streak = _restore(state, checkpoint, optimizer, scheduler, sampler)
            truncate_metrics(out / "metrics.jsonl", start_step)
            log.info("resumed from %s", checkpoint)
        cfg.save(out / "config.yaml")
        metrics_log = MetricsLog(out / "metrics.jsonl", cfg.report_to, cfg.to_dict())
        cleanup.callback(metrics_log.close)
        log.info("training %s with %s on %d questions (%s), device %s", cfg.model, cfg.algo,
                 len(questions), questions.origin, device)

        def state_now(step: int) -> dict[str, Any]:
            return {"step": step, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
                    "nan_streak": nan_streak, "config": cfg.to_dict(),
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}

        bar = tqdm(range(start_step + 1, cfg.steps + 1), initial=start_step, total=cfg.steps,
                   desc=f"{cfg.algo}", disable=not progress, dynamic_ncols=True)
        cleanup.callback(bar.close)
        for step in bar:
            step_started = time.perf_counter()
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # sampling depends on (seed, step)
            batch, stats = collect_rollout(model, tokenizer, questions.questions, sampler,
                                           verifier, cfg)
            row: dict[str, Any] = {"step": step, **vars(stats)}
            start = time.perf_counter()
            if batch is None:
                log.warning("step %d: no question with 0 < r̂ < 1 in %d generated answers; "
                            "nothing kept, no update", step, stats.generated_answers)
                upd = {"optimizer_steps": 0}
            else:
                upd, nan_streak = update_policy(model, optimizer, scheduler, batch, cfg,
                                                nan_streak)
            time_update = time.perf_counter() - start
            trained = batch.correct.mean().item() if batch is not None else float("nan")
            entropy = (batch.entropy * batch.response_mask).sum() / batch.response_mask.sum() \
                if batch is not None and batch.entropy is not None else float("nan")
            row.update(upd)
            row.update(reward_mean_trained=trained, entropy=float(entropy),
                       lr=scheduler.get_last_lr()[0], time_update_s=time_update,
                       tokens_per_s=stats.generated_tokens / max(
                           1e-9, stats.time_generate_s + stats.time_old_logprobs_s
                           + stats.time_verify_s + time_update))
            if eval_sets and (step % cfg.eval_every == 0 or step == cfg.steps):
                row.update(_evaluate(model, tokenizer, eval_sets, verifier, cfg))
            row["time_step_s"] = time.perf_counter() - step_started
            metrics_log.write(row)
            bar.set_postfix(reward=f"{stats.reward_mean:.3f}", entropy=f"{float(entropy):.3f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save_checkpoint(out / "checkpoints" / f"step-{step}", model, tokenizer,
                                state_now(step))
                prune_checkpoints(out, cfg.keep_checkpoints)
        save_checkpoint(out / "final", model, tokenizer, state_now(cfg.steps))
    finally:
        cleanup.close()
    return out / "final"
