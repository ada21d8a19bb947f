"""Algorithm 1 of the NFT paper: the online loop, the same for every objective.

    for each step:
        sample questions; generate K answers each; verify          (collect_rollout)
        r̂_q = mean reward; keep 0 < r̂_q < 1, refill (dynamic sampling)
        record π_old's per-token log-probs
        split into mini-batches, one optimizer step each            (update.update_policy)
        π_old ← π_θ  (the next rollout is sampled from the updated model)

One model is ever in memory: π_old exists only as the recorded log-probs. :class:`Trainer`
sets a run up (or resumes it) and runs one step at a time; :func:`train` drives it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from nftune.artifact import (
    checkpoint_bytes,
    ensure_space,
    final_bytes,
    final_dtype,
    free_bytes,
    human,
    save_final_model,
    tokenizer_bytes,
)
from nftune.checkpoint import (
    CheckpointError,
    MetricsLog,
    input_fingerprints,
    latest_checkpoint,
    load_state,
    moved_inputs,
    prune_checkpoints,
    remove_stale,
    save_checkpoint,
    truncate_metrics,
)
from nftune.config import TrainConfig, engine_class
from nftune.data import PromptSampler, Question, format_prompt, load_questions, strategy_for
from nftune.evaluate import evaluate_sets, load_eval_sets
from nftune.objectives import get_objective, overlong_penalty
from nftune.parallel import (
    SINGLE,
    World,
    close_world,
    init_world,
    interleaved_ids,
    rank_device,
)
from nftune.plan import check_fit
from nftune.policy import (
    build_policy,
    device_memory_bytes,
    load_tokenizer,
    make_optimizer,
    make_scheduler,
    own_cpu_optimizer_state,
    pick_device,
    precision,
    set_matmul_precision,
)
from nftune.reward import Reward, RewardError, Scores, check_values
from nftune.rollout import (
    GenerationEngine,
    HFEngine,
    Rollout,
    concat_rollouts,
    join_others,
    longest_prompt_tokens,
    pad_token_id,
)
from nftune.update import (
    data_parallel,
    full_policy,
    is_sharded,
    load_optimizer_state,
    optimizer_state,
    recompute_logprobs,
    update_packing,
    update_policy,
)
from nftune.verify import Verifier

log = logging.getLogger("nftune")


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
    reward_errors: int = 0  # calls of a reward function that raised or killed its worker
    reward_timeouts: int = 0  # calls that overran verify_timeout_s
    # |log π_old − log π_engine| per response token, when the engine reports its own log-probs
    engine_logprob_diff_mean: float | None = None
    engine_logprob_diff_max: float | None = None


def refill_count(wanted: int, kept: int, seen: int, first_round: bool) -> int:
    """How many questions a generation round asks for: the batch at first; then what is
    missing, scaled by the share of questions kept so far (at least a quarter), at most a
    batch."""
    if first_round:
        return wanted
    return min(wanted, math.ceil((wanted - kept) / max(kept / seen, 0.25)))


def score_answers(reward: Reward, rollout: Rollout, questions: list[Question], k: int,
                  cfg: TrainConfig) -> Scores:
    """The reward of each of the K answers per question; a round in which every call failed
    stops the run, values of the wrong kind for the objective are an error."""
    scores = reward.score(rollout.texts, [q for q in questions for _ in range(k)])
    if scores.values and scores.errors + scores.timeouts == len(scores.values):
        raise RewardError(f"reward {reward.spec}: failed on every answer of a round "
                          f"({scores.errors} errors, {scores.timeouts} timeouts of "
                          f"{cfg.verify_timeout_s} s); the first error:\n"
                          f"{scores.first_error or '(timeouts only)'}")
    check_values(scores.values, get_objective(cfg.algo).binary_reward, reward.spec, cfg.algo)
    return scores


def with_group_statistics(rollout: Rollout, values: list[float], k: int,
                          cfg: TrainConfig) -> Rollout:
    """A new Rollout carrying each answer's reward (truncated answers count as wrong), its
    group's mean r̂ and population std, and DAPO's overlong penalty where the run shapes."""
    reward = torch.tensor(values, dtype=torch.float32, device=rollout.input_ids.device)
    reward = reward * (~rollout.truncated).float()
    groups = reward.view(-1, k)
    penalty = overlong_penalty(rollout.response_lengths, cfg.max_new_tokens,
                               cfg.overlong_buffer) if cfg.overlong_shaping else None
    return replace(rollout, reward=reward, r_hat=groups.mean(1).repeat_interleave(k),
                   r_std=groups.std(1, correction=0).repeat_interleave(k), penalty=penalty)


def mixed_groups(rollout: Rollout, k: int) -> torch.Tensor:
    """Rows of the answers whose group's rewards differ (0 < r̂ < 1 when binary): dynamic
    sampling keeps these."""
    groups = rollout.reward.view(-1, k)
    return torch.nonzero((groups.amax(1) > groups.amin(1)).repeat_interleave(k)).flatten()


def with_old_logprobs(model, rollout: Rollout | None, cfg: TrainConfig, world: World = SINGLE,
                      forward=None, num_groups: int | None = None) -> Rollout | None:
    """A new Rollout with π_old's log-probs and entropy from a no-grad forward in the update's
    precision and on the update's micro-batches (``old_logprobs: recompute``;
    :func:`nftune.update.update_packing`, ``num_groups``: the questions over every rank,
    default this rollout's); under FSDP (``forward`` sharded) a rank without answers (None)
    joins the others' forwards."""
    model.eval()
    packing = None
    if rollout is not None:
        if num_groups is None:
            num_groups = int(rollout.group_ids.max().item()) + 1 if len(rollout) else 0
        packing = update_packing(rollout, num_groups, cfg)
    with precision(cfg, next(model.parameters()).device):
        out = recompute_logprobs(model, rollout, cfg.micro_batch_tokens, cfg.temperature,
                                 world, forward if is_sharded(forward) else None, packing)
    if out is None:
        return None
    return replace(rollout, old_logprobs=out[0], entropy=out[1])


