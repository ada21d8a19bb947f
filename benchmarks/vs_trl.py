"""nftune's trainer against TRL's GRPOTrainer on the same paper-shaped workload, in one run.

Usage: python benchmarks/vs_trl.py [--prompts 32] [--k 8] [--new-tokens 48] [--minibatches 4]
                                   [--rollouts 4] [--repeats 3] [--device cpu|cuda]
                                   [--checkpointing defaults|on|off] [--logprobs hidden|logits]
                                   [--shapes 4,1]

Workload: one rollout of P questions × K answers (at most `--new-tokens` tokens), then M
mini-batch optimizer steps on it; repeated `--rollouts` times. Both trainers run the GRPO
objective with DAPO's clip-higher (0.2 / 0.28), token-level loss, no KL (β = 0), temperature 1,
no top-k, the same model (the demo's base model: a tiny Qwen2 that answers the arithmetic task
some of the time), the same questions and nftune's verifier as the reward. TRL:
`per_device_train_batch_size = P·K/M`, `steps_per_generation = M`, `num_generations = K`.
nftune runs with its defaults (old log-probs recorded during generation) and once more with
`old_logprobs: recompute`. The floor samples the same questions with the same seeds as nftune,
so both generate the same answers. Each measurement runs in its own process (peak RSS is that
process's); runs alternate nftune / nftune-recompute / TRL / floor and the median of the
repeats is reported, plus the on-policy shape M = 1. The compute floor is generate + one
no-grad forward + M forward/backward passes (one per mini-batch, each trimmed to its own
longest answer) over the same questions, with no verification or bookkeeping; nftune's overhead
is measured against it. Each figure is given twice: over all rollouts, and over rollouts 2..N —
the first pays one-off warm-up (on a GPU: CUDA context, cuBLAS handles, kernel selection), so
the second is the steady-state rate.

Gradient checkpointing: ``--checkpointing defaults`` runs each trainer with its own default
(nftune's ``auto``, TRL's ``True``), ``on``/``off`` sets both alike; the header prints what
each ran with. The floor never recomputes activations. ``--logprobs logits`` takes nftune's
(and the floor's) log-probs from the logits instead of the hidden states, as before issue 20.
The floor is also given without its no-grad π_old forward, timed apart in the same process: a
trainer that records π_old's log-probs while sampling (nftune's default) skips that pass.

Needs `pip install -e ".[bench]"` (trl is a benchmark-only dependency).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workload import add_workload_args, base_model, device_name, questions, workload_config


def checkpointing_overrides(args) -> dict:
    return {} if args.checkpointing == "defaults" else {
        "gradient_checkpointing": args.checkpointing == "on"}


def run_nftune(args, workdir: Path, old_logprobs: str) -> dict:
    from nftune.policy import uses_gradient_checkpointing
    from nftune.train import train

    cfg = workload_config(args, workdir, steps=args.rollouts, save_every=0,
                          old_logprobs=old_logprobs, device=args.device,
                          **checkpointing_overrides(args))
    start = time.perf_counter()
    train(cfg, progress=False)
    whole = time.perf_counter() - start
    rows = [json.loads(x) for x in (workdir / "nftune" / "metrics.jsonl").read_text().split("\n")
            if x]
    phases = {k: sum(r[k] for r in rows) for k in ("time_generate_s", "time_verify_s",
                                                    "time_update_s")}
    # the training loop's own wall time, like TRL's trainer.train(): model loading, verifier
    # start-up and the final checkpoint (outside TRL's timer too) are reported apart
    seconds = sum(r["time_step_s"] for r in rows)
    return {"seconds": seconds, "steady_seconds": seconds - rows[0]["time_step_s"],
            "mean_length": statistics.mean(r["response_length"] for r in rows),
            "phases": phases, "setup_and_save_s": whole - seconds,
            "checkpointing": uses_gradient_checkpointing(cfg)}


def run_trl(args, model_dir: Path, workdir: Path) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nftune.verify import Verifier

    verifier = Verifier(workers=2, strategy="auto")
    verifier.start_in_background()  # as nftune's trainer does

    def reward(completions, answer, **_):
        return [float(v) for v in verifier.verify(completions, answer)]

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    qs = questions()
    dataset = datasets.Dataset.from_list([{"prompt": q.problem, "answer": q.answer} for q in qs])
    per_step = args.prompts * args.k // args.minibatches
    config = GRPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=per_step,
        gradient_accumulation_steps=1, steps_per_generation=args.minibatches,
        num_generations=args.k, max_completion_length=args.new_tokens, temperature=1.0,
        top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
        learning_rate=1e-6, max_steps=args.rollouts * args.minibatches, num_iterations=1,
        report_to="none", save_strategy="no", logging_steps=1,  # logs carry answer lengths
        use_cpu=args.device == "cpu",
        bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        **checkpointing_overrides(args))
    marks: dict[str, float] = {}

    class FirstRolloutDone(TrainerCallback):
        """Time stamp at the end of the first rollout's M optimizer steps."""

        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step == args.minibatches:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                marks["first"] = time.perf_counter()

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config,
                          train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[FirstRolloutDone()])
    start = time.perf_counter()
    trainer.train()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    end = time.perf_counter()
    verifier.close()
    lengths = [x["completions/mean_length"] for x in trainer.state.log_history
               if "completions/mean_length" in x]
    return {"seconds": end - start, "steady_seconds": end - marks.get("first", start),
            "mean_length": statistics.mean(lengths) if lengths else float("nan"),
            "checkpointing": bool(trainer.args.gradient_checkpointing)}


