"""Operator launches and host syncs of one nftune step, against the compute floor's.

Usage: python benchmarks/count_ops.py [--algo grpo] [--prompts 32] [--k 8] [--new-tokens 48]
                                      [--minibatches 4] [--warmup 1] [--steps 2]
                                      [--old-logprobs generate|recompute]

On a GPU a small model's step is bound by how many kernels the host launches and how often it
waits for the device, not by arithmetic — and both can be counted on a CPU, exactly and
without timing noise. Every ATen operator that reaches the backend (forward, backward and
optimizer, below autograd) is counted with a ``TorchDispatchMode``; host syncs are the
``.item()``/``bool()``/``int()`` reads (``aten._local_scalar_dense``) and ``.tolist()`` calls.
nftune's step is counted phase by phase (``collect_rollout`` then ``update_policy``, as
``nftune train`` runs them), then the floor's passes on the same rollout: one no-grad forward
over the batch and, per mini-batch (trimmed to its longest answer), forward, token-mean loss,
backward and an AdamW step. On CPU, AdamW runs its per-parameter loop and reads each step
count with ``.item()``; CUDA's default (foreach) does neither, so those syncs are listed apart.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workload import add_workload_args, make_trainer, workload_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(parser)
    parser.add_argument("--algo", default="grpo")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--old-logprobs", default="generate", choices=["generate", "recompute"])
    args = parser.parse_args()

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import nftune.train as T
    from nftune.update import response_logprobs

    class Counting(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.phase = "other"
            self.ops: Counter[str] = Counter()
            self.syncs: Counter[str] = Counter()
            self.optimizer_syncs: Counter[str] = Counter()
            self.in_optimizer = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[self.phase] += 1
            if func is torch.ops.aten._local_scalar_dense.default:
                (self.optimizer_syncs if self.in_optimizer else self.syncs)[self.phase] += 1
            return func(*args, **(kwargs or {}))

    mode = Counting()

    def in_phase(name: str, fn, optimizer: bool = False):
        def wrapped(*a, **kw):
            before, mode.phase = mode.phase, name
            mode.in_optimizer = optimizer
            try:
                return fn(*a, **kw)
            finally:
                mode.phase, mode.in_optimizer = before, False
        return wrapped

    cfg = workload_config(args, Path(tempfile.mkdtemp()), algo=args.algo, device="cpu",
                          old_logprobs=args.old_logprobs, save_every=0)
    trainer = make_trainer(cfg)
    model, optimizer, verifier = trainer.model, trainer.optimizer, trainer.verifier
    floor_optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    batches = []

    def collect_and_keep(*a, **kw):
        batch, stats = collect_rollout(*a, **kw)
        batches.append(batch)
        return batch, stats

    collect_rollout = T.collect_rollout
    T.collect_rollout = in_phase("rollout (rest)", collect_and_keep)
    T.update_policy = in_phase("update", T.update_policy)

    model.generate = in_phase("generate", model.generate)
    T.recompute_logprobs = in_phase("old log-probs", T.recompute_logprobs)
    verifier.verify = in_phase("verify", verifier.verify)
    optimizer.step = in_phase("update", optimizer.step, optimizer=True)
    floor_optimizer.step = in_phase("floor", floor_optimizer.step, optimizer=True)
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        mode.syncs[mode.phase] += 1
        return tolist(self)

    def floor_passes(batch) -> None:
        with torch.no_grad():
            whole = batch.trimmed()
            response_logprobs(model, whole.input_ids, whole.attention_mask, whole.prompt_len)
        for part in torch.arange(len(batch)).tensor_split(args.minibatches):
            mb = batch.select(part).trimmed()
            logprobs, _ = response_logprobs(model, mb.input_ids, mb.attention_mask,
                                            mb.prompt_len)
            floor_optimizer.zero_grad()
            ((logprobs * mb.response_mask).sum() / mb.response_mask.sum()).backward()
            floor_optimizer.step()

    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been")
    torch.Tensor.tolist = counted_tolist
    try:
        for step in range(1, args.warmup + args.steps + 1):
            if step == args.warmup + 1:
                for counter in (mode.ops, mode.syncs, mode.optimizer_syncs):
                    counter.clear()
            torch.manual_seed(step)
            with mode:
                trainer.step()  # the trainer's own step: rollout, then update
                mode.phase = "floor"
                floor_passes(batches.pop())
                mode.phase = "other"
    finally:
        torch.Tensor.tolist = tolist
        trainer.close()

    n = args.steps
    print(f"{cfg.algo}, {args.prompts} questions × {args.k} answers, ≤ {args.new_tokens} new "
          f"tokens, {args.minibatches} mini-batches, old log-probs: {args.old_logprobs}; per "
          f"step, mean of {n} after {args.warmup} warm-up")
    print(f"  {'phase':<28} {'ATen ops':>9} {'host syncs':>11} {'+ optimizer .item()':>20}")
    phases = ["generate", "rollout (rest)", "verify", "old log-probs", "update"]
    for name in phases + ["floor"]:
        if name == "floor":
            print("  " + "-" * 70)
        print(f"  {name:<28} {mode.ops[name] / n:9.0f} {mode.syncs[name] / n:11.0f} "
              f"{mode.optimizer_syncs[name] / n:20.0f}")
    ours = sum(mode.ops[p] for p in phases if p != "generate")
    ours_syncs = sum(mode.syncs[p] for p in phases if p != "generate")
    extra = 100 * (ours / mode.ops["floor"] - 1)
    print(f"  nftune outside generate: {ours / n:.0f} ops ({extra:+.0f}% over the floor's "
          f"passes), {ours_syncs / n:.0f} host syncs (floor "
          f"{mode.syncs['floor'] / n:.0f}), not counting the optimizer's")
    gen = mode.ops["generate"]
    print(f"  whole step, generate included: {(ours + gen) / n:.0f} vs "
          f"{(mode.ops['floor'] + gen) / n:.0f} ops "
          f"({100 * ((ours + gen) / (mode.ops['floor'] + gen) - 1):+.1f}%)")


if __name__ == "__main__":
    main()