def collect_rollout(model, tokenizer, questions: list[Question], sampler: PromptSampler,
                    reward: Reward | Verifier, cfg: TrainConfig,
                    engine: GenerationEngine | None = None, world: World = SINGLE,
                    forward=None, on_scored: Callable[[list[Question], Rollout], None] | None
                    = None) -> tuple[Rollout | None, RolloutStats]:
    """Algorithm 1, steps 1–5: generate K answers for fresh questions (with ``engine``,
    default Hugging Face ``generate`` on ``model``) → score them (``reward``, or a math
    ``Verifier`` alone) → group statistics → keep the groups whose rewards differ, refilling
    (dynamic sampling) → π_old's log-probs. Returns the batch (None if nothing was kept).

    Under several ranks (``world``) every rank draws the same questions and answers its
    contiguous share of them (a question's K answers on one rank); how many are kept, and so
    the refills, are counted over all ranks, the batch is this rank's part with its questions
    numbered globally (:func:`nftune.parallel.interleaved_ids`: every mini-batch then spans
    the ranks), and the statistics are the global batch's. Under FSDP (``forward`` sharded,
    its engine collective) a rank with no questions in a round still joins the others'
    generation and π_old forwards. ``on_scored(questions, rollout)`` sees each round's scored
    answers (rewards and r̂) before filtering."""
    engine = engine or HFEngine(model, tokenizer, cfg.gen_batch_size)
    reward = reward if isinstance(reward, Reward) else Reward(reward)
    k = cfg.answers_per_prompt
    kept: list[Rollout] = []
    kept_questions = questions_seen = errors = timeouts = 0
    rewards, lengths, truncated = [], [], []
    time_gen = time_ver = 0.0
    rounds = cfg.max_gen_batches if cfg.dynamic_sampling else 1
    for round_ in range(rounds):
        count = refill_count(cfg.prompts_per_step, kept_questions, questions_seen, round_ == 0)
        drawn = sampler.take(count)  # the same on every rank
        batch = [questions[drawn[i]] for i in world.share(len(drawn))]
        kept_here = 0
        if not batch:
            join_others(engine, cfg.rollout_sampling())
        if batch:
            start = time.perf_counter()
            rollout = engine.generate(
                [format_prompt(q.problem, cfg.template, tokenizer) for q in batch],
                cfg.rollout_sampling(), record_logprobs=cfg.old_logprobs == "generate")
            time_gen += time.perf_counter() - start
            start = time.perf_counter()
            scores = score_answers(reward, rollout, batch, k, cfg)
            time_ver += time.perf_counter() - start
            errors, timeouts = errors + scores.errors, timeouts + scores.timeouts
            scored = with_group_statistics(rollout, scores.values, k, cfg)
            if on_scored is not None:
                on_scored(batch, scored)
            rewards.append(scored.reward.cpu())
            lengths.append(scored.response_lengths.float().cpu())
            truncated.append(scored.truncated.float().cpu())
            rows = mixed_groups(scored, k) if cfg.dynamic_sampling else None
            if rows is None or len(rows):
                kept.append(scored if rows is None else scored.select(rows))
                kept_here = len(batch) if rows is None else len(rows) // k
        questions_seen += len(drawn)
        kept_questions += int(world.sum(kept_here)[0])
        if kept_questions >= cfg.prompts_per_step:
            break
    engine.finish_rollout()  # the last round: vLLM may sleep through π_old and the update
    rewards_t, lengths_t, truncated_t = (torch.cat(v) if v else torch.zeros(0)
                                         for v in (rewards, lengths, truncated))
    answers, reward_sum, length_sum, truncated_sum, errors, timeouts = world.sum(
        len(rewards_t), rewards_t.sum(), lengths_t.sum(), truncated_t.sum(), errors, timeouts)
    time_gen, time_ver = world.max(time_gen, time_ver)
    stats = RolloutStats(
        generated_answers=int(answers), reward_mean=reward_sum / answers,
        kept_fraction=(kept_questions / questions_seen) if cfg.dynamic_sampling else 1.0,
        response_length=length_sum / answers, truncated_fraction=truncated_sum / answers,
        gen_batches=round_ + 1, time_generate_s=time_gen, time_verify_s=time_ver,
        time_old_logprobs_s=0.0, generated_tokens=int(length_sum), reward_errors=int(errors),
        reward_timeouts=int(timeouts))
    batch_rollout = concat_rollouts(kept, pad_token_id(tokenizer)) if kept else None
    if world.distributed:  # number the questions globally, the ranks' dealt in turn
        here = int(batch_rollout.group_ids.max().item()) + 1 if batch_rollout else 0
        ids = interleaved_ids(world.gather(here), world.rank)
        if batch_rollout is not None:
            batch_rollout.group_ids = torch.tensor(ids, device=batch_rollout.group_ids.device
                                                   )[batch_rollout.group_ids]
    if batch_rollout is not None and kept_questions > cfg.prompts_per_step:
        # the last round overfilled the batch: keep the first prompts_per_step questions
        rows = torch.nonzero(batch_rollout.group_ids < cfg.prompts_per_step).flatten()
        batch_rollout = batch_rollout.select(rows) if len(rows) else None
    if cfg.old_logprobs == "recompute" and (batch_rollout is not None or is_sharded(forward)):
        start = time.perf_counter()
        batch_rollout = with_old_logprobs(model, batch_rollout, cfg, world, forward,
                                          min(kept_questions, cfg.prompts_per_step))
        stats.time_old_logprobs_s = time.perf_counter() - start
    stats.time_old_logprobs_s = world.max(stats.time_old_logprobs_s)[0]
    mean, biggest = engine_mismatch(batch_rollout) if batch_rollout is not None else (None, None)
    if world.distributed:  # weighted by each rank's response tokens
        tokens = batch_rollout.response_mask.sum().item() if mean is not None else 0
        total, tokens = world.sum((mean or 0.0) * tokens, tokens)
        biggest_all = world.max(-1.0 if biggest is None else biggest)[0]
        mean, biggest = (total / tokens, biggest_all) if tokens else (None, None)
    stats.engine_logprob_diff_mean, stats.engine_logprob_diff_max = mean, biggest
    return batch_rollout, stats


