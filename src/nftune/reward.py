"""Reward functions: the math verifier by default, or a user's own, named in the config.

A reward function takes the batch's responses and their questions' rows and returns one value
per response::

    def my_reward(responses: list[str], rows: list[dict]) -> list[float]:
        # rows[i]: {"problem": ..., "answer": ..., **every other field of the data row}
        ...

The config names it as ``reward: package.module:function`` or ``reward: path/to/file.py:function``;
several are summed with weights, ``reward: "checks.py:correct*0.9,checks.py:format*0.1"``. The
built-in ``math`` (the default) is nftune's verifier: answer extraction, a fast path and
math-verify in worker processes (:mod:`nftune.verify`); :func:`math_reward` is the same
verifier with this signature. ``countdown`` is the Countdown task's checker
(:mod:`nftune.tasks.countdown`).

User functions run in worker processes (a fresh interpreter each, started with the function's
module imported), one response per call, each call under ``verify_timeout_s``: a call that
raises, returns a non-number, hangs or kills its worker scores 0 and is counted
(``reward/errors``, ``reward/timeouts``); the rest of the batch is kept. NFT, RFT and InfoNCA
need binary rewards (0/1, True/False); GRPO, Dr.GRPO and DAPO take values in [0, 1].

Importing this module imports neither torch nor math-verify: the workers import it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

BUILTIN = "math"
# other built-in rewards by name: user-function style, run in the reward pool's workers
NAMED = {"countdown": "nftune.tasks.countdown:countdown_reward"}
RewardFn = Callable[[list[str], list[dict]], Sequence[float]]


@dataclass
class Scores:
    """What a reward gave a batch: one value per answer (0 where it failed), and how many
    calls raised, timed out or killed their worker."""

    values: list[float]
    errors: int = 0
    timeouts: int = 0
    first_error: str | None = None


class RewardError(ValueError):
    """A reward function that cannot be used: it returned a value an objective cannot take,
    or failed on every answer of a step."""


@dataclass(frozen=True)
class RewardTerm:
    """One function of a ``reward`` spec and its weight."""

    target: str  # "math" or "module:function" / "file.py:function"
    weight: float = 1.0


def parse_reward_spec(spec: str) -> list[RewardTerm]:
    """``"a.py:f*0.8,pkg.mod:g*0.2"`` → its terms; ``"math"`` is the built-in verifier."""
    terms = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        target, star, weight = part.rpartition("*") if "*" in part else (part, "", "")
        try:
            w = float(weight) if star else 1.0
        except ValueError:
            raise ValueError(f"reward: {part!r}: weight {weight!r} is not a number") from None
        target = NAMED.get(target.strip(), target.strip())
        if target != BUILTIN and (":" not in target or not target.rpartition(":")[2]):
            raise ValueError(f"reward: {target!r}: expected 'math', 'package.module:function' or "
                             "'path/to/file.py:function'")
        terms.append(RewardTerm(target, w))
    if not terms:
        raise ValueError("reward: empty; 'math' is the built-in verifier")
    return terms


def load_reward_function(target: str) -> RewardFn:
    """Import the function ``module:function`` / ``file.py:function`` names (the user's own
    code, which the config names; nothing in a run directory is executed)."""
    from nftune.plugins import import_plugin

    module_name, _, name = target.rpartition(":")
    module = import_plugin(module_name)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward: {target}: {module_name} has no function {name!r}")
    return fn


def call_reward(fn: RewardFn, target: str, response: str, row: dict) -> float:
    """``fn([response], [row])``'s one value as a float in [0, 1]; anything else raises."""
    values = fn([response], [row])
    try:
        (value,) = list(values)
    except (TypeError, ValueError):
        raise RewardError(f"reward {target}: returned {values!r} for one response; expected a "
                          "list of one value per response") from None
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise RewardError(f"reward {target}: returned {value!r}; rewards are numbers in [0, 1]")
    return float(value)


def weighted_reward(terms: list[RewardTerm]) -> Callable[[str, dict], float]:
    """The weighted sum of user terms as one per-answer function (what a worker runs)."""
    loaded = [(t, load_reward_function(t.target)) for t in terms]

    def reward(response: str, row: dict) -> float:
        return sum(t.weight * call_reward(fn, t.target, response, row) for t, fn in loaded)

    return reward


def math_reward(responses: list[str], rows: list[dict]) -> list[float]:
    """nftune's math verifier as a reward function: 1.0 where the response's extracted answer
    equals ``row["answer"]`` (extraction ``row.get("strategy", "auto")``)."""
    from nftune.verify import verify_batch

    out = []
    for strategy in dict.fromkeys(r.get("strategy", "auto") for r in rows):
        idx = [i for i, r in enumerate(rows) if r.get("strategy", "auto") == strategy]
        verdicts = verify_batch([responses[i] for i in idx], [rows[i]["answer"] for i in idx],
                                strategy=strategy)
        out.extend(zip(idx, verdicts, strict=True))
    return [float(v) for _, v in sorted(out)]


