"""One pool worker (:mod:`nftune.pool`): ``python -m nftune._verify_worker MEMORY_MB [JOB]``.

``JOB`` is JSON data: ``{"kind": "math"}`` (the default) or ``{"kind": "reward", "terms":
[{"target": "file.py:fn", "weight": 1.0}, ...]}`` (user functions, :mod:`nftune.reward`).
Reads JSON lines ``{"timeout_s": t, "items": [...]}`` on stdin and writes one line per item on
stdout, after a ``{"ready": true}`` line once warm: for math, items ``[index, pred, gold]`` and
answers ``[index, verdict]``; for rewards, items ``[index, response, row]`` and answers
``[index, value]`` or ``[index, null, traceback]``.
A fresh interpreter (not a fork) so that it never imports the caller's ``__main__``; it
ignores SIGINT (Ctrl-C is the parent's to handle) and exits at end of input.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    memory_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    # the protocol gets its own copy of stdout; anything a library prints goes nowhere
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)

    job = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {"kind": "math"}
    if job.get("kind") == "reward":
        from nftune.reward import RewardTerm, weighted_reward

        check = _user_check(weighted_reward([RewardTerm(**t) for t in job["terms"]]))
    else:
        from nftune.verify import math_verify_check, warm_up

        logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # timeouts are verdicts
        warm_up()

        def check(item: list, timeout_s: float) -> list:
            index, pred, gold = item
            try:
                return [index, math_verify_check(pred, gold, timeout_s)]
            except MemoryError:
                return [index, False]
    if memory_mb > 0:
        import resource

        limit = memory_mb * 1024 * 1024
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):
            pass
    os.dup2(devnull, 2)  # from here on a failure is a verdict, not a message
    protocol.write('{"ready": true}\n')
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        for item in request["items"]:
            protocol.write(json.dumps(check(item, request["timeout_s"])) + "\n")
            protocol.flush()


def _user_check(reward):
    """A user reward as the worker's check: its value, or its traceback (shortened)."""
    import traceback

    def check(item: list, timeout_s: float) -> list:
        index, response, row = item
        try:
            return [index, reward(response, row)]
        except BaseException as err:  # noqa: BLE001 — a user function's failure is a verdict
            if isinstance(err, KeyboardInterrupt | SystemExit):
                return [index, None, f"{type(err).__name__} raised in the reward function"]
            return [index, None, traceback.format_exc(limit=-8)[-4000:]]

    return check


if __name__ == "__main__":
    main()
