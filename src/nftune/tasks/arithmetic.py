"""A synthetic reasoning task: multi-step integer arithmetic with worked solutions.

A question is an expression such as ``47+18-25``; its worked solution evaluates it left to
right, one step per line, and ends with a DAPO-style ``Answer: N`` line::

    47+18=65
    65-25=40
    Answer: 40

The base model learns the format from *noisy* solutions (some steps off by a little), so it
starts out right on a minority of its samples, with diverse answers: the regime in which
learning from its own verified answers has signal. Questions are graded by the same verifier
as real math data.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from nftune.data import Question

# difficulty level → (number of operands, largest operand, operators)
LEVELS: dict[int, tuple[int, int, str]] = {
    1: (2, 20, "+-"),
    2: (3, 50, "+-"),
    3: (3, 99, "+-"),
    4: (4, 99, "+-"),
    5: (3, 20, "+-*"),
}


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    operators: tuple[str, ...]

    @property
    def text(self) -> str:
        out = str(self.operands[0])
        for op, x in zip(self.operators, self.operands[1:], strict=True):
            out += f"{op}{x}"
        return out

    def solution(self, rng: random.Random | None = None, noise: float = 0.0) -> tuple[str, int]:
        """Worked solution evaluated left to right; with ``noise`` each step's result is off by
        a small amount with that probability (and later steps build on the error)."""
        lines, value = [], self.operands[0]
        for op, x in zip(self.operators, self.operands[1:], strict=True):
            result = {"+": value + x, "-": value - x, "*": value * x}[op]
            if rng is not None and rng.random() < noise:
                result += rng.choice([-10, -2, -1, 1, 2, 10])
            lines.append(f"{value}{op}{x}={result}")
            value = result
        lines.append(f"Answer: {value}")
        return "\n".join(lines), value

    @property
    def answer(self) -> int:
        value = self.operands[0]
        for op, x in zip(self.operators, self.operands[1:], strict=True):
            value = {"+": value + x, "-": value - x, "*": value * x}[op]
        return value


def random_problem(rng: random.Random, level: int) -> Problem:
    if level not in LEVELS:
        raise ValueError(f"level: unknown {level}; valid: {sorted(LEVELS)}")
    count, largest, ops = LEVELS[level]
    operands = tuple(rng.randint(0, largest) for _ in range(count))
    operators = tuple(rng.choice(ops) for _ in range(count - 1))
    return Problem(operands, operators)


def in_test_split(text: str, test_fraction: float = 0.2) -> bool:
    """A question's split is a function of its text alone, so splits never overlap."""
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < test_fraction


def distinct_problems(n: int, split: str, draw, rng: random.Random, what: str) -> list:
    """``n`` distinct problems (by ``.text``) of ``split`` ("train" or "test") from ``draw(rng)``;
    a problem's split is a function of its text alone (:func:`in_test_split`)."""
    if split not in ("train", "test"):
        raise ValueError(f"split: 'train' or 'test', got {split!r}")
    seen: set[str] = set()
    out: list = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"{what} has too few distinct {split} problems for n={n}")
        p = draw(rng)
        if p.text in seen or in_test_split(p.text) != (split == "test"):
            continue
        seen.add(p.text)
        out.append(p)
    return out


def make_problems(n: int, split: str, seed: int = 0, level: int = 2) -> list[Problem]:
    """``n`` distinct problems of ``split`` ("train" or "test"), deterministic in the seed."""
    return distinct_problems(n, split, lambda rng: random_problem(rng, level),
                             random.Random(f"{seed}-{split}-{level}"), f"level {level}")


def make_questions(n: int, split: str, seed: int = 0, level: int = 2) -> list[Question]:
    """The split as :class:`Question` rows, ready for the trainer and the evaluator."""
    return [Question(id=f"{split}-{i}", problem=p.text, answer=str(p.answer),
                     source=f"arithmetic-L{level}")
            for i, p in enumerate(make_problems(n, split, seed, level))]
