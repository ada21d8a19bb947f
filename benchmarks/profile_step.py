"""Where one nftune training step spends its time, phase by phase.

Usage: python benchmarks/profile_step.py [--algo grpo] [--prompts 32] [--k 8] [--new-tokens 48]
                                         [--minibatches 4] [--warmup 2] [--steps 3]
                                         [--old-logprobs generate|recompute] [--device cpu]

Runs the trainer's own steps (``Trainer.step``: ``collect_rollout`` then ``update_policy``,
as ``nftune train`` does) on the vs-TRL workload — the demo's base model and arithmetic
questions — with timers wrapped around each phase: Hugging Face ``generate``, the rest of the
rollout (decoding, tensors), verification, the no-grad forward for π_old's log-probs, and in
the update the forward, loss, backward, gradient clipping and optimizer step. "other" is what
remains of the step (selection of groups, micro-batching, metrics). On CUDA each timer
synchronises first. Prints the mean over ``--steps`` steps after ``--warmup`` unmeasured ones.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

# torch is imported inside functions: the verifier's worker processes re-import this script
# as their __main__, and should not pay for torch (with CUDA libraries) on start-up
sys.path.insert(0, str(Path(__file__).parent))
from workload import add_workload_args, device_name, make_trainer, workload_config  # noqa: E402


class PhaseTimer:
    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)
        self.active = False

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.active:
            yield
            return
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(parser)
    parser.add_argument("--algo", default="grpo")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--old-logprobs", default="generate", choices=["generate", "recompute"])
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    import nftune.rollout as R
    import nftune.train as T
    import nftune.update as U
    from nftune.policy import pick_device

    cfg = workload_config(args, Path(tempfile.mkdtemp()), algo=args.algo,
                          old_logprobs=args.old_logprobs, save_every=0,
                          micro_batch_tokens=args.micro_batch_tokens, device=args.device)
    trainer = make_trainer(cfg)
    model, optimizer, verifier = trainer.model, trainer.optimizer, trainer.verifier

    timer = PhaseTimer(pick_device(cfg.device))
    # wrap the names the trainer looks up at call time
    R.generate_rollout = timer.wrap("rollout (all)", R.generate_rollout)
    model.generate = timer.wrap("rollout: HF generate", model.generate)
    verifier.verify = timer.wrap("verify", verifier.verify)
    T.recompute_logprobs = timer.wrap("old log-probs: no-grad forward", T.recompute_logprobs)
    U.response_logprobs = timer.wrap("update: forward", U.response_logprobs)
    U.objective_loss = timer.wrap("update: loss", U.objective_loss)
    backward = torch.Tensor.backward
    torch.Tensor.backward = timer.wrap("update: backward", backward)
    torch.nn.utils.clip_grad_norm_ = timer.wrap("update: grad clip", torch.nn.utils.clip_grad_norm_)
    optimizer.step = timer.wrap("update: optimizer step", optimizer.step)
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been")

    try:
        for step in range(1, args.warmup + args.steps + 1):
            timer.active = step > args.warmup
            with timer.phase("step"):
                trainer.step()
    finally:
        trainer.close()
        torch.Tensor.backward = backward

    sec = {k: v / args.steps for k, v in timer.seconds.items()}
    step_s = sec.pop("step")
    sec["rollout: decode, tensors"] = sec.pop("rollout (all)") - sec["rollout: HF generate"]
    sec["other (selection, micro-batching, metrics)"] = step_s - sum(sec.values())
    print(f"{cfg.algo}, {args.prompts} questions × {args.k} answers, ≤ {args.new_tokens} new "
          f"tokens, {args.minibatches} mini-batches, old log-probs: {args.old_logprobs}; "
          f"device {device_name(args.device)}; mean of {args.steps} steps after "
          f"{args.warmup} warm-up")
    order = ["rollout: HF generate", "rollout: decode, tensors", "verify",
             "old log-probs: no-grad forward", "update: forward", "update: loss",
             "update: backward", "update: grad clip", "update: optimizer step",
             "other (selection, micro-batching, metrics)"]
    for name in order:
        value = sec.get(name, 0.0)
        print(f"  {name:<44} {1000 * value:8.1f} ms  {100 * value / step_s:5.1f}%")
    print(f"  {'step':<44} {1000 * step_s:8.1f} ms  "
          f"({args.prompts * args.k / step_s:.0f} answers/s)")


if __name__ == "__main__":
    main()