def completion_rows(questions: list[Question], rollout: Rollout, prompts: int
                    ) -> list[dict[str, Any]]:
    """The K scored answers of the first ``prompts`` questions, one row each: what
    completions.jsonl and the W&B / TensorBoard table show."""
    rows = []
    for i in range(len(rollout)):
        group = int(rollout.group_ids[i])
        if group >= prompts:
            continue
        question = questions[group]
        rows.append({"question_id": question.id, "problem": question.problem,
                     "reference": question.answer, "completion": rollout.texts[i],
                     "reward": float(rollout.reward[i]), "r_hat": float(rollout.r_hat[i]),
                     "response_tokens": int(rollout.response_lengths[i]),
                     "truncated": bool(rollout.truncated[i])})
    return rows


def batch_means(batch: Rollout | None, world: World = SINGLE) -> tuple[float, float]:
    """The trained batch's mean reward and its mean entropy per response token, over every
    rank's part (NaN where there is none)."""
    reward = entropy = tokens = 0.0
    if batch is not None:
        reward, tokens = batch.reward.sum().item(), batch.response_mask.sum().item()
        if batch.entropy is not None:
            entropy = (batch.entropy * batch.response_mask).sum().item()
    has_entropy = batch is None or batch.entropy is not None
    answers, reward, entropy, tokens, missing = world.sum(
        len(batch) if batch is not None else 0, reward, entropy, tokens, not has_entropy)
    nan = float("nan")
    return (reward / answers if answers else nan,
            entropy / tokens if answers and tokens and not missing else nan)


