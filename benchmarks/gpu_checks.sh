#!/bin/bash
# The GPU checks of one device session, in priority order, each under its own time limit.
# Expects nftune's dependencies importable (e.g. carried wheels on PYTHONPATH), the demo base
# model cache in $CACHE, and writes logs to $OUT (default ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}; CACHE=${CACHE:-$HOME/.cache/nftune/demo-base}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'trl', trl.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
echo "== vs TRL on cuda"
# 6 rollouts: the steady-state figure (rollouts 2..6) is the one the overhead target is read on
timeout ${VS_TRL_LIMIT:-360} python3 benchmarks/vs_trl.py --device cuda --cache "$CACHE" \
    --rollouts ${ROLLOUTS:-6} --repeats ${REPEATS:-2} \
    2>&1 | grep -v Warning | tee "$OUT/vs_trl_cuda.txt"
echo "== trainer and evaluation tests on cuda (device auto picks the GPU)"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_train.py tests/test_evaluate.py \
    2>&1 | tail -25 | tee "$OUT/pytest_cuda.txt"
echo "== demo-task NFT on cuda, fp32 and bf16 autocast (40 steps, seed 0, held-out avg@4)"
timeout 130 python3 -m nftune compare --algos nft --sweep bf16=false,true --seeds 1 --steps 40 \
    --device cuda --cache-dir "$CACHE" --output-dir /tmp/cmp-cuda --no-progress \
    2>&1 | grep -v Warning | tail -25 | tee "$OUT/compare_cuda.txt"
cp /tmp/cmp-cuda/results.md "$OUT/compare_cuda_results.md" 2>/dev/null
python3 - <<'PY' | tee -a "$OUT/compare_cuda.txt"
import json, pathlib
for run in sorted(pathlib.Path("/tmp/cmp-cuda/runs").glob("*")):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    step = sorted(r["time_step_s"] for r in rows)[len(rows) // 2]
    print(f"{run.name}: median step {step:.2f} s, reward last 10 "
          f"{sum(r['reward_mean'] for r in rows[-10:]) / 10:.3f}")
PY
echo "== per-phase profile on cuda"
for lp in generate recompute; do
  timeout 40 python3 benchmarks/profile_step.py --device cuda --cache "$CACHE" \
      --old-logprobs $lp 2>&1 | tee -a "$OUT/profile_cuda.txt"
done
echo "== memory of one update step on cuda (Qwen2.5-1.5B shape, random weights)"
timeout ${MEMORY_LIMIT:-300} python3 benchmarks/memory.py --arch qwen2.5-1.5b --device cuda \
    --only before,default,all --rows 4 --tokens 1024 2>&1 | grep -v Warning | tee "$OUT/memory_cuda.txt"
