"""Padding paid by micro-batching, packing answers in arrival order or longest first.

Usage: python benchmarks/micro_batching.py [--seed 0]

Part 1 (counts, no model): one mini-batch in the paper's shape — 32 questions × 16 answers,
prompts of 60–200 tokens, answer lengths log-normal around 700 tokens and cut at 4,096 (the
long tail of a reasoning model) — split by :func:`nftune.update.micro_batches` under several
token budgets. Prints the tokens each way feeds the model (rows × longest sequence, summed
over micro-batches) against the real tokens.

Part 2 (time, the demo's base model on this machine's CPU): a no-grad forward over 256
answers of 10–200 tokens in micro-batches of at most 4,096 padded tokens, both ways,
alternating, median of 5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from nftune.rollout import Rollout  # noqa: E402
from nftune.update import micro_batches, response_logprobs  # noqa: E402


def synthetic_rollout(prompt_lens: list[int], response_lens: list[int], k: int,
                      vocab: int = 2) -> Rollout:
    """A rollout of the given lengths (left-padded prompts, right-padded answers)."""
    rows, p, r = len(prompt_lens), max(prompt_lens), max(response_lens)
    prompt_mask = torch.arange(p)[None, :] >= (p - torch.tensor(prompt_lens))[:, None]
    response_mask = torch.arange(r)[None, :] < torch.tensor(response_lens)[:, None]
    attention = torch.cat([prompt_mask, response_mask], 1).long()
    ids = torch.randint(0, vocab, (rows, p + r)) * attention
    return Rollout(input_ids=ids, attention_mask=attention, prompt_len=p,
                   response_mask=response_mask.long(), truncated=torch.zeros(rows, dtype=bool),
                   group_ids=torch.arange(rows // k).repeat_interleave(k), texts=[""] * rows)


def fed_tokens(rollout: Rollout, batches: list[list[int]]) -> int:
    return sum(rollout.select(b).trimmed().input_ids.numel() for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "nftune" / "demo-base"))
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)

    k = 16
    prompts = torch.randint(60, 201, (32,), generator=gen).repeat_interleave(k).tolist()
    answers = (700 * torch.exp(0.8 * torch.randn(32 * k, generator=gen))).clamp(1, 4096)
    rollout = synthetic_rollout(prompts, answers.long().tolist(), k)
    real = int(rollout.attention_mask.sum())
    print(f"part 1: 32 questions × {k} answers, answer length median "
          f"{answers.median():.0f}, max {answers.max():.0f}; {real:,} real tokens")
    print(f"  {'budget':>8} {'keep groups':>11} {'arrival order':>22} {'longest first':>22}")
    for budget in (16384, 32768, 65536):
        for keep in (False, True):
            cells = []
            for by_length in (False, True):
                batches = micro_batches(rollout, budget, keep_groups=keep, by_length=by_length)
                fed = fed_tokens(rollout, batches)
                cells.append(f"{fed:>10,} ({fed / real:4.2f}x, {len(batches):3d})")
            print(f"  {budget:>8} {str(keep):>11} {cells[0]:>22} {cells[1]:>22}")
    print("  (tokens fed to the model, as a multiple of the real tokens, micro-batches)")

    from workload import base_model

    from nftune.policy import load_policy

    model, _ = load_policy(str(base_model(args.cache)), torch.device("cpu"))
    vocab = model.config.vocab_size
    lens = torch.randint(10, 201, (256,), generator=gen).tolist()
    rollout = synthetic_rollout([12] * 256, lens, 8, vocab)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(5):
        for by_length in (False, True):
            start = time.perf_counter()
            with torch.no_grad():  # as recompute_logprobs does, with the packing chosen here
                for rows in micro_batches(rollout, 4096, by_length=by_length):
                    part = rollout.select(rows).trimmed()
                    response_logprobs(model, part.input_ids, part.attention_mask,
                                      part.prompt_len, with_entropy=True)
            times[by_length].append(time.perf_counter() - start)
    fed = {b: fed_tokens(rollout, micro_batches(rollout, 4096, by_length=b)) for b in times}
    print(f"\npart 2: no-grad forward, demo model, 256 answers of 10–200 tokens, budget 4096, "
          f"CPU {torch.get_num_threads()} threads, median of 5")
    for b in (False, True):
        print(f"  {'longest first' if b else 'arrival order':<14} "
              f"{1000 * statistics.median(times[b]):7.1f} ms, {fed[b]:,} tokens fed")
    print(f"  longest first / arrival order: time "
          f"{statistics.median(times[True]) / statistics.median(times[False]):.2f}x, tokens "
          f"{fed[True] / fed[False]:.2f}x")


if __name__ == "__main__":
    main()
