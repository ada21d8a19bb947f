"""Verifier throughput on 2 cores: DAPO-style integer answers and MATH500-style LaTeX answers.

Usage: python benchmarks/verify_speed.py [--workers 2] [--data-dir ../shared/data/bench]

Targets (issue 3): 8,192 DAPO-style responses (one paper-sized rollout) in <= 2 s; LaTeX >= 500/s.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from nftune.verify import Verifier


def dapo_workload(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Responses ending in an `Answer:` line; half right, half wrong, some without an answer."""
    rng = random.Random(seed)
    responses, golds = [], []
    for i in range(n):
        gold = rng.randint(0, 100_000)
        guess = gold if i % 2 == 0 else gold + rng.randint(1, 50)
        body = " ".join(f"step {k}: {rng.randint(0, 999)} + {k}" for k in range(40))
        tail = "" if i % 17 == 0 else f"\nAnswer: ${guess}$" if i % 3 else f"\nAnswer: {guess}"
        responses.append(body + tail)
        golds.append(str(gold))
    return responses, golds


def latex_workload(data_dir: Path, seed: int = 0) -> tuple[list[str], list[str]]:
    """MATH500 golds; each response boxes either its own gold or another item's (half each)."""
    golds = [json.loads(line)["answer"] for line in (data_dir / "math500.jsonl").open()]
    rng = random.Random(seed)
    responses = []
    for i, gold in enumerate(golds):
        pred = gold if i % 2 == 0 else rng.choice(golds)
        responses.append(f"Let us compute carefully. ... so the result is \\boxed{{{pred}}}.")
    return responses, golds


def timed(verifier: Verifier, responses: list[str], golds: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    verdicts = verifier.verify(responses, golds)
    return time.perf_counter() - start, sum(verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-dir", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "bench")
    args = parser.parse_args()
    with Verifier(workers=args.workers) as verifier:
        start = time.perf_counter()
        verifier.verify(["\\boxed{\\frac{1}{2}}"], ["0.5"])
        print(f"pool start (cold, {args.workers} workers): {time.perf_counter() - start:.2f} s")

        responses, golds = dapo_workload(8192)
        seconds, right = timed(verifier, responses, golds)
        print(f"(a) DAPO-style integer answers: {len(responses)} in {seconds:.3f} s = "
              f"{len(responses) / seconds:,.0f}/s ({right} correct)  target: <= 2 s")

        responses, golds = latex_workload(args.data_dir)
        for run in ("first pass (gold cache cold)", "second pass (gold cache warm)"):
            seconds, right = timed(verifier, responses, golds)
            print(f"(b) MATH500 LaTeX answers, {run}: {len(responses)} in {seconds:.2f} s = "
                  f"{len(responses) / seconds:,.0f}/s ({right} correct)  target: >= 500/s")
        print(f"worker restarts: {verifier.restarts}")


if __name__ == "__main__":
    main()
