"""The binary verifier: extract the answer a response commits to, check it against the gold.

Checking is math-verify's (gold first: ``verify(parse(gold), parse(pred))``), behind a fast path
for plain numbers that needs no sympy. math-verify bounds its own time with SIGALRM, which only
works in a main thread, and some inputs (``9^{9^{9^{9}}}``) hang inside C code where no signal
reaches; so every non-trivial check runs in a worker process (a fresh interpreter, see
``nftune._verify_worker``) with a memory limit, and the parent kills a worker that overruns
``timeout_s`` and starts a fresh one. A verdict that cannot be reached is ``False``; an answer
longer than ``MAX_ANSWER_CHARS`` is ``False``; nothing a model writes can stop the run.

:class:`Verifier` is safe to call from several threads (calls take turns on one pool) and after
an interrupted call (workers that were mid-call are killed, so no stale verdict survives).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

STRATEGIES = ("auto", "boxed", "answer_line")
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_WHITESPACE = re.compile(r"\s+")
_MAX_FAST_LEN = 64
MAX_ANSWER_CHARS = 2000  # a longer extracted answer is wrong, never cut to fit


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces), else None."""
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # "\boxed 5": the token up to the next space or $
        match = re.match(r"[^\s$]+", text[i:])
        return match.group(0) if match else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1: j].strip()
    return None  # unbalanced: the response was cut off inside the box


def _answer_line_value(line: str) -> str | None:
    """``value`` if ``line`` reads ``Answer: value`` (any leading punctuation, ``**Answer:**``,
    any case), else None. A scan, not a regex: linear in the line's length whatever it holds."""
    i, n = 0, len(line)
    while i < n and not line[i].isalnum():
        i += 1
    if line[i: i + 6].lower() != "answer":
        return None
    i += 6
    while i < n and (line[i].isspace() or line[i] == "*"):
        i += 1
    if i >= n or line[i] != ":":
        return None
    return line[i + 1:].strip().lstrip("*").strip()


def _last_answer_line(text: str) -> str | None:
    """The value of the last line of the form ``Answer: ...`` (DAPO-Math-17k's format)."""
    for line in reversed(text.splitlines()):
        value = _answer_line_value(line)
        if value is not None:
            value = value.rstrip(".").strip()
            if value.startswith("$") and value.endswith("$") and len(value) > 1:
                value = value.strip("$").strip()
            if value:
                inner = _last_boxed(value)  # "Answer: \boxed{5}" (a common variant)
                return inner if inner is not None else value
    return None


def extract_answer(text: str, strategy: str = "auto") -> str | None:
    """The answer a response commits to, or None if it commits to none.

    ``boxed``: the last ``\\boxed{}``/``\\fbox{}``; ``answer_line``: the last ``Answer: ...``
    line; ``auto``: the box if there is one, else the answer line.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: unknown {strategy!r}; valid: {list(STRATEGIES)}")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if strategy in ("auto", "boxed"):
        boxed = _last_boxed(text)
        if boxed is not None or strategy == "boxed":
            return boxed or None
    return _last_answer_line(text)


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------


def _plain_number(s: str) -> Fraction | None:
    s = s.strip().strip("$").strip()
    if len(s) > _MAX_FAST_LEN or not _PLAIN_NUMBER.fullmatch(s):
        return None
    return Fraction(s.replace(",", ""))


def fast_verdict(pred: str, gold: str) -> bool | None:
    """Verdict without sympy where it is certain; None when math-verify must decide.

    The same text (ignoring spaces) is a match; so are equal plain numbers; different integers
    are not. Different decimals go to math-verify, which compares floats with rounding.
    """
    if _WHITESPACE.sub("", pred) == _WHITESPACE.sub("", gold):
        return True
    p, g = _plain_number(pred), _plain_number(gold)
    if p is None or g is None:
        return None
    if p == g:
        return True
    if p.denominator == 1 and g.denominator == 1:
        return False
    return None


@lru_cache(maxsize=16384)
def _parse_boxed(expr: str, timeout: int):
    """math-verify's parse of one answer; cached, since K answers often repeat the gold's text
    or each other's."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # LaTeX extraction alone costs half of math-verify's default (LaTeX + plain expression);
    # the plain-expression parser is the fallback for what LaTeX cannot read.
    parsed = parse("\\boxed{" + expr + "}", [LatexExtractionConfig()], parsing_timeout=timeout)
    return parsed or parse(expr, [ExprExtractionConfig()], parsing_timeout=timeout)


