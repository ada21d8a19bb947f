"""One node, 1 rank against 2 (torchrun, one thread each, gloo on CPU): answers a second and the
share of a step spent in communication, on the same global batch.

    python benchmarks/scaling.py [--steps 5] [--prompts 32 --k 8 --new-tokens 48]
                                 [--micro-batch-tokens 16384]

Each run is ``torchrun --nproc-per-node R -m nftune train`` on the demo's base model and the
arithmetic questions (the benchmarks' workload); figures are means over the steps after the
first (warm-up). The gradient's all-reduce is timed alone at the model's size on the same
backend and counted once per optimizer step: its share of the 2-rank step is the
communication share (the per-round counts all-reduced by dynamic sampling are a few floats).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from workload import add_workload_args, base_model, questions  # noqa: E402

ALLREDUCE = """
import sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
numel, repeats = int(sys.argv[1]), int(sys.argv[2])
grad = torch.randn(numel)
dist.all_reduce(grad)
start = time.perf_counter()
for _ in range(repeats):
    dist.all_reduce(grad)
if dist.get_rank() == 0:
    print((time.perf_counter() - start) / repeats)
dist.destroy_process_group()
"""


def torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={ranks}"]


def environment() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_training(ranks: int, strategy: str, args: argparse.Namespace, data: Path, out: Path
                 ) -> dict[str, float]:
    command = [*torchrun(ranks), "-m", "nftune", "train", "--model",
               str(base_model(args.cache)), "--train-data", str(data), "--template", "raw",
               "--algo", "nft", "--steps", str(args.steps), "--prompts-per-step",
               str(args.prompts), "--answers-per-prompt", str(args.k), "--max-new-tokens",
               str(args.new_tokens), "--minibatches", str(args.minibatches), "--lr", "1e-6",
               "--warmup-steps", "0", "--save-every", "0", "--verify-workers", "1",
               "--gen-batch-size", str(args.prompts * args.k), "--device", "cpu",
               "--micro-batch-tokens", str(args.micro_batch_tokens),
               "--distributed-strategy", strategy, "--no-progress", "--output-dir", str(out)]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{ranks} rank(s), {strategy}: failed\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    return {"answers_per_s": sum(r["generated_answers"] for r in rows)
            / sum(r["time_step_s"] for r in rows),
            "time_step_s": mean("time_step_s"), "time_generate_s": mean("time_generate_s"),
            "time_update_s": mean("time_update_s"),
            "optimizer_steps": mean("optimizer_steps")}


def allreduce_seconds(numel: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(ALLREDUCE)
    done = subprocess.run([*torchrun(2), script.name, str(numel), "20"], env=environment(),
                          capture_output=True, text=True, check=True)
    os.unlink(script.name)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(parser)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    args = parser.parse_args()
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps(q.__dict__) + "\n" for q in questions()))
        with safe_open(str(base_model(args.cache) / "model.safetensors"), "pt") as weights:
            numel = sum(_product(weights.get_slice(k).get_shape()) for k in weights.keys())
        results = {(1, "ddp"): run_training(1, "ddp", args, data, work / "one"),
                   (2, "ddp"): run_training(2, "ddp", args, data, work / "ddp"),
                   (2, "fsdp"): run_training(2, "fsdp", args, data, work / "fsdp")}
        reduce_s = allreduce_seconds(numel)
    print(f"workload: {args.prompts} questions x {args.k} answers, {args.new_tokens} new "
          f"tokens, {args.minibatches} mini-batches, micro-batches of "
          f"{args.micro_batch_tokens} tokens; demo base ({numel:,} parameters); CPU, "
          "one thread a rank, gloo")
    one = results[(1, "ddp")]
    print("| ranks | strategy | answers/s | vs 1 rank | step s | generate s | update s |")
    print("|---|---|---|---|---|---|---|")
    for (ranks, strategy), r in results.items():
        print(f"| {ranks} | {strategy if ranks > 1 else '-'} | {r['answers_per_s']:.1f} | "
              f"{r['answers_per_s'] / one['answers_per_s']:.2f}x | {r['time_step_s']:.2f} | "
              f"{r['time_generate_s']:.2f} | {r['time_update_s']:.2f} |")
    two = results[(2, "ddp")]
    comm = reduce_s * two["optimizer_steps"]
    print(f"gradient all-reduce ({numel * 4 / 2**20:.1f} MiB fp32, 2 ranks): {reduce_s * 1e3:.2f} "
          f"ms; x {two['optimizer_steps']:.1f} optimizer steps = {comm:.3f} s of a "
          f"{two['time_step_s']:.2f} s step: communication share {comm / two['time_step_s']:.1%} "
          "(DDP)")


def _product(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


if __name__ == "__main__":
    main()
