"""Plant known bugs one at a time in a copy of src/ and report which the test suite catches.

Usage: python benchmarks/mutations.py [--only NAME,...] [--tests PATH ...]

Each mutation is a list of (file, text, replacement); the script checks that the text is found
(a mutation that no longer applies is reported, not skipped silently), runs pytest -x on the
copy (PYTHONPATH points at it) and prints CAUGHT with the first failing test, or MISSED. The
whole suite runs each time, the stage-contract tests first so that -x stops early.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MUTATIONS: dict[str, list[tuple[str, str, str]]] = {
    "truncated answers not forced wrong": [
        ("train.py", "    reward = reward * (~rollout.truncated).float()", "    pass")],
    "response mask stops before the EOS": [
        ("rollout.py", "response_mask = ((is_stop.long().cumsum(1) - is_stop.long()) == 0).long()",
         "response_mask = (is_stop.long().cumsum(1) == 0).long()")],
    "evaluation counts truncated answers right": [
        ("evaluate.py", "verdicts = [v and not c for v, c in zip(verdicts, cut, strict=True)]",
         "verdicts = list(verdicts)")],
    "evaluation template boxed everywhere": [
        ("evaluate.py", 'return template or DEFAULT_TEMPLATE.get(name, "boxed")',
         'return template or "boxed"')],
    "recompute path swaps log-probs and entropy": [
        ("train.py", "    return replace(rollout, old_logprobs=old, entropy=entropy)",
         "    return replace(rollout, old_logprobs=entropy, entropy=old)")],
    "CLI check of unknown --algos removed": [
        ("cli.py", "    check_algos(algos)  # before reading any file", "    pass  #")],
    "r̂ repeated in the wrong order": [
        ("train.py", "r_hat=groups.mean(1).repeat_interleave(k)",
         "r_hat=groups.mean(1).repeat(k)")],
    "gradient clipping off": [
        ("update.py", "clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf",
         "clip = math.inf")],
    "no learning-rate warm-up": [
        ("policy.py", "return (step + 1) / cfg.warmup_steps", "return 1.0")],
    "recorded old log-probs at temperature 1": [
        ("rollout.py", "LogprobRecorder(temperature) if", "LogprobRecorder() if")],
    "over-long answers cut instead of wrong": [
        ("verify.py", "if pred is None or len(pred) > MAX_ANSWER_CHARS:", "if pred is None:"),
        ("verify.py", "    if len(pred) > MAX_ANSWER_CHARS:\n        return False\n",
         "    pred = pred[:MAX_ANSWER_CHARS]\n")],
    "checkpoints not checked on resume": [
        ("checkpoint.py", "            check_checkpoint(path)\n", "            pass\n")],
    "micro-batches ignore an objective's whole_groups": [
        ("update.py", "keep_groups = objective.whole_groups or cfg.overlong_shaping",
         "keep_groups = cfg.overlong_shaping")],
    "config ignores an objective's dynamic-sampling default": [
        ("config.py", "self.dynamic_sampling = objective.dynamic_sampling",
         "self.dynamic_sampling = True")],
    "dynamic sampling keeps r̂ = 1 groups": [
        ("objectives.py", "return (r_hat > 0) & (r_hat < 1)", "return r_hat > 0")],
}


def run(name: str, edits: list[tuple[str, str, str]], tests: list[str]) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src)
        for file, text, replacement in edits:
            path = src / "nftune" / file
            code = path.read_text()
            if text not in code:
                return f"NOT APPLIED ({file}: text not found)"
            path.write_text(code.replace(text, replacement, 1))
        env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                               "no:cacheprovider", *tests], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        failed = re.findall(r"^FAILED (\S+)", done.stdout, re.M)
        if done.returncode == 0:
            return "MISSED"
        return f"CAUGHT by {failed[0] if failed else f'an error (rc {done.returncode})'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated mutation names")
    parser.add_argument("--tests", nargs="+", default=None,
                        help="test files in the order to run (default: contracts first, then "
                             "every other tests/test_*.py)")
    args = parser.parse_args()
    if args.tests is None:
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
        args.tests = ["tests/test_contracts.py"] + [f for f in files if "contracts" not in f]
    names = args.only.split(",") if args.only else list(MUTATIONS)
    results = {}
    for name in names:
        start = time.perf_counter()
        results[name] = run(name, MUTATIONS[name], args.tests)
        print(f"{name:<45} {results[name]}  ({time.perf_counter() - start:.0f} s)", flush=True)
    caught = sum(r.startswith("CAUGHT") for r in results.values())
    print(f"\n{caught} of {len(results)} planted bugs caught")


if __name__ == "__main__":
    main()