def _trim(input_ids, attention_mask, response_mask, prompt_len: int):
    """Drop columns that are padding in every row (left of the prompts, right of the longest
    response): the least any trainer must feed the model for these answers."""
    lead = int((attention_mask[:, :prompt_len].sum(0) == 0).sum())
    end = prompt_len + max(1, int(response_mask.sum(1).max()))
    return (input_ids[:, lead:end], attention_mask[:, lead:end],
            response_mask[:, : end - prompt_len], prompt_len - lead)


def run_floor(args, model_dir: Path) -> dict:
    """generate + one no-grad forward + M forward/backward passes (one per mini-batch, each
    trimmed to its longest answer) — no verification, no bookkeeping."""
    import torch

    from nftune.data import PromptSampler, format_prompt
    from nftune.policy import load_policy
    from nftune.update import response_logprobs

    device = torch.device(args.device)
    model, tokenizer = load_policy(str(model_dir), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    qs = questions()
    eos = tokenizer.eos_token_id
    # the questions and sampling seeds nftune's trainer uses (seed 0, step r + 1), so both
    # generate the same answers and the comparison is not decided by answer lengths
    sampler = PromptSampler(len(qs), 0)
    lengths = []
    old_pass = [0.0] * args.rollouts  # seconds of the no-grad π_old forward, per rollout
    start = time.perf_counter()
    first_done = start
    for r in range(args.rollouts):
        if r == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_done = time.perf_counter()
        torch.manual_seed(r + 1)
        batch = [qs[i] for i in sampler.take(args.prompts)]
        prompts = [format_prompt(q.problem, "raw") for q in batch for _ in range(args.k)]
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left",
                        return_tensors="pt").to(device)
        width = enc["input_ids"].shape[1]
        model.eval()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)
            # response tokens up to and including the first EOS
            is_eos = (out[:, width:] == eos).long()
            response_mask = (is_eos.cumsum(1) - is_eos == 0).long()
            attn = torch.cat([enc["attention_mask"], response_mask], 1)
            lengths.append(response_mask.sum(1))
            ids, am, rm, plen = _trim(out, attn, response_mask, width)
            if device.type == "cuda":
                torch.cuda.synchronize()
            old_start = time.perf_counter()
            response_logprobs(model, ids, am, plen)
            if device.type == "cuda":
                torch.cuda.synchronize()
            old_pass[r] = time.perf_counter() - old_start
        model.train()
        for part in torch.arange(len(prompts)).tensor_split(args.minibatches):
            ids, am, rm, plen = _trim(out[part], attn[part], response_mask[part], width)
            lp, _ = response_logprobs(model, ids, am, plen)
            optimizer.zero_grad()
            ((lp * rm).sum() / rm.sum()).backward()
            optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    return {"seconds": end - start, "steady_seconds": end - first_done,
            "old_pass_seconds": sum(old_pass), "steady_old_pass_seconds": sum(old_pass[1:]),
            "mean_length": torch.cat(lengths).float().mean().item(), "checkpointing": False}


def worker(args) -> None:
    if args.logprobs == "logits":
        from nftune import update

        update.LOGPROBS_FROM_HIDDEN_STATES = False
    model = base_model(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        if args.worker == "trl":
            result = run_trl(args, model, Path(tmp))
        elif args.worker == "floor":
            result = run_floor(args, model)
        else:
            result = run_nftune(args, Path(tmp),
                                "recompute" if args.worker == "nftune-recompute" else "generate")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        import torch

        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result))


