#!/usr/bin/env bash
# Two rollout steps of the NFT recipe (nft_qwen2.5_math_7b.yaml) on one GPU with a small model:
# the launch to try on a machine with verl's stack before the real run. Data for 64 questions,
# then verl's own entry point with the recipe and the overrides below.
# Needs `pip install -e ".[verl]"` and the model from the hub or a local directory
# (NFTUNE_SMOKE_MODEL=/path/to/model); NFTUNE_DATA_DIR=<dir of .jsonl files> reads the
# question sets from there instead of the hub.
# Passes when verl prints "Final validation metrics" and writes
# checkpoints/nftune/nft-smoke-2-steps/global_step_2.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
export NFTUNE_VERL_DATA="${NFTUNE_VERL_DATA:-$PWD/data/verl-smoke}"
nftune verl-data --train dapo17k --train-limit 64 --val math500 --template boxed \
    --output-dir "$NFTUNE_VERL_DATA" --if-changed
python3 -m verl.trainer.main_ppo --config-path "$HERE" --config-name nft_qwen2.5_math_7b \
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
    trainer.test_freq=-1 \
    trainer.val_before_train=false \
    "$@"
