"""The GPU check: what the one-GPU path rests on, measured in one short window (≤ 7 minutes on
one H100, no internet, no vLLM, no TRL), each stage in its own process under its own time
limit, appending JSON lines to ``OUT/results.jsonl`` so that a cut loses only the tail.

Usage (a lent GPU machine, from the repository root; nftune need not be installed; the 3 GB
model and the trainer's run kept out of what comes back):
    python benchmarks/gpu_check.py --out $OUT/gpu_check --work /tmp/gpu_check
and on the CPU at a reduced shape (the test suite runs this, so the script cannot rot):
    python benchmarks/gpu_check.py --device cpu --small --out /tmp/gpu_check
and, to rehearse a real architecture on the CPU before a GPU window (~4.5 minutes, 11 GB):
    python benchmarks/gpu_check.py --device cpu --arch qwen2.5-0.5b --tokens 320 \\
        --new-tokens 16 --batches 8,16 --prompts 2 --largest-cap 640 --limit-scale 12 \\
        --out /tmp/gpu_check_05b

Stages, in priority order:
    env        versions; which of vllm, trl, flash_attn, liger_kernel, bitsandbytes import
    build      a Qwen2.5-1.5B-shaped model with random weights, bf16 safetensors (small: the
               demo's shape)
    update     the update at 16,384 tokens a micro-batch (small: 512), the second call timed
               (tokens/s, peak allocated and reserved) for fp32 + checkpointing, bf16 autocast +
               checkpointing and LoRA r16 on a bf16 base, each against a plain forward +
               backward + AdamW floor on the same tokens and against the fit check's memory
               model
    generate   Hugging Face generation at 512 new tokens (small: 16), 64 and 256 answers a call,
               π_old's log-probs recorded or not, as the trainer samples (fp32 weights, bf16
               autocast on CUDA); then the evaluation's bf16 weights at 256
    trainer    a 3-step Trainer run at that shape, reward from a file, leaving final/
    numerics   recorded vs recomputed log-probs (each in fp32, each under bf16 autocast), bf16
               vs fp32 log-probs of the same answers, the same update twice: bitwise?
    largest    the largest micro-batch that fits, measured near the memory model's figure
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))  # nftune from this checkout, installed or not

# seconds per stage, 410 in all. Expected on one H100 (an estimate: `generate` bound by kernel
# launches at ~30 ms a decode step for 28 layers; not yet measured): build ~15 s (weights drawn on
# the card), update ~50 s (three configurations, four steps each at 16K tokens), generate ~75 s
# (four calls of 512 decode steps), trainer ~75 s (three steps of 64 answers × 512 tokens, and
# final/ saved), numerics ~30 s (four 1.5B loads), largest ~40 s.
STAGES = {"env": 15, "build": 25, "update": 100, "generate": 85, "trainer": 85, "numerics": 45,
          "largest": 55}
GIB = 2**30
SHAPES = {
    # the GPU window: Qwen2.5-1.5B's shape at the lengths
    "full": dict(arch="qwen2.5-1.5b", tokens=16384, new_tokens=512, batches=(64, 256),
                 prompts=16, largest_cap=2**20),
    # the suite: the demo's shape, a minute on two CPU cores
    "small": dict(arch="demo", tokens=512, new_tokens=16, batches=(8, 32), prompts=4,
                  largest_cap=4096),
}


def _settings(args) -> dict:
    """The shape of this run: ``--small`` or the GPU window's, with any flag given on top (a
    CPU rehearsal at a real architecture sets --arch and small token counts)."""
    settings = dict(SHAPES["small" if args.small else "full"])
    for key in settings:
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    return settings


def _work(args) -> Path:
    """Where the model and the trainer's run go: ``--work``, else the output folder."""
    return Path(args.work or args.out)


def _emit(out: Path, stage: str, **values) -> None:
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps({"stage": stage, **values}) + "\n")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def _peaks(device: str) -> dict:
    import torch

    if device == "cuda":
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return {"peak_rss_gib": int(line.split()[1]) / 2**20}
    return {}


