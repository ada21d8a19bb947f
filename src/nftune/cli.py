"""The `nftune` command line: one sub-command per job, each a thin call into the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2 (no traceback)."""


def cmd_objectives(args: argparse.Namespace) -> int:
    """Print each objective's loss and per-answer gradient on one toy group of K answers."""
    import torch

    from nftune.objectives import OBJECTIVES, compute_loss

    k, t = args.k, 4
    n_correct = max(1, min(k - 1, round(args.r_hat * k)))
    correct = torch.tensor([1.0] * n_correct + [0.0] * (k - n_correct), dtype=torch.float64)
    r_hat = torch.full((k,), n_correct / k, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(k, t, generator=g, dtype=torch.float64)
    mask = torch.ones(k, t, dtype=torch.float64)
    print(f"one group: K={k} answers, {n_correct} correct (r_hat={n_correct / k:.3f}), "
          f"{t} tokens each; gradient of the loss w.r.t. each answer's log-likelihood")
    print(f"{'objective':<10} {'state':<11} {'loss':>9} {'d/dlogp correct':>16} "
          f"{'d/dlogp wrong':>14}")
    shifted = old + args.shift * torch.randn(k, t, generator=g, dtype=torch.float64)
    for algo in OBJECTIVES:
        for state, current in (("on-policy", old), ("off-policy", shifted)):
            lp = current.clone().requires_grad_(True)
            kw = {"group_ids": torch.zeros(k, dtype=torch.long)} if algo == "infonca" else {}
            loss, _ = compute_loss(algo, lp, old, mask, correct, r_hat, **kw)
            loss.backward()
            per_answer = lp.grad.sum(1)
            print(f"{algo:<10} {state:<11} {loss.item():>9.4f} {per_answer[0].item():>16.4f} "
                  f"{per_answer[-1].item():>14.4f}")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    """Counts, the cleaning report and three sample prompts of a question set."""
    import random

    from nftune.data import format_prompt, load_questions, summary

    qs = load_questions(args.name, data_dir=args.data_dir)
    for key, value in summary(qs).items():
        print(f"{key}: {value}")
    print("cleaning:")
    for line in qs.report.lines():
        print(f"  {line}")
    rng = random.Random(args.seed)
    for q in rng.sample(qs.questions, min(3, len(qs))):
        print(f"\n--- id {q.id} (answer: {q.answer}) ---")
        print(format_prompt(q.problem, args.template))
    return 0


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    """Algorithm 1 on the configured model and data."""
    from nftune.config import build_config, parse_overrides
    from nftune.train import train

    overrides = parse_overrides(extra)
    for key in ("model", "train_data", "algo", "steps", "output_dir", "seed"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    cfg = build_config(args.config, overrides)
    final = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"done: final model in {final}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default: a tiny model taught arithmetic, improved online on CPU."""
    from nftune.demo import run_demo

    summary = run_demo(algo=args.algo, steps=args.steps, quick=args.quick, seed=args.seed,
                       output_dir=args.output_dir, cache_dir=args.cache_dir,
                       rebuild=args.rebuild, level=args.level, progress=not args.no_progress)
    if args.quick and summary["after"]["sampled"] < summary["before"]["sampled"] - 0.10:
        print("quick demo: held-out accuracy collapsed", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nftune import __version__

    parser = argparse.ArgumentParser(
        prog="nftune",
        description="Verifier-driven online fine-tuning: NFT, RFT, GRPO, Dr.GRPO, DAPO, InfoNCA.",
    )
    parser.add_argument("--version", action="version", version=f"nftune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("objectives", help="show the six objectives on a toy group of answers")
    p.add_argument("--k", type=int, default=8, help="answers in the group (default 8)")
    p.add_argument("--r-hat", type=float, default=0.25, help="group accuracy (default 0.25)")
    p.add_argument("--shift", type=float, default=0.3,
                   help="std of the log-prob perturbation for the off-policy row (default 0.3)")
    p.set_defaults(func=cmd_objectives)

    p = sub.add_parser("demo", help="tiny model + arithmetic: NFT on CPU in minutes")
    p.add_argument("--algo", default="nft", help="objective (default nft)")
    p.add_argument("--steps", type=int, default=None, help="rollout steps (default 40)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: smaller model and run, under 2 minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", type=int, default=None, help="task difficulty 1-5 (default 2)")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--cache-dir", default=None,
                   help="where base models are cached (default ~/.cache/nftune/demo-base)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached base model")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "train", help="online fine-tuning (Algorithm 1) with any of the six objectives",
        description="Online fine-tuning. Every config field can be given as --key value "
                    "(see docs/config.md); unknown keys are errors.")
    p.add_argument("--config", help="YAML file of config fields")
    p.add_argument("--model", help="HF model directory or hub id")
    p.add_argument("--train-data", dest="train_data", help="question set name or path")
    p.add_argument("--algo", help="nft | rft | grpo | dr_grpo | dapo | infonca")
    p.add_argument("--steps", help="rollout steps")
    p.add_argument("--output-dir", dest="output_dir", help="run directory")
    p.add_argument("--seed", help="seed")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train, takes_extra=True)

    data = sub.add_parser("data", help="inspect question sets").add_subparsers(
        dest="data_command", metavar="ACTION", required=True)
    p = data.add_parser("inspect", help="counts, cleaning report and sample prompts")
    p.add_argument("name", help="known set name, local .jsonl/.json/.parquet file, or hub id")
    p.add_argument("--data-dir", default=None,
                   help="directory holding <name>.jsonl files for known names "
                        "(default: $NFTUNE_DATA_DIR; else the hub)")
    p.add_argument("--template", default="dapo", help="prompt template for the samples")
    p.add_argument("--seed", type=int, default=0, help="which samples to show")
    p.set_defaults(func=cmd_data_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:  # accepted after the sub-command too
        extra.remove("--debug")
        args.debug = True
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "takes_extra", False):
            return int(args.func(args, extra) or 0)
        return int(args.func(args) or 0)
    except (UserError, OSError, ValueError) as err:
        if args.debug:
            raise
        print(f"nftune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 — e.g. TrainingError: one line unless --debug
        if args.debug:
            raise
        print(f"nftune {args.command}: {type(err).__name__}: {err} (run with --debug for "
              "the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
