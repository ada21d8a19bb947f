"""One verifier worker: ``python -m nftune._verify_worker MEMORY_MB``.

Reads JSON lines ``{"timeout_s": t, "items": [[index, pred, gold], ...]}`` on stdin and writes
one ``[index, verdict]`` line per item on stdout, after a ``{"ready": true}`` line once
math-verify is warm. A fresh interpreter (not a fork) so that it never imports the caller's
``__main__``; it ignores SIGINT (Ctrl-C is the parent's to handle) and exits at end of input.
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

    from nftune.verify import math_verify_check, warm_up

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # timeouts are verdicts here
    warm_up()
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
        for index, pred, gold in request["items"]:
            try:
                verdict = math_verify_check(pred, gold, request["timeout_s"])
            except MemoryError:
                verdict = False
            protocol.write(json.dumps([index, verdict]) + "\n")
            protocol.flush()


if __name__ == "__main__":
    main()
