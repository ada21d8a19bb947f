"""The first optimizer steps after loading, on the CPU: weights and AdamW moments as the
libraries hand them over (views of the file, mapped copy-on-write) against nftune's own copy.

    python benchmarks/first_step_after_load.py [--arch qwen2.5-0.5b] [--tokens 1024]

Two cases, each in a fresh process per variant: ``fresh`` loads the base model as a new run
does; ``resume`` loads a checkpoint written by nftune (weights and AdamW's moments, after one
step). Each times two full update steps (forward, backward, clip, fused AdamW) on the same
random tokens and prints wall time, the process's system CPU time and its resident memory
split into anonymous and file-backed. ``mapped`` skips :func:`nftune.policy.own_cpu_weights` and
:func:`~nftune.policy.own_cpu_optimizer_state`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss_gib() -> dict[str, float]:
    """RssAnon and RssFile of this process, GiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 2**20
    return fields


def measure(args) -> dict:
    """One case, one variant, in this process; returns its figures."""
    import torch

    import nftune.policy as policy
    from nftune.checkpoint import load_state
    from nftune.config import TrainConfig

    torch.manual_seed(0)
    if args.variant == "mapped":
        policy.own_cpu_weights = policy.own_cpu_optimizer_state = lambda _: None
    work = Path(args.work)
    cfg = TrainConfig(model=str(work / "base"), lr=1e-5, device="cpu")
    checkpoint = work / "checkpoint" if args.case == "resume" else None
    started = time.perf_counter()
    model, _ = policy.build_policy(cfg, torch.device("cpu"), checkpoint)
    optimizer = policy.make_optimizer(model, cfg)
    if checkpoint is not None:
        optimizer.load_state_dict(load_state(checkpoint)["optimizer"])
        policy.own_cpu_optimizer_state(optimizer)  # as the trainer's resume does
    row = {"case": args.case, "variant": args.variant,
           "load_s": time.perf_counter() - started, "after_load": rss_gib()}
    ids = torch.randint(3, model.config.vocab_size, (args.tokens // 256, 256))
    for step in (1, 2):
        system = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row[f"step{step}_s"] = time.perf_counter() - started
        row[f"step{step}_sys_s"] = resource.getrusage(resource.RUSAGE_SELF).ru_stime - system
    row["after_steps"] = rss_gib()
    return row


def prepare(args) -> None:
    """The base model and a checkpoint one AdamW step on (nftune's save_checkpoint)."""
    import torch

    from nftune.checkpoint import save_checkpoint
    from nftune.config import TrainConfig
    from nftune.policy import build_policy, make_optimizer

    sys.path.insert(0, str(HERE))
    from rollout_engines import build_model_dir

    work = Path(args.work)
    if not (work / "base" / "config.json").exists():
        build_model_dir(args.arch, str(work / "base"), "float32")
    if (work / "checkpoint").exists():
        return
    cfg = TrainConfig(model=str(work / "base"), lr=1e-5, device="cpu")
    model, tokenizer = build_policy(cfg, torch.device("cpu"))
    optimizer = make_optimizer(model, cfg)
    ids = torch.randint(3, model.config.vocab_size, (1, 256))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    save_checkpoint(work / "checkpoint", model, tokenizer, {"optimizer": optimizer.state_dict()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2.5-0.5b")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per update step")
    parser.add_argument("--work", default="/tmp/nftune-first-step",
                        help="where the model and the checkpoint are written (~8 GB at 0.5B)")
    parser.add_argument("--case", choices=("fresh", "resume"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("mapped", "owned"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args)))
        return
    prepare(args)
    print(f"{args.arch}, {args.tokens} tokens per step, fp32, CPU "
          f"({__import__('os').cpu_count()} cores); GiB anon + file-backed")
    for case in ("fresh", "resume"):
        rows = {}
        for variant in ("mapped", "owned"):
            out = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--case", case, "--variant", variant],
                check=True, capture_output=True, text=True).stdout
            rows[variant] = row = json.loads(out.splitlines()[-1])
            load, steps = row["after_load"], row["after_steps"]
            print(f"  {case:6} {variant:6}  load {row['load_s']:5.1f} s  "
                  f"step 1 {row['step1_s']:6.1f} s (sys {row['step1_sys_s']:5.1f})  "
                  f"step 2 {row['step2_s']:6.1f} s (sys {row['step2_sys_s']:5.1f})  "
                  f"after load {load['RssAnon']:.2f} + {load['RssFile']:.2f}  "
                  f"after steps {steps['RssAnon']:.2f} + {steps['RssFile']:.2f}")
        mapped, owned = rows["mapped"], rows["owned"]
        both = [row["load_s"] + row["step1_s"] for row in (mapped, owned)]
        print(f"  {case}: first step mapped / owned {mapped['step1_s'] / owned['step1_s']:.2f}x; "
              f"load + first step {both[0] / both[1]:.2f}x; "
              f"step 1 / step 2: mapped {mapped['step1_s'] / mapped['step2_s']:.2f}x, "
              f"owned {owned['step1_s'] / owned['step2_s']:.2f}x")


if __name__ == "__main__":
    main()