def measure(kind: str, args, minibatches: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--prompts", str(args.prompts), "--k",
           str(args.k), "--new-tokens", str(args.new_tokens), "--minibatches", str(minibatches),
           "--rollouts", str(args.rollouts), "--cache", args.cache, "--device", args.device,
           "--checkpointing", args.checkpointing, "--logprobs", args.logprobs]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(parser)
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (same for all three)")
    parser.add_argument("--checkpointing", default="defaults", choices=("defaults", "on", "off"),
                        help="gradient checkpointing: each trainer's default, or both on/off")
    parser.add_argument("--logprobs", default="hidden", choices=("hidden", "logits"),
                        help="nftune's and the floor's log-probs from hidden states or logits")
    parser.add_argument("--shapes", default=None,
                        help="mini-batch counts to run, comma-separated (default: M and 1)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.rollouts < 2:
        parser.error("--rollouts: at least 2 (the first rollout's warm-up is also reported apart)")
    base_model(args.cache)  # build once, outside the timings
    answers = args.prompts * args.k * args.rollouts
    print(f"workload: {args.rollouts} rollouts × {args.prompts} questions × {args.k} answers, "
          f"≤ {args.new_tokens} new tokens; device {device_name(args.device)}; log-probs from "
          f"{'hidden states' if args.logprobs == 'hidden' else 'logits'}")
    shapes = ([int(x) for x in args.shapes.split(",")] if args.shapes
              else [args.minibatches, 1])
    for m in shapes:
        kinds = ["nftune", "nftune-recompute", "trl", "floor"]
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                runs[kind].append(measure(kind, args, m))
        med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
        steady = {k: statistics.median(r["steady_seconds"] for r in v) for k, v in runs.items()}
        rss = {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()}
        gpu = {k: max(r.get("peak_gpu_mb", 0.0) for r in v) for k, v in runs.items()}
        later = answers - args.prompts * args.k  # answers of rollouts 2..N
        ckpt = {k: sorted({r["checkpointing"] for r in v}) for k, v in runs.items()}
        print(f"\nshape M = {m} mini-batch steps per rollout (median of {args.repeats}); "
              f"answers/s over all {args.rollouts} rollouts | over rollouts 2..{args.rollouts}")
        print("  gradient checkpointing (" + ("each trainer's default" if args.checkpointing
                                              == "defaults" else f"set {args.checkpointing}")
              + "): " + ", ".join(f"{k} {'/'.join('on' if c else 'off' for c in v)}"
                                  for k, v in ckpt.items()))
        for kind in kinds:
            print(f"  {kind:<17} {answers / med[kind]:7.1f} | {later / steady[kind]:7.1f} "
                  f"answers/s  ({med[kind]:6.1f} s, mean answer "
                  f"{statistics.mean(r['mean_length'] for r in runs[kind]):4.1f} tokens, "
                  f"peak RSS {rss[kind]:,.0f} MB"
                  + (f", peak GPU {gpu[kind]:,.0f} MB" if gpu[kind] else "") + ")")
        for label, t in (("all rollouts", med), (f"rollouts 2..{args.rollouts}", steady)):
            print(f"  {label}: nftune / TRL answers/s {t['trl'] / t['nftune']:.2f}x "
                  f"(old_logprobs recompute: {t['trl'] / t['nftune-recompute']:.2f}x); "
                  f"overhead over the compute floor {100 * (t['nftune'] / t['floor'] - 1):+.0f}% "
                  f"(recompute: {100 * (t['nftune-recompute'] / t['floor'] - 1):+.0f}%)")
        per_repeat = [trl["steady_seconds"] / ours["steady_seconds"]
                      for ours, trl in zip(runs["nftune"], runs["trl"], strict=True)]
        print(f"  rollouts 2..{args.rollouts}, each repeat: nftune / TRL answers/s "
              + ", ".join(f"{x:.2f}x" for x in per_repeat))
        floor_no_old = {
            "all rollouts": med["floor"] - statistics.median(
                r["old_pass_seconds"] for r in runs["floor"]),
            f"rollouts 2..{args.rollouts}": steady["floor"] - statistics.median(
                r["steady_old_pass_seconds"] for r in runs["floor"])}
        print("  floor without its π_old pass (what a trainer that records π_old's log-probs "
              "while sampling must do): " + "; ".join(
                  f"{label}: nftune overhead {100 * (t['nftune'] / floor_no_old[label] - 1):+.0f}%"
                  for label, t in (("all rollouts", med),
                                   (f"rollouts 2..{args.rollouts}", steady))))
        phases = runs["nftune"][0].get("phases", {})
        if phases:
            print("  nftune phases (first repeat): " + ", ".join(
                f"{k.removeprefix('time_').removesuffix('_s')} {v:.2f} s"
                for k, v in phases.items()) + f"; outside the loop (model load, verifier "
                f"start, final save) {runs['nftune'][0]['setup_and_save_s']:.1f} s")


if __name__ == "__main__":
    main()