def warm_up() -> None:
    """Check one answer of each common shape, so that a forked worker inherits the grammars,
    lazily imported sympy modules and caches these load."""
    for pred, gold in (("\\frac{1}{2}", "0.5"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi)"),
                       ("[-2, \\infty)", "(-\\infty, 0]"), ("x=\\sqrt{3}", "\\{1,2\\}"),
                       ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "10\\%"),
                       ("\\text{(B)}", "x^2+1")):
        math_verify_check(pred, gold, 5)
    _parse_boxed.cache_clear()


def math_verify_check(pred: str, gold: str, timeout_s: float = 5.0) -> bool:
    """math-verify's verdict; call only in a process's main thread (it uses SIGALRM)."""
    from math_verify import verify

    if len(pred) > MAX_ANSWER_CHARS:
        return False

    timeout = max(1, round(timeout_s))
    try:
        gold_parsed = _parse_boxed(gold, timeout)
        pred_parsed = _parse_boxed(pred, timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 — any failure to decide is a wrong answer
        return False


# ---------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------

_STARTUP_LIMIT_S = 120.0  # a worker's import and warm-up, on a loaded machine
_STARTUP_FAILURES = 3  # workers in a row that die before they are ready: the pool gives up


def _worker_count(workers: int | None) -> int:
    return min(os.cpu_count() or 1, 8) if workers is None else workers


def _readable(fds: list[int], timeout_s: float) -> list[int]:
    """The descriptors with data or end of file (poll: no FD_SETSIZE limit in big processes)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(timeout_s * 1000)]


class VerifierError(RuntimeError):
    """The verifier's workers cannot start (e.g. a broken install); the message says how to
    see why."""


class _Worker:
    """One ``python -m nftune._verify_worker`` process, spoken to in JSON lines over pipes.

    A fresh interpreter rather than a fork: it never imports the caller's ``__main__`` (no
    ``if __name__ == "__main__"`` guard needed), inherits no threads or locks, unpickles
    nothing, and runs in its own session so that a terminal's Ctrl-C does not reach it.
    """

    def __init__(self, memory_mb: int, function: str | None = None):
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH"))
                                            if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nftune._verify_worker", str(memory_mb)]
            + ([function] if function else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.ready = False
        self.pending: list[tuple] = []
        self.last_progress = time.monotonic()

    def send(self, chunk: list[tuple], timeout_s: float) -> None:
        self.pending = list(chunk)
        self.last_progress = time.monotonic()
        line = json.dumps({"timeout_s": timeout_s, "items": chunk}) + "\n"
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()

    def receive(self) -> list | None:
        """The messages that have arrived (``{"ready": true}``, ``[index, verdict]`` or
        ``[index, null, error]``); None once the worker has died or written something that
        is not the protocol."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not data:
            return None
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        try:
            return [json.loads(line) for line in lines]
        except ValueError:
            return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def stop(self) -> None:
        """End of input: the worker exits by itself; killed if it does not within a second."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


@dataclass
class Scores:
    """What a reward function gave a batch: one value per answer (0 where it failed), and
    how many calls raised, timed out or killed their worker."""

    values: list[float]
    errors: int = 0
    timeouts: int = 0
    first_error: str | None = None


class Verifier:
    """A pool of verifier processes that survives its workers' deaths.

    Args:
        workers: worker processes (default: CPU count, at most 8). 0 checks in this process
            (debugging only: no protection against hangs, main thread only).
        timeout_s: time limit per item; an item over it is False and its worker is replaced.
        memory_mb: address-space limit per worker.
        strategy: answer extraction, see :func:`extract_answer`.
        function: a reward function's spec (``module:function``, ``file.py:function``, several
            with weights: see :mod:`nftune.reward`) that the workers run, through
            :meth:`score`, instead of the math verifier.
    """

    def __init__(self, workers: int | None = None, timeout_s: float = 5.0,
                 memory_mb: int = 4096, strategy: str = "auto", chunk_size: int = 32,
                 function: str | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: unknown {strategy!r}; valid: {list(STRATEGIES)}")
        self.workers = _worker_count(workers)
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.strategy = strategy
        self.chunk_size = chunk_size
        self.function = function
        self.restarts = 0
        self._pool: list[_Worker] = []
        self._lock = threading.RLock()
        self._failed_starts = 0
        self._given_up: list[tuple[int, bool]] = []  # (item, timed out) of the current call

    def start_in_background(self) -> None:
        """Start the worker processes now: their math-verify warm-up (seconds on a cold
        machine) then overlaps the caller's own set-up instead of the first ``verify``."""
        with self._lock:
            self._fill_pool()

    def _fill_pool(self) -> None:
        """Replace workers that died between calls and start missing ones."""
        for i, worker in enumerate(self._pool):
            if not worker.alive():
                worker.kill()
                self._pool[i] = _Worker(self.memory_mb, self.function)
                self.restarts += 1
        while len(self._pool) < self.workers:
            self._pool.append(_Worker(self.memory_mb, self.function))

    def close(self) -> None:
        with self._lock:
            for worker in self._pool:
                worker.stop()
            self._pool = []

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def verify(self, responses: Sequence[str], golds: Sequence[str],
               strategy: str | None = None, timeout_s: float | None = None) -> list[bool]:
        """One verdict per (response, gold) pair; ``strategy`` and ``timeout_s`` override the
        pool's for this call."""
        if self.function:
            raise ValueError("Verifier.verify: this pool runs a reward function; use score()")
        strategy = strategy or self.strategy
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if len(responses) != len(golds):
            raise ValueError(f"golds: {len(golds)} golds for {len(responses)} responses")
        verdicts = [False] * len(responses)
        slow: list[tuple[int, str, str]] = []
        for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
            pred = extract_answer(response, strategy)
            if pred is not None:
                pred = pred.replace("\x00", "").strip() or None
            if pred is None or len(pred) > MAX_ANSWER_CHARS:
                continue  # no committed answer, or one too long to be an answer: wrong
            gold = str(gold)
            fast = fast_verdict(pred, gold)
            if fast is not None:
                verdicts[i] = fast
            else:
                slow.append((i, pred, gold))
        if slow:
            if self.workers == 0:
                for i, pred, gold in slow:
                    verdicts[i] = math_verify_check(pred, gold, timeout_s)
            else:
                with self._lock:
                    self._run_pool(slow, timeout_s,
                                   lambda i, msg: verdicts.__setitem__(i, msg[1] is True))
        return verdicts

    def score(self, responses: Sequence[str], rows: Sequence[dict]) -> Scores:
        """The pool's reward function on each (response, row) pair, one call per answer in a
        worker process: a call that raises, returns something other than a number, overruns
        ``timeout_s`` or kills its worker scores 0 and is counted."""
        if not self.function:
            raise ValueError("Verifier.score: no reward function; use verify()")
        if len(responses) != len(rows):
            raise ValueError(f"rows: {len(rows)} rows for {len(responses)} responses")
        scores = Scores([0.0] * len(responses))

        def record(index: int, message: list) -> None:
            if len(message) > 2:  # [index, null, error]
                scores.errors += 1
                scores.first_error = scores.first_error or message[2]
            else:
                scores.values[index] = float(message[1])

        items = [(i, r, row) for i, (r, row) in enumerate(zip(responses, rows, strict=True))]
        with self._lock:
            self._run_pool(items, self.timeout_s, record)
            for _, timed_out in self._given_up:
                if timed_out:
                    scores.timeouts += 1
                else:
                    scores.errors += 1
                    scores.first_error = scores.first_error or "the call killed its worker " \
                        "process twice (out of memory, or a crash in native code)"
        return scores

    def _run_pool(self, items: list[tuple], timeout_s: float,
                  on_result: Callable[[int, list], None]) -> None:
        self._fill_pool()
        size = max(1, min(self.chunk_size, -(-len(items) // (8 * len(self._pool)))))
        queue = deque(items[i: i + size] for i in range(0, len(items), size))
        busy: dict[int, _Worker] = {}
        deaths: dict[int, int] = {}  # item index → worker deaths while it was being checked
        self._given_up = []
        finished = False
        try:
            for worker in list(self._pool):
                self._dispatch(worker, queue, busy, deaths, timeout_s)
            while busy:
                readable = _readable(list(busy), 0.05)
                now = time.monotonic()
                for fd in readable:
                    worker = busy[fd]
                    messages = worker.receive()
                    if messages is None:  # died (e.g. out of memory) or spoke nonsense
                        self._replace(worker, queue, busy, deaths, timeout_s, timed_out=False)
                        continue
                    for message in messages:
                        if isinstance(message, dict):  # {"ready": true}: the clock starts now
                            worker.ready, self._failed_starts = True, 0
                        else:
                            index = message[0]
                            on_result(index, message)
                            worker.pending = [p for p in worker.pending if p[0] != index]
                        worker.last_progress = now
                    if worker.ready and not worker.pending:
                        del busy[fd]
                        self._dispatch(worker, queue, busy, deaths, timeout_s)
                for worker in list(busy.values()):
                    limit = timeout_s + 0.5 if worker.ready else _STARTUP_LIMIT_S
                    if now - worker.last_progress > limit:
                        self._replace(worker, queue, busy, deaths, timeout_s,
                                      timed_out=worker.ready)
            finished = True
        finally:
            if not finished:  # interrupted: a worker still mid-chunk would answer the next call
                for worker in busy.values():
                    worker.kill()

    def _dispatch(self, worker: _Worker, queue: deque, busy: dict[int, _Worker],
                  deaths: dict[int, int], timeout_s: float) -> None:
        if not queue:
            return
        chunk = queue.popleft()
        try:
            worker.send(chunk, timeout_s)
        except OSError:  # dead but not yet noticed: not the chunk's fault
            worker.pending = []
            queue.appendleft(chunk)
            self._replace(worker, queue, busy, deaths, timeout_s, timed_out=False)
            return
        busy[worker.fd] = worker

    def _replace(self, worker: _Worker, queue: deque, busy: dict[int, _Worker],
                 deaths: dict[int, int], timeout_s: float, timed_out: bool) -> None:
        """Replace a stuck or dead worker and requeue its unchecked items.

        The item it was on stays False if it overran the time limit, or if a worker already
        died on it once (so an item that kills workers is given up after its second try).
        """
        busy.pop(worker.fd, None)
        worker.kill()
        self.restarts += 1
        rest = worker.pending
        if not worker.ready and rest:
            self._failed_starts += 1
            if self._failed_starts >= _STARTUP_FAILURES:
                raise VerifierError(
                    f"{self._failed_starts} verifier workers in a row died while starting; run "
                    f"`{sys.executable} -m nftune._verify_worker` to see the error")
        elif rest:
            head = rest[0][0]
            deaths[head] = deaths.get(head, 0) + 1
            if timed_out or deaths[head] >= 2:
                self._given_up.append((head, timed_out))
                rest = rest[1:]
        if rest:
            queue.appendleft(rest)
        fresh = _Worker(self.memory_mb, self.function)
        self._pool[self._pool.index(worker)] = fresh
        self._dispatch(fresh, queue, busy, deaths, timeout_s)


_shared: Verifier | None = None
_shared_lock = threading.Lock()


def verify_batch(responses: Sequence[str], golds: Sequence[str], *, strategy: str = "auto",
                 timeout_s: float = 5.0, workers: int | None = None,
                 memory_mb: int = 4096) -> list[bool]:
    """True where the response's extracted answer equals its gold mathematically.

    Uses one shared :class:`Verifier` pool, started on first use and closed at exit; strategy
    and timeout are per call, and a call with another ``workers`` / ``memory_mb`` replaces the
    pool rather than adding one. Safe to call from several threads.
    """
    global _shared
    with _shared_lock:
        pool = _shared
        if pool is None or (pool.workers, pool.memory_mb) != (_worker_count(workers), memory_mb):
            if pool is not None:
                pool.close()
            pool = _shared = Verifier(workers, timeout_s, memory_mb)
    return pool.verify(responses, golds, strategy=strategy, timeout_s=timeout_s)


@atexit.register
def _close_shared() -> None:
    if _shared is not None:
        _shared.close()
