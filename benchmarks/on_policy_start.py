"""How far from on-policy the update's first mini-batch starts: log R = log π_θ − log π_old
of every response token, π_old recomputed (``old_logprobs: recompute``) either on the update's
own micro-batches (:func:`nftune.update.update_packing`, what the trainer does) or packed on
its own over the whole rollout (:func:`nftune.update.micro_batches`, as before), against the
update's forward with gradient on its first mini-batch.

    python benchmarks/on_policy_start.py [--arch qwen2.5-0.5b] [--layers 4]

The model is a random one of ``--arch``'s width (``--layers`` deep: the effect is per layer
and the tensors' shapes are the real ones); the rollout is random tokens, 8 questions × 4
answers, prompts of 40–120 tokens (left-padded), answers of 16–256 (right-padded), micro-
batches of 2,048 tokens, 2 mini-batches. Three precisions: fp32, bf16 autocast (CUDA's
default), a LoRA r16 adapter on a bf16 base (autocast off, the CPU's default).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REGIMES = {"fp32": dict(bf16="false"),
           "bf16 autocast": dict(bf16="true"),
           "LoRA r16, bf16 base": dict(bf16="false", lora_rank=16, base_dtype="bfloat16")}


def random_rollout(vocab: int, questions: int = 8, answers: int = 4, seed: int = 0):
    """Random prompts and answers of varied lengths, half of each group right."""
    import torch

    from nftune.rollout import Rollout

    g = torch.Generator().manual_seed(seed)
    rows = questions * answers
    prompt_lens = torch.randint(40, 121, (questions,), generator=g).repeat_interleave(answers)
    response_lens = torch.randint(16, 257, (rows,), generator=g)
    prompt, width = int(prompt_lens.max()), int(response_lens.max())
    ids = torch.randint(3, vocab, (rows, prompt + width), generator=g)
    column = torch.arange(prompt + width)
    attention = ((column >= prompt - prompt_lens[:, None])
                 & (column < prompt + response_lens[:, None])).long()
    ids = ids * attention
    reward = torch.tensor([1.0, 0.0] * (rows // 2))
    return Rollout(input_ids=ids, attention_mask=attention, prompt_len=prompt,
                   response_mask=attention[:, prompt:], truncated=torch.zeros(rows, dtype=bool),
                   group_ids=torch.arange(questions).repeat_interleave(answers),
                   texts=[""] * rows, reward=reward, r_hat=torch.full((rows,), 0.5))


def measure(model_dir: str, name: str, change: dict) -> dict[str, float]:
    """max and mean |log R| over the first mini-batch's tokens, for both packings of π_old."""
    import torch

    from nftune.config import build_config
    from nftune.policy import build_policy, precision
    from nftune.update import (
        ResponseLogprobs,
        micro_batches,
        minibatch_rows,
        recompute_logprobs,
        update_packing,
    )

    cpu = torch.device("cpu")
    cfg = build_config(None, dict(model=model_dir, train_data="unused", device="cpu",
                                  micro_batch_tokens=2048, minibatches=2,
                                  gradient_checkpointing="false", **change))
    torch.manual_seed(0)
    model, _ = build_policy(cfg, cpu)
    rollout = random_rollout(model.config.vocab_size)
    groups = int(rollout.group_ids.max()) + 1
    model.eval()
    packing = update_packing(rollout, groups, cfg)
    seconds = {}
    with precision(cfg, cpu):
        started = time.perf_counter()
        own, _ = recompute_logprobs(model, rollout, cfg.micro_batch_tokens)
        seconds["packed on its own"] = time.perf_counter() - started
        started = time.perf_counter()
        update, _ = recompute_logprobs(model, rollout, cfg.micro_batch_tokens, packing=packing)
        seconds["on the update's micro-batches"] = time.perf_counter() - started
    counts = {"packed on its own": len(micro_batches(rollout, cfg.micro_batch_tokens)),
              "on the update's micro-batches": len(packing)}
    model.train()
    forward = ResponseLogprobs(model)
    first = minibatch_rows(rollout, groups, cfg.minibatches)[0]
    mb = rollout.select(first)
    result = {}
    for label, old in (("packed on its own", own), ("on the update's micro-batches", update)):
        gaps = []
        for micro in micro_batches(mb, cfg.micro_batch_tokens):
            piece = mb.select(micro).trimmed()
            with precision(cfg, cpu):
                logprobs, _ = forward(piece.input_ids, piece.attention_mask, piece.prompt_len)
            mask = piece.response_mask.bool()
            recorded = old[first[micro]][:, :mask.shape[1]]
            gaps.append((logprobs.detach() - recorded)[mask].abs())
        gap = torch.cat(gaps)
        result[label] = (float(gap.max()), float(gap.mean()), float((gap > 0).float().mean()),
                         counts[label], seconds[label])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2.5-0.5b")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (0: the arch's)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import rollout_engines
    import torch

    if args.layers:
        rollout_engines.ARCHS[args.arch] = dict(rollout_engines.ARCHS[args.arch],
                                                num_hidden_layers=args.layers)
    with tempfile.TemporaryDirectory() as work:
        rollout_engines.build_model_dir(args.arch, work, "float32")
        print(f"{args.arch} width, {args.layers or 'all'} layers, random weights; "
              f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
        print("first mini-batch |log R|: max, mean, share of tokens not exactly 0; "
              "π_old's micro-batches and time")
        for name, change in REGIMES.items():
            for label, (biggest, mean, share, count, took) in measure(work, name,
                                                                      change).items():
                print(f"  {name:20} π_old {label:30} max {biggest:9.3g}  mean {mean:9.3g}  "
                      f"nonzero {share:6.1%}  {count} micro-batches {took:6.1f} s")


if __name__ == "__main__":
    main()
