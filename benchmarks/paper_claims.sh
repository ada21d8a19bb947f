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
# the same regime, 160 steps, then on to 240 and 320 (each length's report kept as
# results.stepN.md; a stage ends with every run at that length, so a cut loses little).
#   bash benchmarks/paper_claims.sh [OUT_DIR] [PART...]
#   parts: arithmetic countdown omega eps pilot lr16 arithmetic16 countdown16 eps16 long16
#   (default: arithmetic countdown omega eps arithmetic16 countdown16 eps16)
set -euo pipefail
out=${1:-runs/paper-claims}
shift || true
parts=${*:-arithmetic countdown omega eps arithmetic16 countdown16 eps16}
steps=80  # 2x the former 40; the curves in the report show whether they have flattened
common=(--steps "$steps" --no-progress --resume)
regime16=(--minibatches 16 --lr 3e-5 --eval_every 10)  # off-policy; a finer curve
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
    arithmetic16) # 80 steps (report kept as results.step80.md), then the same runs on to 160
                  a16=(--task arithmetic --algos nft,rft,dapo,grpo --seeds 5 --no-progress
                       --resume --output-dir "$out/arithmetic16" "${regime16[@]}")
                  [ -e "$out/arithmetic16/results.step80.md" ] || {
                    nftune compare "${a16[@]}" --steps "$steps"
                    cp "$out/arithmetic16/results.md" "$out/arithmetic16/results.step80.md"; }
                  nftune compare "${a16[@]}" --steps 160 ;;
    countdown16) nftune compare --task countdown --algos nft,rft,dapo,grpo --seeds 5 \
                  --output-dir "$out/countdown16" "${common[@]}" "${regime16[@]}" ;;
    long16)     l16=(--task arithmetic --algos nft,rft --seeds 5 --no-progress --resume
                     --output-dir "$out/long16" "${regime16[@]}")
                for n in 160 240 320; do
                  [ -e "$out/long16/results.step$n.md" ] && continue
                  nftune compare "${l16[@]}" --steps "$n"
                  cp "$out/long16/results.md" "$out/long16/results.step$n.md"
                  cp "$out/long16/results.json" "$out/long16/results.step$n.json"
                done ;;
    eps16)      nftune compare --task arithmetic --algos nft --sweep eps=1.0,0.5,0.1 \
                  --seeds 3 --output-dir "$out/eps16" "${common[@]}" "${regime16[@]}" ;;
    *) echo "unknown part: $part (arithmetic countdown omega eps pilot lr16 arithmetic16" \
            "countdown16 eps16 long16)" >&2; exit 2 ;;
  esac
done
