"""The binary verifier: extract the answer a response commits to, check it against the gold.

Checking is math-verify's (gold first: ``verify(parse(gold), parse(pred))``), behind a fast path
for plain numbers that needs no sympy. math-verify bounds its own time with SIGALRM, which only
works in a main thread, and some inputs (``9^{9^{9^{9}}}``) hang inside C code where no signal
reaches; so every non-trivial check runs in a worker process with a memory limit, and the parent
kills a worker that overruns ``timeout_s`` and starts a fresh one. A verdict that cannot be
reached is ``False``; nothing a model writes can stop the run.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import re
import threading
import time
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from multiprocessing.connection import Connection, wait

STRATEGIES = ("auto", "boxed", "answer_line")
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_LINE = re.compile(r"^[\W_]*answer\s*\**\s*:\s*\**\s*(.*?)\s*$", re.IGNORECASE)
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_WHITESPACE = re.compile(r"\s+")
_MAX_FAST_LEN = 64
_MAX_ANSWER_LEN = 2000  # longer "answers" are not answers; they go to math-verify truncated


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


def _last_answer_line(text: str) -> str | None:
    """The value of the last line of the form ``Answer: ...`` (DAPO-Math-17k's format)."""
    for line in reversed(text.splitlines()):
        match = _ANSWER_LINE.match(line)
        if match:
            value = match.group(1).strip().rstrip(".").strip()
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

    timeout = max(1, round(timeout_s))
    try:
        gold_parsed = _parse_boxed(gold, timeout)
        pred_parsed = _parse_boxed(pred[:_MAX_ANSWER_LEN], timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 — any failure to decide is a wrong answer
        return False


# ---------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------


def _worker_main(conn: Connection, memory_mb: int, timeout_s: float) -> None:
    """Check (index, pred, gold) items one by one, sending each verdict back as it is reached."""
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # timeouts are verdicts here
    if memory_mb > 0:
        try:
            import resource

            limit = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for index, pred, gold in chunk:
            try:
                verdict = math_verify_check(pred, gold, timeout_s)
            except MemoryError:
                verdict = False
            conn.send((index, verdict))


class _Worker:
    def __init__(self, ctx, memory_mb: int, timeout_s: float):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, memory_mb, timeout_s),
                                daemon=True)
        self.proc.start()
        child.close()
        self.pending: list[tuple[int, str, str]] = []
        self.last_progress = time.monotonic()

    def send(self, chunk: list[tuple[int, str, str]]) -> None:
        self.pending = list(chunk)
        self.last_progress = time.monotonic()
        self.conn.send(chunk)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=1)
        self.conn.close()


