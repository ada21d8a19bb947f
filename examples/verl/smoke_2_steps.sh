#!/usr/bin/env bash
# Two rollout steps of the NFT recipe (nft_qwen2.5_math_7b.yaml) on one GPU with a small model:
# the launch to try on a machine with verl's stack before the real run. Data for 64 questions,
# then verl's own entry point with the recipe and the overrides below, validating once, after
# the last step.
# Needs the install of docs/scale.md (the repository's .venv with `pip install -e ".[verl]"`;
# NFTUNE_PYTHON=/path/python for another) and the model from the hub or a local directory
# (NFTUNE_SMOKE_MODEL=/path/to/model); NFTUNE_DATA_DIR=<dir of .jsonl files> reads the
# question sets from there instead of the hub.
# Passes (exit 0, "smoke: passed") when verl's final validation metrics hold val-core scores
# and checkpoints/nftune/nft-smoke-2-steps/global_step_2 was written; the log is in
# NFTUNE_SMOKE_LOG (default nft-smoke-2-steps.log).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/python_env.sh"
export NFTUNE_VERL_DATA="${NFTUNE_VERL_DATA:-$PWD/data/verl-smoke}"
LOG="${NFTUNE_SMOKE_LOG:-$PWD/nft-smoke-2-steps.log}"
CHECKPOINT="checkpoints/nftune/nft-smoke-2-steps/global_step_2"
"$NFTUNE_PYTHON" -m nftune verl-data --train dapo17k --train-limit 64 --val math500 \
    --template boxed --output-dir "$NFTUNE_VERL_DATA" --if-changed
"$NFTUNE_PYTHON" -m verl.trainer.main_ppo --config-path "$HERE" \
    --config-name nft_qwen2.5_math_7b \
    actor_rollout_ref.model.path="${NFTUNE_SMOKE_MODEL:-Qwen/Qwen2.5-Math-1.5B}" \
    data.train_batch_size=8 \
    data.max_response_length=1024 \
    actor_rollout_ref.rollout.n=4 \
    actor_rollout_ref.actor.ppo_mini_batch_size=4 \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=8192 \
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=8192 \
    actor_rollout_ref.actor.optim.lr_warmup_steps=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
    actor_rollout_ref.rollout.val_kwargs.n=1 \
    trainer.experiment_name=nft-smoke-2-steps \
    trainer.n_gpus_per_node=1 \
    trainer.total_training_steps=2 \
    trainer.save_freq=2 \
    trainer.test_freq=2 \
    trainer.val_before_train=false \
    "$@" 2>&1 | tee "$LOG"
# verl prints the last validation's metrics (None when nothing validated), possibly wrapped
if ! grep -A40 "Final validation metrics" "$LOG" | grep -q "val-core/"; then
    echo "smoke: FAILED: no validation metrics (val-core/...) after the last step in $LOG" >&2
    exit 1
fi
if [ ! -d "$CHECKPOINT" ]; then
    echo "smoke: FAILED: no checkpoint at $CHECKPOINT" >&2
    exit 1
fi
echo "smoke: passed (validation metrics and $CHECKPOINT; log $LOG)"