def stage_env(out: Path, args) -> None:
    import importlib
    import platform

    import accelerate
    import peft
    import torch
    import transformers

    found = {}
    for name in ("vllm", "trl", "flash_attn", "liger_kernel", "bitsandbytes"):
        try:  # imported, not only found: a package can be there and fail to load
            importlib.import_module(name)
            found[name] = True
        except Exception:  # noqa: BLE001 - any failure means "does not import"
            found[name] = False
    _emit(out, "env", python=platform.python_version(), torch=torch.__version__,
          cuda=torch.version.cuda, transformers=transformers.__version__,
          peft=peft.__version__, accelerate=accelerate.__version__,
          device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
          device_memory_gib=(torch.cuda.get_device_properties(0).total_memory / GIB
                             if torch.cuda.is_available() else None),
          importable=found)


def stage_build(out: Path, args) -> None:
    from rollout_engines import build_model_dir

    arch = _settings(args)["arch"]
    start = time.perf_counter()
    build_model_dir(arch, str(_work(args) / "model"),
                    "float32" if arch == "demo" else "bfloat16", device=args.device)
    _emit(out, "build", arch=arch, seconds=time.perf_counter() - start)


def _config(out: Path, args, **overrides):
    from nftune.config import build_config

    values = dict(model=str(_work(args) / "model"), train_data="unused", device=args.device,
                  minibatches=1, warmup_steps=0, lr=1e-6, gradient_checkpointing="true")
    values.update(overrides)
    return build_config(None, values)


def _batch(rows: int, tokens: int, vocab: int, device: str):
    """benchmarks/memory.py's micro-batch (64-token prompts, half the answers right) on
    ``device``."""
    from memory import _batch as cpu_batch
    from memory import _to

    batch = cpu_batch(rows, tokens, vocab)
    return batch if device == "cpu" else _to(batch, device)


UPDATE_CONFIGS = {"fp32_ckpt": dict(bf16="false"), "bf16_ckpt": dict(bf16="true"),
                  "lora16_bf16_base": dict(bf16="true", lora_rank=16, base_dtype="bfloat16")}