def check_values(values: Sequence[float], binary: bool, spec: str, algo: str) -> None:
    """NFT, RFT and InfoNCA learn from right and wrong answers: a value other than 0 or 1 is
    an error naming the function and the value."""
    if binary:
        bad = next((v for v in values if v not in (0.0, 1.0)), None)
        if bad is not None:
            raise RewardError(f"reward {spec}: returned {bad!r}; {algo} needs binary rewards "
                              "(0/1 or True/False); GRPO, Dr.GRPO and DAPO take values in [0, 1]")
    else:
        bad = next((v for v in values if not 0.0 <= v <= 1.0), None)
        if bad is not None:
            raise RewardError(f"reward {spec}: weighted sum {bad!r} lies outside [0, 1]")


def question_row(question) -> dict:
    """What a reward function sees of a question: its fields and every extra field of its
    data row."""
    return {**question.extra, "id": question.id, "problem": question.problem,
            "answer": question.answer}


def _absolute(term: RewardTerm) -> RewardTerm:
    """A file term with its path made absolute (the workers may start elsewhere)."""
    from pathlib import Path

    module, _, name = term.target.rpartition(":")
    if module.endswith(".py"):
        module = str(Path(module).expanduser().resolve())
    return RewardTerm(f"{module}:{name}", term.weight)


def reward_job(terms: list[RewardTerm]) -> dict:
    """What a reward pool's workers run, as data (``nftune._verify_worker`` builds the
    weighted sum from it; nothing is parsed again)."""
    return {"kind": "reward", "terms": [{"target": t.target, "weight": t.weight}
                                        for t in terms]}


class FunctionPool:
    """User reward functions (``terms``, weighted and summed) in a pool of worker processes
    (:class:`nftune.pool.WorkerPool`): one call per answer; a call that raises, returns
    something other than a number, overruns ``timeout_s`` or kills its worker scores 0 and is
    counted."""

    def __init__(self, terms: list[RewardTerm], workers: int | None = None,
                 timeout_s: float = 5.0, memory_mb: int = 4096):
        from nftune.pool import WorkerPool, worker_count

        self.timeout_s = timeout_s
        self.pool = WorkerPool(worker_count(workers), memory_mb, reward_job(terms))
        self._lock = threading.Lock()

    def start_in_background(self) -> None:
        with self._lock:
            self.pool.start()

    def close(self) -> None:
        with self._lock:
            self.pool.close()

    def score(self, responses: Sequence[str], rows: Sequence[dict]) -> Scores:
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
            given_up = self.pool.run(items, self.timeout_s, record)
        for item in given_up:
            if item.timed_out:
                scores.timeouts += 1
            else:
                scores.errors += 1
                scores.first_error = scores.first_error or "the call killed its worker " \
                    "process twice (out of memory, or a crash in native code)"
        return scores


class Reward:
    """A run's reward: the math verifier (``verifier``, nftune's pool) and/or user functions
    (their own :class:`FunctionPool`), weighted and summed. ``spec`` is parsed once, here.

    User functions are imported here once at start, so that a missing file or function is an
    error before training, not a verdict of every answer.
    """

    def __init__(self, verifier=None, spec: str = BUILTIN, workers: int | None = None,
                 timeout_s: float = 5.0):
        self.spec = spec
        terms = parse_reward_spec(spec)
        self.math_weight = sum(t.weight for t in terms if t.target == BUILTIN)
        user = [_absolute(t) for t in terms if t.target != BUILTIN]
        for term in user:
            load_reward_function(term.target)
        if self.math_weight and verifier is None:
            raise ValueError("Reward: the math verifier needs a Verifier pool")
        self.verifier = verifier
        self.pool = FunctionPool(user, workers, timeout_s) if user else None

    def start_in_background(self) -> None:
        """Start the pools this reward uses (the math verifier's only if it is a term)."""
        if self.math_weight:
            self.verifier.start_in_background()
        if self.pool is not None:
            self.pool.start_in_background()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> Reward:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def score(self, responses: list[str], questions: list) -> Scores:
        """One reward per response (``questions[i]`` is the question response i answers)."""
        values = [0.0] * len(responses)
        scores = Scores(values)
        if self.math_weight:
            verdicts = self.verifier.verify(responses, [q.answer for q in questions])
            values[:] = [v + self.math_weight * float(ok) for v, ok in zip(values, verdicts,
                                                                            strict=True)]
        if self.pool is not None:
            user = self.pool.score(responses, [question_row(q) for q in questions])
            values[:] = [a + b for a, b in zip(values, user.values, strict=True)]
            scores.errors, scores.timeouts, scores.first_error = (
                user.errors, user.timeouts, user.first_error)
        return scores
