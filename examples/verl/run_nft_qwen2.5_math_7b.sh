#!/usr/bin/env bash
# NFT with verl, the paper's 7B recipe. Single node:   bash run_nft_qwen2.5_math_7b.sh
# Several nodes (see docs/scale.md): start Ray on every node first (.venv/bin/ray start ...),
# then on the head node   NNODES=4 GPUS_PER_NODE=8 bash run_nft_qwen2.5_math_7b.sh
# It runs the repository's .venv (python_env.sh; NFTUNE_PYTHON=/path/python for another).
# Extra arguments are Hydra overrides, e.g. actor_rollout_ref.actor.policy_loss.nft_eps=0.5
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/python_env.sh"
export NFTUNE_VERL_DATA="${NFTUNE_VERL_DATA:-$PWD/data/verl}"

# 1. data: DAPO-Math-17k (cleaned by nftune) + the six benchmarks, in verl's parquet schema.
# verl wraps each prompt in the model's chat template, whose default system prompt for
# Qwen2.5-Math asks for \boxed{}: the boxed template asks the same, and the reward extracts
# the box. Evaluate the result with `nftune eval --template chat:boxed` (docs/scale.md).
# --if-changed: written again whenever the files there were made with other options.
"$NFTUNE_PYTHON" -m nftune verl-data --train dapo17k \
    --val aime24,aime25,amc23,math500,olympiadbench,minerva \
    --template boxed --val-template boxed --output-dir "$NFTUNE_VERL_DATA" --if-changed

# 2. train: verl's standard entry point; `import verl` loads nftune's plugin on every worker
"$NFTUNE_PYTHON" -m verl.trainer.main_ppo \
    --config-path "$HERE" --config-name nft_qwen2.5_math_7b \
    trainer.nnodes="${NNODES:-1}" trainer.n_gpus_per_node="${GPUS_PER_NODE:-8}" \
    "$@"
