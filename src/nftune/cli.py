"""The `nftune` command line: one sub-command per job, each a thin call into the library."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2 (no traceback)."""


def cmd_objectives(args: argparse.Namespace) -> int:
    """Print each objective's loss and per-answer gradient on one toy group of K answers."""
    import torch

    from nftune.objectives import OBJECTIVES, compute_loss

    if args.k < 2:
        raise UserError(f"--k: a group needs at least 2 answers, got {args.k}")
    if not 0 < args.r_hat < 1:
        raise UserError(f"--r-hat: must be in (0, 1), got {args.r_hat}")
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
            loss, _ = compute_loss(algo, lp, old, mask, correct, r_hat,
                                   group_ids=torch.zeros(k, dtype=torch.long))
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


def cmd_push(args: argparse.Namespace) -> int:
    """A run's final/ (with its model card) to a hub repository."""
    from nftune.hub import PushError, push

    try:
        url = push(args.run_dir, args.repo_id, adapter=args.adapter, private=args.private,
                   revision=args.revision, commit_message=args.message)
    except PushError as err:
        raise UserError(str(err)) from None
    print(f"pushed {args.run_dir} to {url}")
    return 0


def cmd_verl_data(args: argparse.Namespace) -> int:
    """verl's train/val parquet files from nftune's loaders (with nftune's cleaning)."""
    from nftune.integrations.verl_data import prepare_verl_data

    val = [v.strip() for v in args.val.split(",") if v.strip()] if args.val else []
    result = prepare_verl_data(args.train, val, args.output_dir, template=args.template,
                               val_template=args.val_template, data_dir=args.data_dir,
                               train_limit=args.train_limit, if_changed=args.if_changed)
    if result.get("up_to_date"):
        print(f"{result['output_dir']}: up to date (written with these options)")
        return 0
    print(f"train: {result['train']['rows']} questions from {result['train']['origin']} "
          f"-> {result['train']['file']}")
    if "val" in result:
        print(f"val: {result['val']['rows']} questions ({', '.join(val)}) -> "
              f"{result['val']['file']}")
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
    args.output_dir = cfg.output_dir  # for the interrupt message
    final = train(cfg, resume=args.resume, progress=not args.no_progress,
                  allow_changes=args.allow_changes, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        print(f"done: final model in {final}")
    return 0


def cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    """The fit check of a run, before anything loads; exit 1 if it does not fit."""
    from nftune.config import build_config, parse_overrides
    from nftune.plan import parse_memory, plan_for_config

    overrides = parse_overrides(extra)
    if args.model is not None:
        overrides["model"] = args.model
    cfg = build_config(args.config, overrides)
    memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
    plan = plan_for_config(cfg, memory, ranks=args.ranks)
    print(plan.report())
    return 0 if plan.fits else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default: a tiny model taught arithmetic, improved online on CPU."""
    from nftune.demo import run_demo

    summary = run_demo(algo=args.algo, steps=args.steps, quick=args.quick, seed=args.seed,
                       output_dir=args.output_dir, cache_dir=args.cache_dir,
                       rebuild=args.rebuild, level=args.level, progress=not args.no_progress,
                       task=args.task)
    if args.quick and summary["after"]["sampled"] < summary["before"]["sampled"] - 0.10:
        print("quick demo: held-out accuracy collapsed", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """The paper's benchmark table for a model, or for precomputed responses."""
    import os
    import time
    from pathlib import Path

    from nftune.evaluate import (
        EXTRACTION,
        PAPER_BENCHMARKS,
        PROTOCOLS,
        check_output,
        evaluate_model,
        format_table,
        grade_responses,
        paper_temperature,
        versions,
        write_eval_outputs,
    )
    from nftune.sampling import EVAL_MAX_NEW_TOKENS
    from nftune.verify import Verifier

    run = None
    if args.config:  # a training run's config: its cleaning, template and answer budget
        from nftune.config import build_config

        if args.responses:
            raise UserError("--config is for --model (a run's model generating as it trained)")
        run = build_config(args.config)
        if not args.model:
            final = Path(args.config).parent / "final"
            if not final.is_dir():
                raise UserError(f"{final}: no final model beside {args.config}; give --model")
            args.model = str(final)
        args.template = args.template or run.template
        args.max_new_tokens = args.max_new_tokens or run.eval_max_new_tokens or \
            run.max_new_tokens
        args.data_dir = args.data_dir or run.data_dir
    args.max_new_tokens = args.max_new_tokens or EVAL_MAX_NEW_TOKENS
    if bool(args.model) == bool(args.responses):
        raise UserError("give exactly one of --model or --responses")
    chosen = [n.strip() for n in args.benchmarks.split(",")] if args.benchmarks else None
    output = Path(args.output or "eval_results")
    check_output(output)
    data_dir = args.data_dir or os.environ.get("NFTUNE_DATA_DIR")
    started = time.perf_counter()
    with Verifier(workers=args.verify_workers) as verifier:
        if args.responses:
            results, strategy = grade_responses(Path(args.responses), chosen, verifier,
                                                args.template, data_dir)
            title = Path(args.responses).stem
            print(f"answer extraction: {strategy} ({EXTRACTION[strategy]})")
        else:
            protocol_temperature = paper_temperature(args.model)
            if args.temperature is None:
                args.temperature = protocol_temperature
            results = evaluate_model(
                args.model, chosen or list(PAPER_BENCHMARKS), verifier, device=args.device,
                seed=args.seed, k=args.k, temperature=args.temperature, top_p=args.top_p,
                max_new_tokens=args.max_new_tokens, template=args.template,
                batch_size=args.batch_size, limit=args.limit, data_dir=data_dir,
                engine_name=args.engine, dtype=args.dtype,
                gpu_memory_utilization=args.gpu_memory_utilization,
                progress=not args.no_progress, clean=run is not None)
            title = args.model
    if args.model:
        overrides = [f"--{name.replace('_', '-')} {value}" for name, value, default in (
            ("template", args.template, None), ("samples", args.k, None),
            ("temperature", args.temperature, protocol_temperature),
            ("top_p", args.top_p, 0.7),
            ("max_new_tokens", args.max_new_tokens, EVAL_MAX_NEW_TOKENS)) if value != default]
        if run is not None:
            overrides.insert(0, f"--config {args.config} (sets cleaned as in training)")
        settings = {"protocol": args.protocol, "overrides": overrides, "model": title,
                    "engine": args.engine,
                    "dtype": args.dtype or ("float32" if args.engine == "hf" else "the model's"),
                    "temperature": args.temperature, "top_p": args.top_p,
                    "max_new_tokens": args.max_new_tokens,
                    "template": args.template or "per set",
                    "k": args.k or "per set (32 for AIME/AMC, 1 otherwise)",
                    "versions": versions()}
        print(f"protocol: {args.protocol} ({PROTOCOLS[args.protocol]})"
              + (f"; changed: {', '.join(overrides)}" if overrides else ""))
    else:  # precomputed responses: generated under someone else's settings
        settings = {"graded": args.responses, "template": args.template or "either form",
                    "versions": versions()}
    print(format_table(results, title))
    answers = sum(r.questions * r.k for r in results)
    verify_s = sum(r.verify_s for r in results)
    generate_s = sum(r.generate_s for r in results)
    tokens = sum(r.response_tokens for r in results)
    print(f"\ngrading: {answers} answers in {verify_s:.2f} s "
          f"({answers / max(verify_s, 1e-9):,.0f}/s)")
    if generate_s:
        print(f"generation: {answers} answers, {tokens} tokens in {generate_s:.1f} s "
              f"({answers / generate_s:,.1f} answers/s, {tokens / generate_s:,.0f} tokens/s)")
    json_path, md_path = write_eval_outputs(results, output, title, settings)
    print(f"per-item results: {json_path} and {md_path} "
          f"({time.perf_counter() - started:.0f} s in all)")
    return 0


def cmd_compare(args: argparse.Namespace, extra: list[str]) -> int:
    """Algorithms × seeds (or an ablation sweep) through the same trainer, one report."""
    from pathlib import Path

    import yaml

    from nftune.compare import (
        build_report,
        check_algos,
        check_output_dir,
        demo_base_config,
        run_comparison,
    )
    from nftune.config import parse_overrides

    algos = [a.strip() for a in args.algos.split(",")]
    overrides = parse_overrides(extra)
    path = Path(args.config) if args.config else None
    shared = (yaml.safe_load(path.read_text()) or {}) if path and path.is_file() else {}
    # the plugins first: an objective they register is a valid --algos name
    check_algos(algos, {**shared, **overrides}.get("plugins", ""))
    if args.report:
        result = build_report(args.report)
        print((Path(args.report) / "results.md").read_text())
        return 0 if result["summary"] else 1
    out = Path(args.output_dir)
    check_output_dir(out, args.resume)  # before the demo's splits are written there
    final_eval: dict = {}
    if path:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        base = shared
    else:
        base, final_eval, _ = demo_base_config(args.quick, args.cache_dir, out, args.task)
    base.update(overrides)
    if not base.get("eval_data") or not int(base.get("eval_every") or 0):  # before evaluating
        raise UserError("compare needs held-out evaluation: set eval_data and eval_every")
    sweep = None
    if args.sweep:
        key, _, values = args.sweep.partition("=")
        if not values:
            raise UserError("--sweep: expected KEY=V1,V2,...")
        sweep = (key.replace("-", "_"), [v.strip() for v in values.split(",")])
    seeds = list(range(args.seeds))
    run_comparison(base, algos, seeds, str(out), sweep, progress=not args.no_progress,
                   final_eval=final_eval, resume=args.resume)
    print((out / "results.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nftune import __version__
    from nftune.config import ENGINES  # light: no torch
    from nftune.sampling import EVAL_MAX_NEW_TOKENS

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
    p.add_argument("--task", default="arithmetic", choices=("arithmetic", "countdown"),
                   help="arithmetic (graded by the math verifier, default) or countdown "
                        "(reach a target with given numbers; graded by its own checker)")
    p.add_argument("--steps", type=int, default=None, help="rollout steps (default 80)")
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
        "compare", help="algorithms × seeds (and ablations) through one trainer, one report",
        description="Defaults to the demo's task, base model and settings; --config FILE "
                    "compares on your own model and data. Extra --key value pairs override "
                    "config fields for every run.")
    p.add_argument("--config", help="YAML of shared config fields (default: the demo's)")
    p.add_argument("--algos", default="nft,rft,grpo,dr_grpo,dapo,infonca")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per algorithm")
    p.add_argument("--sweep", default=None, help="ablation, e.g. eps=0.01,0.1,0.5,1.0 or "
                                                 "weight=one,dr_grpo,grpo")
    p.add_argument("--output-dir", default="runs/compare")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="only rebuild tables and plots from the finished runs in DIR")
    p.add_argument("--resume", action="store_true",
                   help="continue the comparison in --output-dir: finished runs are kept, "
                        "interrupted ones resume from their last checkpoint")
    p.add_argument("--task", default="arithmetic", choices=("arithmetic", "countdown"),
                   help="the demo task and its shipped base (without --config)")
    p.add_argument("--quick", action="store_true", help="the quick demo's smaller settings")
    p.add_argument("--cache-dir", default=None, help="demo base-model cache")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare, takes_extra=True)

    p = sub.add_parser(
        "plan", help="will a run fit? memory by component, verdict, what to change",
        description="Reads the model's config.json (a local directory, or a known Qwen2.5 / "
                    "Qwen2.5-Math / Llama 3 hub id offline) and the run's config (--config and "
                    "--key value, as nftune train takes them); nothing loads. Exit 0: fits, 1: "
                    "does not.")
    p.add_argument("--config", help="the run's YAML config")
    p.add_argument("--model", default=None, help="model directory or known hub id")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="plan for a CUDA card of this memory (e.g. 80GB, 24GB, 79.6GiB) "
                        "instead of this machine's device")
    p.add_argument("--ranks", type=int, default=1, metavar="N",
                   help="one device of a torchrun over N (with --distributed-strategy fsdp the "
                        "full fine-tune is sharded N ways; ddp holds it whole on each)")
    p.set_defaults(func=cmd_plan, takes_extra=True)

    p = sub.add_parser("eval", help="the paper's benchmark table (avg@k, pass@k)")
    p.add_argument("--model", help="HF model directory or hub id to generate with")
    p.add_argument("--responses", help="grade precomputed responses instead (JSONL rows "
                                       "{benchmark, id, response | responses})")
    p.add_argument("--benchmarks", default=None,
                   help="comma-separated sets (default: the paper's six)")
    p.add_argument("--data-dir", default=None,
                   help="directory of <name>.jsonl sets (default $NFTUNE_DATA_DIR, else hub)")
    p.add_argument("--samples", "--k", dest="k", type=int, default=None,
                   help="samples per question, n (default 32 for AIME24/25, AMC23; 1 otherwise "
                        "and when greedy); avg@n and pass@k for every k <= n are reported")
    p.add_argument("--temperature", type=float, default=None,
                   help="default: the protocol's (nft-paper: 1.0 below 20 B parameters, 0.6 "
                        "from there, as the paper's 7B and 32B models); 0 is greedy")
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"answer length limit (default {EVAL_MAX_NEW_TOKENS:,}; with --config "
                        "the run's), cut where prompt and answer would pass the model's "
                        "context (max_position_embeddings)")
    p.add_argument("--template", default=None,
                   help="prompt template (default: dapo for AIME/AMC, boxed otherwise; with "
                        "--config the run's); with --responses it picks the answer extraction "
                        "(default: either form)")
    p.add_argument("--config", default=None,
                   help="a training run's config.yaml: generate as the run did (its template, "
                        "answer budget, data_dir, sets cleaned as in training; default --model "
                        "the final/ beside it), e.g. to see what it writes on its training set")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each set")
    p.add_argument("--batch-size", type=int, default=64, help="answers per generate call")
    p.add_argument("--engine", default="hf", choices=sorted(ENGINES),
                   help="generation engine: hf (Hugging Face generate) or vllm (the vllm extra)")
    p.add_argument("--device", default="auto")
    p.add_argument("--protocol", default="nft-paper", choices=("nft-paper",),
                   help="the evaluation protocol whose defaults apply (printed with the table "
                        "and recorded in the output, with every option changed from it)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it shows answers/s and the time left)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="the model's compute dtype (default: float32 with hf; vllm: the dtype "
                        "the model's config declares)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vllm: the share of the GPU for vLLM's weights and KV cache (default "
                        "0.9, vLLM's own: nothing else runs beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify-workers", type=int, default=None)
    p.add_argument("--output", default=None,
                   help="output path stem for .json and .md (default eval_results)")
    p.set_defaults(func=cmd_eval)

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
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in the output dir")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: accept changes to keys that are safe to change "
                        "(steps, save_every, eval settings, device, ...)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output dir that holds a run (deletes its metrics, "
                        "checkpoints and final/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train, takes_extra=True)

    p = sub.add_parser(
        "push", help="upload a run's final model and its card to the Hugging Face hub",
        description="Uploads RUN_DIR/final (a LoRA run: the merged model) with its model card "
                    "as one commit; the repository is created if missing. Needs a token "
                    "(`hf auth login` or HF_TOKEN) and the hub reachable.")
    p.add_argument("run_dir", help="run directory (or its final/)")
    p.add_argument("repo_id", help="hub repository, e.g. user/qwen-nft")
    p.add_argument("--adapter", action="store_true",
                   help="a LoRA run: push the adapter (final/adapter) instead of the merged "
                        "model")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(func=cmd_push)

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

    p = sub.add_parser("verl-data", help="write verl's train/val parquet from nftune's loaders")
    p.add_argument("--train", default="dapo17k", help="training set (default dapo17k)")
    p.add_argument("--val", default="aime24", help="comma-separated validation sets "
                                                    "(default aime24; empty for none)")
    p.add_argument("--template", default="boxed",
                   help="prompt template: boxed | dapo | raw (default boxed: what Qwen2.5-Math's "
                        "chat template asks for, and the recipe's)")
    p.add_argument("--val-template", default=None,
                   help="validation template (default: the training template)")
    p.add_argument("--output-dir", default="data/verl")
    p.add_argument("--data-dir", default=None,
                   help="directory holding <name>.jsonl files (default: $NFTUNE_DATA_DIR; "
                        "else the hub)")
    p.add_argument("--train-limit", type=int, default=None, help="first N questions only")
    p.add_argument("--if-changed", action="store_true",
                   help="write only if the output directory's files were written with other "
                        "options (its stamp, nftune_verl_data.json, differs)")
    p.set_defaults(func=cmd_verl_data)
    return parser


def _resume_hint(args: argparse.Namespace) -> str:
    """After Ctrl-C: where the run stands and how to go on (one line)."""
    if args.command != "train" or not getattr(args, "output_dir", None):
        return ""
    from pathlib import Path

    from nftune.checkpoint import MANIFEST, step_checkpoints

    out = Path(args.output_dir)
    steps = [(n, p) for n, p in step_checkpoints(out) if (p / MANIFEST).exists()]
    if not steps:
        return f"No checkpoint was written yet in {out}."
    return (f"Last checkpoint: {steps[-1][1]} (step {steps[-1][0]}); continue with: "
            f"nftune train --config {out / 'config.yaml'} --resume")


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
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"nftune {args.command}: interrupted. {_resume_hint(args)}", file=sys.stderr)
        return 130
    except (UserError, OSError, ValueError, ImportError) as err:
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
