"""The demo's targets, measured: wall time (base built and cached) and held-out gains.

Usage: python benchmarks/demo_targets.py [--seeds 0,1,2] [--algos nft,rft,grpo]
                                         [--out runs/demo-targets]

Runs `nftune demo` once per algorithm × seed, all in the same settings (chosen once, not tuned
per algorithm). The first run builds the base model into a fresh cache, so its wall time is
the "first run" figure; the others find it cached. Prints one line per run and a summary.
Targets (issue 5): <= 10 min with the build, <= 5 min cached, NFT gain >= 15 points (mean of 3
seeds, sampled held-out accuracy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--algos", default="nft,rft,grpo")
    parser.add_argument("--out", default="runs/demo-targets")
    args = parser.parse_args()
    out = Path(args.out)
    cache = out / "cache"
    results = []
    for algo in args.algos.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            run_dir = out / f"{algo}-seed{seed}"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "nftune.cli", "demo", "--algo", algo,
                            "--seed", str(seed), "--output-dir", str(run_dir), "--cache-dir",
                            str(cache), "--no-progress"], check=True,
                           stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            s = json.loads((run_dir / "summary.json").read_text())
            s["wall_seconds"] = wall
            results.append(s)
            print(f"{algo:<5} seed {seed}: sampled {s['before']['sampled']:.1%} -> "
                  f"{s['after']['sampled']:.1%} ({s['gain']['sampled'] * 100:+.1f}), greedy "
                  f"{s['before']['greedy']:.1%} -> {s['after']['greedy']:.1%} "
                  f"({s['gain']['greedy'] * 100:+.1f}); wall {wall:.0f} s "
                  f"(base {'built' if s['base_built'] else 'cached'})", flush=True)
    print("\nsummary (gain in points, mean ± std over seeds)")
    for algo in args.algos.split(","):
        rows = [r for r in results if r["algo"] == algo]
        for kind in ("sampled", "greedy"):
            gains = [100 * r["gain"][kind] for r in rows]
            spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
            print(f"  {algo:<5} {kind:<8} {statistics.mean(gains):+.1f} ± {spread:.1f}  "
                  f"({', '.join(f'{g:+.1f}' for g in gains)})")
    built = [r["wall_seconds"] for r in results if r["base_built"]]
    cached = [r["wall_seconds"] for r in results if not r["base_built"]]
    if built:
        print(f"wall, base built: {max(built):.0f} s (target <= 600)")
    if cached:
        print(f"wall, base cached: median {statistics.median(cached):.0f} s, max "
              f"{max(cached):.0f} s (target <= 300)")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
