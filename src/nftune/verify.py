"""The binary verifier: extract the answer a response commits to, check it against the gold.

Checking is math-verify's (gold first: ``verify(parse(gold), parse(pred))``), behind a fast path
for plain numbers that needs no sympy. math-verify bounds its own time with SIGALRM, which only
works in a main thread, and some inputs (``9^{9^{9^{9}}}``) hang inside C code where no signal
reaches; so every non-trivial check runs in a worker process (:mod:`nftune.pool`: a fresh
interpreter running ``nftune._verify_worker``) with a memory limit, and the pool kills a worker
that overruns ``timeout_s`` and starts a fresh one. A verdict that cannot be reached is
``False``; an answer longer than ``MAX_ANSWER_CHARS`` is ``False``; nothing a model writes can
stop the run.

:class:`Verifier` is safe to call from several threads (calls take turns on one pool) and after
an interrupted call (workers that were mid-call are killed, so no stale verdict survives).
"""

from __future__ import annotations

import atexit
import re
import threading
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache

from nftune.pool import WorkerPool, worker_count

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
# The math verifier: checking in worker processes (nftune.pool)
# ---------------------------------------------------------------------------------------------

MATH_JOB = {"kind": "math"}  # what a math verifier's workers run (nftune._verify_worker)


class Verifier:
    """The math verifier: extraction and the fast path here, math-verify in a pool of worker
    processes (:class:`nftune.pool.WorkerPool`) that survives its workers' deaths.

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
        self.workers = worker_count(workers)
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.strategy = strategy
        self.pool = WorkerPool(self.workers, memory_mb, MATH_JOB, chunk_size)
        self._lock = threading.RLock()

    @property
    def restarts(self) -> int:
        """Workers replaced so far (stuck, dead or killed)."""
        return self.pool.restarts

    def start_in_background(self) -> None:
        """Start the worker processes now: their math-verify warm-up (seconds on a cold
        machine) then overlaps the caller's own set-up instead of the first ``verify``."""
        with self._lock:
            self.pool.start()

    def close(self) -> None:
        with self._lock:
            self.pool.close()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def verify(self, responses: Sequence[str], golds: Sequence[str],
               strategy: str | None = None, timeout_s: float | None = None) -> list[bool]:
        """One verdict per (response, gold) pair; ``strategy`` and ``timeout_s`` override the
        pool's for this call."""
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
                with self._lock:  # an item given up stays False
                    self.pool.run(slow, timeout_s,
                                  lambda i, msg: verdicts.__setitem__(i, msg[1] is True))
        return verdicts


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
        if pool is None or (pool.workers, pool.memory_mb) != (worker_count(workers), memory_mb):
            if pool is not None:
                pool.close()
            pool = _shared = Verifier(workers, timeout_s, memory_mb)
    return pool.verify(responses, golds, strategy=strategy, timeout_s=timeout_s)


@atexit.register
def _close_shared() -> None:
    if _shared is not None:
        _shared.close()