def stage_update(out: Path, args) -> None:
    import gc

    import torch

    from nftune.plan import estimate, plan_run, read_shape
    from nftune.policy import build_policy, make_optimizer, make_scheduler
    from nftune.update import update_policy

    tokens = _settings(args)["tokens"]
    rows = 4
    shape = read_shape(str(_work(args) / "model"))
    for name, change in UPDATE_CONFIGS.items():
        cfg = _config(out, args, micro_batch_tokens=tokens, **change)
        torch.manual_seed(0)
        model, _ = build_policy(cfg, torch.device(args.device))
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg)
        batch = _batch(rows, tokens // rows - 64, model.config.vocab_size, args.device)
        update_policy(model, optimizer, scheduler, batch, cfg, 0)  # creates AdamW's moments
        _sync(args.device)
        _reset(args.device)
        start = time.perf_counter()
        update_policy(model, optimizer, scheduler, batch, cfg, 0)
        _sync(args.device)
        seconds = time.perf_counter() - start
        measured = _peaks(args.device)
        # the floor: a plain forward (the same model, checkpointing as configured) + backward
        # + the same AdamW on the same tokens; full logits, no log-prob kernels, no objective
        plain = optimizer
        times = []
        for _ in range(2):
            start = time.perf_counter()
            with torch.autocast(args.device, dtype=torch.bfloat16,
                                enabled=cfg.uses_bf16(args.device)):
                loss = model(input_ids=batch.input_ids).logits.float().logsumexp(-1).mean()
            loss.backward()
            plain.step()
            plain.zero_grad(set_to_none=True)
            _sync(args.device)
            times.append(time.perf_counter() - start)
        _, phases = estimate(shape, tokens=rows * (tokens // rows), checkpointing=True,
                             lora_rank=cfg.lora_rank, bf16_base=cfg.base_dtype == "bfloat16",
                             autocast=cfg.uses_bf16(args.device))
        plan = plan_run(cfg, shape, args.device, _device_bytes(args.device))
        _emit(out, "update", config=name, tokens=rows * (tokens // rows), seconds=seconds,
              tokens_per_s=rows * (tokens // rows) / seconds, floor_seconds=times[-1],
              vs_floor=seconds / times[-1], model_gib=max(phases.values()) / GIB,
              largest_micro_batch_tokens_by_model=plan.largest_micro_batch_tokens, **measured)
        del model, optimizer, scheduler, plain, batch
        gc.collect()


def _device_bytes(device: str) -> int:
    import torch

    from nftune.policy import device_memory_bytes

    return device_memory_bytes(torch.device(device))


def stage_generate(out: Path, args) -> None:
    """The trainer's sampling (its model, fp32 weights, under its precision: bf16 autocast on
    CUDA) at both batch sizes, π_old's log-probs recorded or not; then, last and so first to
    be cut, the evaluation's path (weights loaded in bf16) at the larger batch."""
    import torch

    from nftune.policy import build_policy, load_policy
    from nftune.rollout import HFEngine
    from nftune.sampling import Sampling

    s = _settings(args)
    device = torch.device(args.device)
    cfg = _config(out, args, gradient_checkpointing="auto")
    model, tokenizer = build_policy(cfg, device)
    HFEngine.from_config(model, tokenizer, cfg).generate(
        ["1+1="], Sampling(n=8, max_new_tokens=4))  # warm-up

    def timed(engine, batch: int, record: bool, **labels) -> None:
        torch.manual_seed(0)
        _reset(args.device)
        start = time.perf_counter()
        rollout = engine.generate(["1+1="] * (batch // 8),
                                  Sampling(n=8, max_new_tokens=s["new_tokens"]),
                                  record_logprobs=record)
        _sync(args.device)
        seconds = time.perf_counter() - start
        _emit(out, "generate", batch=batch, record_logprobs=record, seconds=seconds,
              answers_per_s=len(rollout) / seconds,
              tokens_per_s=int(rollout.response_lengths.sum()) / seconds,
              **labels, **_peaks(args.device))

    for batch in s["batches"]:
        cfg.gen_batch_size = batch
        for record in (False, True):
            timed(HFEngine.from_config(model, tokenizer, cfg), batch, record,
                  weights="float32", autocast=cfg.uses_bf16(args.device))
    del model
    weights = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, tokenizer = load_policy(str(_work(args) / "model"), device, dtype=weights)
    timed(HFEngine(model, tokenizer, max(s["batches"])), max(s["batches"]), False,
          weights=str(weights).removeprefix("torch."), autocast=False)


REWARD = "def reward(responses, rows):\n    return [float(len(r) % 2) for r in responses]\n"


def stage_trainer(out: Path, args) -> None:
    from nftune.tasks.arithmetic import make_questions
    from nftune.train import train

    s = _settings(args)
    work = _work(args)
    (work / "reward.py").write_text(REWARD)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(q.__dict__) + "\n" for q in make_questions(64, "train",
                                                                                  0, 1)))
    cfg = _config(out, args, train_data=str(data), template="raw", steps=3,
                  prompts_per_step=s["prompts"], answers_per_prompt=4,
                  minibatches=2, max_new_tokens=s["new_tokens"], verify_workers=1,
                  reward=f"{work / 'reward.py'}:reward", output_dir=str(work / "run"),
                  gradient_checkpointing="auto")
    start = time.perf_counter()
    final = train(cfg, progress=False, overwrite=True)
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    _emit(out, "trainer", seconds=time.perf_counter() - start, final=str(final),
          final_files=sorted(p.name for p in final.iterdir()),
          step_seconds=[r["time_step_s"] for r in rows])


def stage_numerics(out: Path, args) -> None:
    import torch

    from nftune.policy import build_policy, make_optimizer, make_scheduler, precision
    from nftune.rollout import HFEngine
    from nftune.sampling import Sampling
    from nftune.update import recompute_logprobs, update_policy

    device = torch.device(args.device)
    result = {}
    for bf16 in ("false", "true"):
        # as the trainer does: π_old recorded while sampling and recomputed by a forward, both
        # in the run's precision (bf16: the same autocast)
        cfg = _config(out, args, bf16=bf16, micro_batch_tokens=4096)
        model, tokenizer = build_policy(cfg, device)
        torch.manual_seed(0)
        rollout = HFEngine.from_config(model, tokenizer, cfg).generate(
            ["1+1="] * 2, Sampling(n=8, max_new_tokens=16), record_logprobs=True)
        with precision(cfg, device):
            again, _ = recompute_logprobs(model, rollout, 4096)
        mask = rollout.response_mask.bool()
        result[f"recorded_vs_recomputed_max_bf16_{bf16}"] = float(
            (again - rollout.old_logprobs)[mask].abs().max())
    # the same weights and answers, a forward in float32 against one under bf16 autocast
    with torch.autocast(args.device, dtype=torch.bfloat16):
        in_bf16, _ = recompute_logprobs(model, rollout, 4096)
    in_fp32, _ = recompute_logprobs(model, rollout, 4096)
    result["bf16_vs_fp32_logprob_max"] = float((in_bf16 - in_fp32)[mask].abs().max())
    result["bf16_vs_fp32_logprob_mean"] = float((in_bf16 - in_fp32)[mask].abs().mean())
    states = []
    for _ in range(2):
        cfg = _config(out, args, micro_batch_tokens=4096)
        torch.manual_seed(0)
        model, _ = build_policy(cfg, torch.device(args.device))
        optimizer = make_optimizer(model, cfg)
        batch = _batch(4, 64, model.config.vocab_size, args.device)
        update_policy(model, optimizer, make_scheduler(optimizer, cfg), batch, cfg, 0)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    result["same_update_twice_bitwise"] = all(torch.equal(states[0][k], states[1][k])
                                              for k in states[0])
    _emit(out, "numerics", **result)


def stage_largest(out: Path, args) -> None:
    """The largest micro-batch measured, bf16 autocast + checkpointing (CUDA's defaults): a step
    at the memory model's largest; on running out of memory 0.8× that, up to four tries; if the
    first fits, one try at 1.25× (never above ``--largest-cap``; small: 4,096 tokens)."""
    import gc

    import torch

    from nftune.plan import plan_run, read_shape
    from nftune.policy import build_policy, make_optimizer, make_scheduler
    from nftune.update import update_policy

    cfg = _config(out, args, bf16="true")
    model, _ = build_policy(cfg, torch.device(args.device))
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    by_model = plan_run(cfg, read_shape(str(_work(args) / "model")), args.device,
                        _device_bytes(args.device)).largest_micro_batch_tokens or 4096
    tokens = min(by_model, _settings(args)["largest_cap"])
    tries = []

    def step(n: int) -> bool:
        # rows of a run's length (256-token prompts, 2,048-token answers), an even number:
        # half the batch's answers are right
        rows = max(4, n // 2304 // 2 * 2)
        batch = _batch(rows, max(1, n // rows - 64), model.config.vocab_size, args.device)
        cfg.micro_batch_tokens = rows * (n // rows)
        try:
            update_policy(model, optimizer, scheduler, batch, cfg, 0)
            _sync(args.device)
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        del batch
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        tries.append({"tokens": n, "fits": ok})
        return ok

    if step(tokens):
        step(int(tokens * 1.25))
    else:
        for _ in range(3):
            tokens = int(tokens * 0.8)
            if step(tokens):
                break
    fitting = [t["tokens"] for t in tries if t["fits"]]
    _emit(out, "largest", by_model=by_model, tries=tries,
          largest_measured=max(fitting) if fitting else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="the demo's shape (CPU, CI)")
    parser.add_argument("--arch", default=None,
                        help="a rollout_engines.ARCHS shape instead (e.g. qwen2.5-0.5b)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens a micro-batch")
    parser.add_argument("--new-tokens", type=int, default=None, help="answer length")
    parser.add_argument("--batches", type=lambda v: tuple(int(x) for x in v.split(",")),
                        default=None, help="answers a generate call, e.g. 64,256")
    parser.add_argument("--prompts", type=int, default=None, help="the trainer's prompts a step")
    parser.add_argument("--largest-cap", type=int, default=None,
                        help="the most tokens the 'largest' stage tries")
    parser.add_argument("--limit-scale", type=float, default=1.0,
                        help="multiply every stage's time limit (a CPU rehearsal)")
    parser.add_argument("--out", default="gpu_check", help="results.jsonl goes here")
    parser.add_argument("--work", default=None,
                        help="the built model and the trainer's run (GBs at full shape; "
                        "default: --out), e.g. /tmp on a machine that ships --out back")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _work(args).mkdir(parents=True, exist_ok=True)
    if args.stage:
        globals()[f"stage_{args.stage}"](out, args)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for stage in args.stages.split(","):
        start = time.perf_counter()
        # each stage's process gets the driver's own flags (shape, --out, --work) and its name
        command = [sys.executable, __file__, *sys.argv[1:], "--stage", stage]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, env=env,
                                  timeout=STAGES[stage] * args.limit_scale)
            rc, tail = proc.returncode, proc.stderr[-1500:] if proc.returncode else ""
        except subprocess.TimeoutExpired:
            rc, tail = "timeout", ""
        _emit(out, "done", of=stage, rc=rc, seconds=time.perf_counter() - start, error=tail)
        print(f"{stage}: rc {rc}, {time.perf_counter() - start:.1f} s", flush=True)
        if tail:
            print(tail, flush=True)
    print(f"results: {out / 'results.jsonl'}")


if __name__ == "__main__":
    main()