def engine_mismatch(rollout: Rollout) -> tuple[float | None, float | None]:
    """Mean and max |log π_old − log π_engine| per response token, where the engine reported
    its own log-probs (vLLM); (None, None) otherwise."""
    if rollout.engine_logprobs is None or rollout.old_logprobs is None:
        return None, None
    diff = (rollout.old_logprobs - rollout.engine_logprobs).abs()[rollout.response_mask.bool()]
    return (diff.mean().item(), diff.max().item()) if diff.numel() else (None, None)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _setup_logging(output_dir: Path, world: World = SINGLE) -> list[logging.Handler]:
    """Everything to train.log (rank 0's); warnings also to the console, with the rank under
    several."""
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    who = f"nftune[rank {world.rank}]" if world.distributed else "nftune"
    console.setFormatter(logging.Formatter(f"{who}: warning: %(message)s"))
    handlers: list[logging.Handler] = [console]
    if world.is_main:
        file_handler = logging.FileHandler(output_dir / "train.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.insert(0, file_handler)
    for handler in handlers:
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handlers


def _restore(state: dict[str, Any], checkpoint: Path, optimizer, scheduler,
             sampler: PromptSampler, world: World = SINGLE, forward=None) -> tuple[int, int]:
    """Load a checkpoint's trainer state into the run; returns (step, NaN streak). Any value of
    the wrong kind is a :class:`CheckpointError` naming the checkpoint."""
    try:
        step, nan_streak = state["step"], state["nan_streak"]
        if not (isinstance(step, int) and isinstance(nan_streak, int) and step >= 0):
            raise TypeError("step and nan_streak must be non-negative integers")
        if forward is None or not is_sharded(forward):
            optimizer.load_state_dict(state["optimizer"])
            own_cpu_optimizer_state(optimizer)
        else:  # FSDP copies each rank's shards out of the full state
            load_optimizer_state(forward, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict({k: int(v) for k, v in state["sampler"].items()})
        rng = state["rng"]
        ranks = rng.get("ranks") or [rng]
        if len(ranks) != world.size:
            log.warning("--resume: %s was written by %d rank(s), this run has %d; each rank "
                        "takes rank 0's random state (sampling is reseeded every step anyway)",
                        checkpoint, len(ranks), world.size)
        rng = ranks[world.rank] if len(ranks) == world.size else ranks[0]
        if not (isinstance(rng["torch"], torch.Tensor) and rng["torch"].dtype == torch.uint8):
            raise TypeError("rng.torch must be a uint8 tensor")
        torch.set_rng_state(rng["torch"])  # sampling is also reseeded every step
        random.setstate(rng["python"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f"{checkpoint}: trainer state does not fit this run "
                              f"({type(err).__name__}: {err})") from None
    return step, nan_streak


# what makes a directory hold a run, and what --overwrite deletes of it
RUN_FILES = ("metrics.jsonl", "checkpoints", "final")
RUN_OUTPUTS = (*RUN_FILES, "train.log", "config.yaml", "completions.jsonl", "tensorboard",
               "wandb", "wandb-run-id")


def claim_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """A fresh run needs a directory without a run in it: continue one with ``resume``, or
    delete its outputs (only nftune's own files) with ``overwrite``."""
    import shutil

    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise FileExistsError(
            f"{out}: holds a run already ({', '.join(found)}); continue it with --resume, or "
            "start over with --overwrite (deletes that run's metrics, checkpoints and final/)")
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class Trainer:
    """One run of Algorithm 1: set up (or resumed) on construction, then :meth:`step` after
    :meth:`step` and :meth:`save_final`. A context manager: the verifier's workers, log
    handlers and metrics file are closed however the run ends.

    ``resume`` continues from the newest intact checkpoint in ``cfg.output_dir`` (damaged ones
    are reported and skipped); the config must be the one the run was started with, except for
    the keys of ``RESUME_SAFE_KEYS`` when ``allow_changes`` is set. Without ``resume`` the
    directory must not hold a run, unless ``overwrite`` (which deletes it)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, allow_changes: bool = False,
                 overwrite: bool = False):
        cfg.resolve()
        self.cfg = cfg
        self.out = out = Path(cfg.output_dir)
        # under torchrun: this process's rank; rank 0 owns the run directory
        self.world = world = init_world(cfg.device, cfg.distributed_timeout_s)
        # everything opened below is closed in reverse order however the run ends
        self._cleanup = contextlib.ExitStack()
        self._cleanup.callback(close_world, world)
        try:
            if world.is_main:
                claim_output_dir(out, resume, overwrite)
                out.mkdir(parents=True, exist_ok=True)
            world.barrier()
            self._setup(resume, allow_changes)
        except BaseException:
            self.close()
            raise

    def _setup(self, resume: bool, allow_changes: bool) -> None:
        cfg, out, world = self.cfg, self.out, self.world
        for handler in _setup_logging(out, world):
            self._cleanup.callback(handler.close)
            self._cleanup.callback(log.removeHandler, handler)
        self.device = device = rank_device(world, pick_device(cfg.device))
        matmuls = set_matmul_precision(device)
        checkpoint, state = None, None
        if world.is_main:
            remove_stale(out)
            checkpoint = latest_checkpoint(out) if resume else None
        checkpoint = world.gather(checkpoint)[0]  # rank 0's choice, for every rank
        # what the model, data, plugin and reward paths hold: a resume may find them elsewhere
        self.inputs = input_fingerprints(cfg.to_dict())
        if resume:
            if checkpoint is None:
                log.warning("--resume: no checkpoint in %s; starting from the beginning", out)
            else:
                state = load_state(checkpoint)
                saved = state.get("config") or {}
                moved = moved_inputs(state.get("inputs"), self.inputs, saved, cfg.to_dict())
                for key in moved:
                    log.info("--resume: %s moved from %s to %s (the same files)", key,
                             saved.get(key), getattr(cfg, key))
                changed = cfg.check_resume(saved, allow_changes, moved)
                if changed:
                    log.warning("--resume: changed on resume: %s", ", ".join(changed))
        self.verifier = self._cleanup.enter_context(
            Verifier(cfg.verify_workers, cfg.verify_timeout_s, strategy=strategy_for(cfg.template)))
        self.reward = self._cleanup.enter_context(
            Reward(self.verifier, cfg.reward, cfg.verify_workers, cfg.verify_timeout_s))
        self.reward.start_in_background()  # its warm-up overlaps loading the model and data
        # the data and the tokenizer first: the fit check needs the longest prompt, and a run
        # that cannot fit is refused before the model loads
        self.tokenizer = load_tokenizer(cfg.model)
        self.questions = load_questions(cfg.train_data, data_dir=cfg.data_dir,
                                        limit=cfg.train_limit)
        self.eval_sets = load_eval_sets(cfg) if cfg.eval_every else {}
        self.prompt_tokens = longest_prompt_tokens(self.tokenizer, [
            format_prompt(q.problem, cfg.template, self.tokenizer)
            for q in [*self.questions.questions, *(q for qs in self.eval_sets.values()
                                                   for q in qs)]])
        sharded = world.distributed and cfg.distributed_strategy == "fsdp"
        if sharded and (cfg.lora_rank or cfg.rollout_engine != "hf"):
            raise ValueError("distributed_strategy: fsdp shards full fine-tunes with the hf "
                             "engine; LoRA and vLLM run with ddp (docs/scale.md)")
        if cfg.fit_check:
            plan = check_fit(cfg, device.type, device_memory_bytes(device), self.prompt_tokens,
                             world.size)
            log.info("fit check: %s", "skipped (the model's shape is not known offline)"
                     if plan is None else plan.report().replace("\n", "\n    "))
        # LoRA draws its A matrices here, and torch seeds its default generator at random in
        # each process: without this the same seed would start from other adapters each time
        torch.manual_seed(cfg.seed)
        try:
            self.model, self.tokenizer = build_policy(cfg, device, checkpoint)
        except Exception as err:  # noqa: BLE001 — whatever the file holds, name the checkpoint
            if checkpoint is None:
                raise
            raise CheckpointError(f"{checkpoint}: cannot load the model "
                                  f"({type(err).__name__}: {err})") from None
        # the update's forward: DDP, or FSDP2 sharding the model in place, under torchrun
        self.forward = data_parallel(self.model, world, cfg.distributed_strategy)
        self.engine = engine_class(cfg.rollout_engine).from_config(
            self.model, self.tokenizer, cfg, prompt_tokens=self.prompt_tokens)
        if sharded:
            self.engine.shard_with(self.forward, world)
        self.sampler = PromptSampler(len(self.questions), cfg.seed)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.step_done, self.nan_streak = 0, 0
        if checkpoint is not None:
            self.step_done, self.nan_streak = _restore(state, checkpoint, self.optimizer,
                                                       self.scheduler, self.sampler, world,
                                                       self.forward)
            if world.is_main:
                for name in ("metrics.jsonl", "completions.jsonl"):
                    truncate_metrics(out / name, self.step_done)
            log.info("resumed from %s", checkpoint)
        self.metrics_log = None
        if world.is_main:
            cfg.save(out / "config.yaml")
            self.metrics_log = MetricsLog(out / "metrics.jsonl", cfg.report_to, cfg.to_dict(),
                                          run_name=cfg.run_name or out.resolve().name,
                                          resumed_at=self.step_done if checkpoint else None,
                                          project=cfg.wandb_project)
            self._cleanup.callback(self.metrics_log.close)
        log.info("training %s with %s on %d questions (%s), device %s%s", cfg.model, cfg.algo,
                 len(self.questions), self.questions.origin, device,
                 f"; {world.size} ranks ({cfg.distributed_strategy})" if world.distributed
                 else "")
        log.info("gradient checkpointing %s (gradient_checkpointing: %s)",
                 "on" if self.model.is_gradient_checkpointing else "off",
                 cfg.gradient_checkpointing)
        log.info("precision: bf16 autocast %s (bf16: %s on %s); %s",
                 "on" if cfg.uses_bf16(device.type) else "off", cfg.bf16, device.type,
                 matmuls)
        files = tokenizer_bytes(self.tokenizer)
        self.checkpoint_size = checkpoint_bytes(self.model) + files
        self.final_size = final_bytes(self.model, final_dtype(cfg)) + files
        kept = min(cfg.keep_checkpoints + 1, (cfg.steps - 1) // cfg.save_every) \
            if cfg.save_every else 0  # + 1: the newest is written before the oldest goes
        self.disk_plan = (f"disk: one checkpoint {human(self.checkpoint_size)} (up to {kept} at "
                          f"a time), final/ {human(self.final_size)}; "
                          f"{human(free_bytes(out))} free in {out}")
        log.info(self.disk_plan)
        if free_bytes(out) < kept * self.checkpoint_size + self.final_size:
            log.warning("%s: the run's checkpoints and final/ will not all fit (%s)", out,
                        self.disk_plan)

    def step(self) -> dict[str, Any]:
        """One step of Algorithm 1 (the next one); returns its metrics row, also written to
        metrics.jsonl, and writes a checkpoint when one is due."""
        cfg = self.cfg
        step = self.step_done + 1
        step_started = time.perf_counter()
        world = self.world
        # sampling depends on (seed, step) and, under several ranks, the rank
        torch.manual_seed((cfg.seed * 1_000_003 + step) * world.size + world.rank)
        # a few of the step's first answers, as generated and scored, for completions.jsonl
        shown: list[dict[str, Any]] = []

        def show(questions: list[Question], rollout: Rollout) -> None:
            if not shown:
                shown.extend(completion_rows(questions, rollout, cfg.log_completions_prompts))

        due = self.metrics_log is not None and cfg.log_completions_every > 0 and \
            step % cfg.log_completions_every == 0
        # 1–5: questions, K answers each, rewards, r̂, keep 0 < r̂ < 1 (refilling), π_old
        batch, stats = collect_rollout(self.model, self.tokenizer, self.questions.questions,
                                       self.sampler, self.reward, cfg, self.engine, world,
                                       self.forward, on_scored=show if due else None)
        row: dict[str, Any] = {"step": step, **{k: v for k, v in vars(stats).items()
                                                 if v is not None}}
        for name in ("errors", "timeouts"):
            row[f"reward/{name}"] = row.pop(f"reward_{name}")
        start = time.perf_counter()
        kept = int(world.sum(len(batch) if batch is not None else 0)[0])
        if not kept:
            log.warning("step %d: no question with 0 < r̂ < 1 in %d generated answers; "
                        "nothing kept, no update", step, stats.generated_answers)
            upd: dict[str, Any] = {"optimizer_steps": 0}
        else:  # 6: one optimizer step per mini-batch (the later ones off-policy)
            upd, self.nan_streak = update_policy(self.model, self.optimizer, self.scheduler,
                                                 batch, cfg, self.nan_streak, world,
                                                 self.forward)
            self.engine.update_weights(self.model)  # 7: π_old ← π_θ
        time_update = world.max(time.perf_counter() - start)[0]
        trained, entropy = batch_means(batch, world)
        row.update(upd)
        row.update(reward_mean_trained=trained, entropy=float(entropy),
                   lr=self.scheduler.get_last_lr()[0], time_update_s=time_update,
                   tokens_per_s=stats.generated_tokens / max(
                       1e-9, stats.time_generate_s + stats.time_old_logprobs_s
                       + stats.time_verify_s + time_update))
        if self.eval_sets and (step % cfg.eval_every == 0 or step == cfg.steps):
            row.update(evaluate_sets(self.engine, self.tokenizer, self.eval_sets,
                                     self.reward, cfg, world))
        row["time_step_s"] = world.max(time.perf_counter() - step_started)[0]
        if self.metrics_log is not None:
            self.metrics_log.write(row)
            self.metrics_log.write_completions(step, shown)
        self.step_done = step
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            state = self._state()  # every rank's random state, gathered
            policy = full_policy(self.forward, self.model, world)  # FSDP: gathered on rank 0
            if world.is_main:
                directory = self.out / "checkpoints" / f"step-{step}"
                ensure_space(directory, self.checkpoint_size, f"checkpoint step-{step}")
                save_checkpoint(directory, policy, self.tokenizer, state)
                prune_checkpoints(self.out, cfg.keep_checkpoints)
            world.barrier()
        return row

    def save_final(self) -> Path:
        """The trained model as ``final/``: a Hugging Face model directory in the base model's
        dtype with a model card, no trainer state (:mod:`nftune.artifact`); returns it."""
        directory = self.out / "final"
        policy = full_policy(self.forward, self.model, self.world)  # FSDP: gathered on rank 0
        if self.world.is_main:
            ensure_space(directory, self.final_size, "final/")
            rows = [json.loads(line) for line in
                    (self.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            save_final_model(directory, policy, self.tokenizer, self.cfg, rows)
        self.world.barrier()
        return directory

    def _state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        ranks = self.world.gather(rng)
        if self.world.distributed:  # rank r resumes with ranks[r]
            rng = {"torch": rng["torch"].clone(), "python": rng["python"], "ranks": ranks}
        return {"step": self.step_done,
                "optimizer": optimizer_state(self.forward, self.optimizer),
                "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "nan_streak": self.nan_streak, "config": self.cfg.to_dict(),
                "inputs": self.inputs, "rng": rng}

    def close(self) -> None:
        self._cleanup.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          allow_changes: bool = False, overwrite: bool = False) -> Path:
    """Run Algorithm 1 as configured (see :class:`Trainer` for ``resume``, ``allow_changes``
    and ``overwrite``); returns the final model directory."""
    from tqdm.auto import tqdm

    with Trainer(cfg, resume, allow_changes, overwrite) as trainer:
        progress = progress and trainer.world.is_main
        if progress:
            print(f"nftune: {trainer.disk_plan}", file=sys.stderr)
        with tqdm(total=cfg.steps, initial=trainer.step_done, desc=cfg.algo,
                  disable=not progress, dynamic_ncols=True) as bar:
            while trainer.step_done < cfg.steps:
                row = trainer.step()
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}",
                                entropy=f"{row['entropy']:.3f}")
        return trainer.save_final()
