#!/usr/bin/env bash
# The study behind docs/results.md: NFT against RFT, DAPO and GRPO on two tasks (5 seeds
# each), then NFT's ω and ε ablations (3 seeds each; ε in (0, 1]: above 1 the clip changes the
# on-policy ratio itself), all through `nftune compare`.
# Re-run it to continue after an interruption: every part uses --resume, so finished runs
# are kept and an interrupted run continues from its last checkpoint. Each run takes a few
# minutes on a 2-core CPU; the parts can run on different days.
# The "pilot" part runs 3x longer (240 steps): NFT and RFT on arithmetic (seeds 0-1) and on
# Countdown (seed 0), to show whether the 80-step curves have flattened.
# The "*16" parts are the paper's off-policy regime: 16 mini-batches (optimizer steps) per
# rollout, lr 3e-5 for every objective (from the "lr16" pilot: NFT seed 0 at 1.5e-4 and 3e-5);
# arithmetic16 then extends its 80-step runs to 160 steps (`compare --resume --steps 160`).
# "long16" asks where the leader's curve flattens: NFT and RFT on arithmetic (5 seeds) in
# the same regime, 160 steps, then on to 240, 320, 480, 640, 800, 960 and 1120;
# `python benchmarks/plateau_fit.py DIR` extrapolates where a part's curves would flatten.
# "prompts16" is the remedy for runs too long to flatten: a quarter of the questions
# per rollout (16), 640 steps, RFT and NFT seed 0 (~5 min a run).
#   bash benchmarks/paper_claims.sh [OUT_DIR] [PART...]
#   parts: arithmetic countdown omega eps pilot lr16 arithmetic16 countdown16 eps16 long16
#          prompts16
#   (default: arithmetic countdown omega eps arithmetic16 countdown16 eps16)
set -euo pipefail
out=${1:-runs/paper-claims}
shift || true
parts=${*:-arithmetic countdown omega eps arithmetic16 countdown16 eps16}
steps=80  # 2x the former 40; the curves in the report show whether they have flattened
common=(--steps "$steps" --no-progress --resume)
regime16=(--minibatches 16 --lr 3e-5 --eval_every 10)  # off-policy; a finer curve
# staged DIR "N1 N2 ..." ARGS...: one comparison trained to N1 steps, then on to N2, ...
# (`compare --resume --steps N`; constant lr), each length's report kept as results.stepN.*.
# A stage already reported is skipped, so a cut loses at most the runs of one stage.
staged() {
  local dir=$1 lengths=$2 n
  shift 2
  for n in $lengths; do
    [ -e "$dir/results.step$n.md" ] && continue
    nftune compare "$@" --steps "$n" --no-progress --resume --output-dir "$dir"
    cp "$dir/results.md" "$dir/results.step$n.md"
    cp "$dir/results.json" "$dir/results.step$n.json"
  done
}
for part in $parts; do
  case $part in
    arithmetic) nftune compare --task arithmetic --algos nft,rft,dapo,grpo --seeds 5 \
                  --output-dir "$out/arithmetic" "${common[@]}" ;;
    countdown)  nftune compare --task countdown --algos nft,rft,dapo,grpo --seeds 5 \
                  --output-dir "$out/countdown" "${common[@]}" ;;
    omega)      nftune compare --task arithmetic --algos nft --sweep weight=dr_grpo,one,grpo \
                  --seeds 3 --output-dir "$out/omega" "${common[@]}" ;;
    eps)        nftune compare --task arithmetic --algos nft --sweep eps=1.0,0.5,0.1 \
                  --seeds 3 --output-dir "$out/eps" "${common[@]}" ;;
    pilot)      nftune compare --task arithmetic --algos nft,rft --seeds 2 --steps 240 \
                  --no-progress --resume --output-dir "$out/pilot-arithmetic"
                # one seed: a 240-step Countdown run takes ~25-30 min (refills grow late on)
                nftune compare --task countdown --algos nft,rft --seeds 1 --steps 240 \
                  --no-progress --resume --output-dir "$out/pilot-countdown" ;;
    lr16)       nftune compare --task arithmetic --algos nft --sweep lr=1.5e-4,3e-5 --seeds 1 \
                  --minibatches 16 --output-dir "$out/lr16" "${common[@]}" ;;
    arithmetic16) staged "$out/arithmetic16" "80 160" --task arithmetic --algos nft,rft,dapo,grpo \
                    --seeds 5 "${regime16[@]}" ;;
    countdown16) nftune compare --task countdown --algos nft,rft,dapo,grpo --seeds 5 \
                  --output-dir "$out/countdown16" "${common[@]}" "${regime16[@]}" ;;
    long16)     staged "$out/long16" "160 240 320 480 640 800 960 1120" --task arithmetic \
                  --algos nft,rft --seeds 5 "${regime16[@]}" ;;
    prompts16)  nftune compare --task arithmetic --algos rft,nft --seeds 1 --steps 640 \
                  --prompts_per_step 16 --no-progress --resume --output-dir "$out/prompts16" \
                  --minibatches 16 --lr 3e-5 --eval_every 20 ;;
    eps16)      nftune compare --task arithmetic --algos nft --sweep eps=1.0,0.5,0.1 \
                  --seeds 3 --output-dir "$out/eps16" "${common[@]}" "${regime16[@]}" ;;
    *) echo "unknown part: $part (arithmetic countdown omega eps pilot lr16 arithmetic16" \
            "countdown16 eps16 long16 prompts16)" >&2; exit 2 ;;
  esac
done
