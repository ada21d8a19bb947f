"""Build a demo task's base model and write it into the package (src/nftune/tasks/demo_base/
for arithmetic, countdown_base/ for Countdown).

Usage: python benchmarks/ship_demo_base.py [--task arithmetic|countdown] [--from DIR]

Builds the task's demo BaseSpec (or copies an already built base from DIR, e.g. one of
benchmarks/demo_bases.py's cache), measures its held-out accuracy with the demo's own seeded
evaluation, and records spec, SHA-256 of every file and that accuracy in nftune_base.json.
A test checks the shipped files against those hashes and re-measures the accuracy.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from nftune.demo import SETTINGS, _evaluate_both
from nftune.policy import load_policy
from nftune.reward import Reward
from nftune.tasks.base_model import (
    INFO_FILE,
    SHIPPED_BASES,
    TASKS,
    _file_hashes,
    build_base_model,
    task_module,
)
from nftune.verify import Verifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="arithmetic", choices=sorted(SHIPPED_BASES))
    parser.add_argument("--from", dest="source", type=Path, default=None)
    args = parser.parse_args()
    settings = SETTINGS[args.task, False]
    shipped = SHIPPED_BASES[args.task]
    tmp = shipped.with_name(shipped.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.source:
        shutil.copytree(args.source, tmp)
        spec = json.loads((tmp / INFO_FILE).read_text())["spec"]
        if spec != asdict(settings.base):
            raise SystemExit(f"{args.source}: spec {spec} is not the demo's {settings.base}")
    else:
        build_base_model(tmp, settings.base)
    model, tokenizer = load_policy(str(tmp), torch.device("cpu"))
    test = task_module(args.task).make_questions(settings.test_questions, "test", 0,
                                                  settings.base.level)
    with Verifier(workers=2) as verifier:
        reward = Reward(verifier, TASKS[args.task], workers=verifier.workers)
        measured = _evaluate_both(model, tokenizer, test, settings, reward)
    info = json.loads((tmp / INFO_FILE).read_text())
    info.update(sha256=_file_hashes(tmp),
                accuracy={k: v.avg_at_k for k, v in measured.items()},
                measured_with={"test_questions": settings.test_questions,
                               "eval_k": settings.eval_k, "eval_seed": settings.eval_seed},
                built_on=f"{platform.machine()} {platform.processor() or ''} torch "
                         f"{torch.__version__}".strip())
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(shipped, ignore_errors=True)
    tmp.rename(shipped)
    print(f"shipped {shipped}: sampled {info['accuracy']['sampled']:.1%}, greedy "
          f"{info['accuracy']['greedy']:.1%}")


if __name__ == "__main__":
    main()