class Verifier:
    """A pool of verifier processes that survives its workers' deaths.

    Args:
        workers: worker processes (default: CPU count, at most 8). 0 checks in this process
            (debugging only: no protection against hangs, main thread only).
        timeout_s: time limit per item; an item over it is False and its worker is replaced.
        memory_mb: address-space limit per worker.
        strategy: answer extraction, see :func:`extract_answer`.
    """

    def __init__(self, workers: int | None = None, timeout_s: float = 5.0,
                 memory_mb: int = 4096, strategy: str = "auto", chunk_size: int = 32):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: unknown {strategy!r}; valid: {list(STRATEGIES)}")
        self.workers = min(os.cpu_count() or 1, 8) if workers is None else workers
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.strategy = strategy
        self.chunk_size = chunk_size
        self.restarts = 0
        self._pool: list[_Worker] = []
        self._ctx = None
        self._starting: threading.Thread | None = None

    def start_in_background(self) -> None:
        """Start the worker pool now, in a thread, so that the fork server's math-verify
        warm-up (seconds on a cold machine) overlaps the caller's own set-up instead of
        landing in the first ``verify`` call that needs math-verify."""
        if self.workers and self._starting is None and not self._pool:
            self._starting = threading.Thread(target=self._start, daemon=True,
                                              name="nftune-verifier-start")
            self._starting.start()

    def _start(self) -> None:
        if self._ctx is None:
            self._ctx = mp.get_context("forkserver")
            self._ctx.set_forkserver_preload(["nftune._verify_warm"])
        while len(self._pool) < self.workers:
            self._pool.append(_Worker(self._ctx, self.memory_mb, self.timeout_s))

    def _wait_started(self) -> None:
        if self._starting is not None:
            self._starting.join()
            self._starting = None

    def close(self) -> None:
        self._wait_started()
        for w in self._pool:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
            w.proc.join(timeout=1)
            if w.proc.is_alive():
                w.kill()
        self._pool = []

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def verify(self, responses: Sequence[str], golds: Sequence[str],
               strategy: str | None = None) -> list[bool]:
        """One verdict per (response, gold) pair; ``strategy`` overrides the pool's."""
        strategy = strategy or self.strategy
        if len(responses) != len(golds):
            raise ValueError(f"golds: {len(golds)} golds for {len(responses)} responses")
        verdicts = [False] * len(responses)
        slow: list[tuple[int, str, str]] = []
        for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
            pred = extract_answer(response, strategy)
            if pred is not None:
                pred = pred.replace("\x00", "").strip() or None
            if pred is None:
                continue  # no committed answer: wrong
            gold = str(gold)
            fast = fast_verdict(pred, gold)
            if fast is not None:
                verdicts[i] = fast
            else:
                slow.append((i, pred, gold))
        if slow:
            if self.workers == 0:
                for i, pred, gold in slow:
                    verdicts[i] = math_verify_check(pred, gold, self.timeout_s)
            else:
                self._run_pool(slow, verdicts)
        return verdicts

    def _run_pool(self, items: list[tuple[int, str, str]], verdicts: list[bool]) -> None:
        self._wait_started()
        self._start()
        size = max(1, min(self.chunk_size, -(-len(items) // (8 * len(self._pool)))))
        queue = [items[i: i + size] for i in range(0, len(items), size)]
        busy: dict[Connection, _Worker] = {}
        deaths: dict[int, int] = {}  # item index → worker deaths while it was being checked

        def dispatch(worker: _Worker) -> None:
            if not queue:
                return
            chunk = queue.pop(0)
            try:
                worker.send(chunk)
            except OSError:  # dead but not yet reaped (is_alive lags a kill): not the chunk's fault
                worker.pending = []
                queue.insert(0, chunk)
                self._replace(worker, busy, queue, deaths, timed_out=False)
                return
            busy[worker.conn] = worker

        for i, w in enumerate(self._pool):
            if not w.proc.is_alive():  # died between calls
                w.kill()
                self._pool[i] = w = _Worker(self._ctx, self.memory_mb, self.timeout_s)
                self.restarts += 1
            dispatch(w)
        while busy:
            ready = wait(list(busy), timeout=0.05)
            for conn in ready:
                worker = busy[conn]
                try:
                    index, verdict = conn.recv()
                except (EOFError, OSError):  # died, e.g. out of memory
                    self._replace(worker, busy, queue, deaths, timed_out=False)
                    continue
                verdicts[index] = verdict
                worker.pending = [p for p in worker.pending if p[0] != index]
                worker.last_progress = time.monotonic()
                if not worker.pending:
                    del busy[conn]
                    dispatch(worker)
            now = time.monotonic()
            for worker in list(busy.values()):
                if now - worker.last_progress > self.timeout_s + 0.5:
                    self._replace(worker, busy, queue, deaths, timed_out=True)
                elif not worker.proc.is_alive() and not worker.conn.poll():
                    self._replace(worker, busy, queue, deaths, timed_out=False)

    def _replace(self, worker: _Worker, busy: dict, queue: list, deaths: dict[int, int],
                 timed_out: bool) -> None:
        """Replace a stuck or dead worker and requeue its unchecked items.

        The item it was on stays False if it overran the time limit, or if a worker already
        died on it once (so an item that kills workers is given up after its second try).
        """
        busy.pop(worker.conn, None)
        worker.kill()
        self.restarts += 1
        rest = worker.pending
        if rest:
            head = rest[0][0]
            deaths[head] = deaths.get(head, 0) + 1
            if timed_out or deaths[head] >= 2:
                rest = rest[1:]
        if rest:
            queue.insert(0, rest)
        fresh = _Worker(self._ctx, self.memory_mb, self.timeout_s)
        self._pool[self._pool.index(worker)] = fresh
        if queue:
            fresh.send(queue.pop(0))
            busy[fresh.conn] = fresh


_shared: dict[tuple, Verifier] = {}


def verify_batch(responses: Sequence[str], golds: Sequence[str], *, strategy: str = "auto",
                 timeout_s: float = 5.0, workers: int | None = None,
                 memory_mb: int = 4096) -> list[bool]:
    """True where the response's extracted answer equals its gold mathematically.

    Uses a shared :class:`Verifier` pool per setting, started on first use and closed at exit.
    """
    key = (strategy, timeout_s, workers, memory_mb)
    if key not in _shared:
        _shared[key] = Verifier(workers, timeout_s, memory_mb, strategy)
    return _shared[key].verify(responses, golds)


@atexit.register
def _close_shared() -> None:
    for v in _shared.values():
        v.close()
