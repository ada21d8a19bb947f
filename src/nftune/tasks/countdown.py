"""Countdown: reach a target with the given numbers and + − × ÷, each number used once.

A question reads ``24 from 8 5 3``; an answer ends with an ``Answer: <expression>`` line, e.g.
``Answer: (8-5)*3``. The expression is checked by :func:`check_expression`: parsed with
Python's ``ast`` (never evaluated by Python), only integer literals, + − × ÷ and parentheses
allowed, the literals must be exactly the given numbers (each used once), and the value —
computed with exact fractions — must equal the target. Anything else (a call, a name, a power,
a division by zero, an expression over ``MAX_EXPRESSION_CHARS``) is wrong, in time linear in
the text's length.

Worked solutions for the base model's warm-up combine the numbers in the order given, one step
per line like the arithmetic task, and end with the parenthesised expression::

    8-5=3
    3*3=9
    Answer: (8-5)*3
"""

from __future__ import annotations

import ast
import random
from dataclasses import dataclass
from fractions import Fraction

from nftune.data import Question
from nftune.tasks.arithmetic import distinct_problems

MAX_EXPRESSION_CHARS = 200
_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
# difficulty level → (count of numbers, largest number, operators the generator uses)
LEVELS: dict[int, tuple[int, int, str]] = {1: (3, 9, "+-"), 2: (3, 9, "+-*"), 3: (4, 12, "+-*")}


# ---------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------


def _value(node: ast.AST, literals: list[int]) -> Fraction:
    """The exact value of an allowed expression node; collects its integer literals. Raises
    ValueError for anything not allowed."""
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _value(node.left, literals), _value(node.right, literals)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise ValueError("division by zero")
        return left / right
    raise ValueError(f"not allowed: {type(node).__name__}")


def check_expression(expression: str, numbers: list[int], target: int) -> bool:
    """True iff ``expression`` uses exactly ``numbers`` (each once) with + − × ÷ and
    parentheses, and equals ``target``."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        return False
    expression = expression.replace("×", "*").replace("÷", "/").replace("−", "-").strip()
    if expression.count("(") > 50:  # ast.parse's own nesting limit is far above this
        return False
    try:
        tree = ast.parse(expression, mode="eval")
        literals: list[int] = []
        # the literals are checked before the size of anything is at stake: at most 200
        # characters of small integers under + − × ÷ stay small
        value = _value(tree.body, literals)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return sorted(literals) == sorted(numbers) and value == target


def countdown_reward(responses: list[str], rows: list[dict]) -> list[float]:
    """nftune's reward-function signature: 1.0 where the response's last ``Answer:`` line is an
    expression reaching ``row["target"]`` with ``row["numbers"]``."""
    from nftune.verify import extract_answer

    out = []
    for response, row in zip(responses, rows, strict=True):
        expression = extract_answer(response, "answer_line")
        ok = expression is not None and check_expression(
            expression, [int(n) for n in row["numbers"]], int(row["target"]))
        out.append(float(ok))
    return out


# ---------------------------------------------------------------------------------------------
# Problems and worked solutions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]
    operators: tuple[str, ...]  # the generator's solution: numbers combined in order

    @property
    def target(self) -> int:
        value = self.numbers[0]
        for op, x in zip(self.operators, self.numbers[1:], strict=True):
            value = {"+": value + x, "-": value - x, "*": value * x}[op]
        return value

    @property
    def text(self) -> str:
        return f"{self.target} from {' '.join(map(str, self.numbers))}"

    @property
    def answer(self) -> int:
        return self.target

    def solution(self, rng: random.Random | None = None, noise: float = 0.0) -> tuple[str, int]:
        """Worked solution combining the numbers in order; with ``noise`` each operator is
        replaced by another with that probability (a wrong but well-formed attempt)."""
        ops = list(self.operators)
        for i in range(len(ops)):
            if rng is not None and rng.random() < noise:
                ops[i] = rng.choice([o for o in "+-*" if o != ops[i]])
        lines, value, expression = [], self.numbers[0], str(self.numbers[0])
        for i, (op, x) in enumerate(zip(ops, self.numbers[1:], strict=True)):
            result = {"+": value + x, "-": value - x, "*": value * x}[op]
            lines.append(f"{value}{op}{x}={result}")
            value = result
            expression = f"{expression}{op}{x}" if i == 0 else f"({expression}){op}{x}"
        lines.append(f"Answer: {expression}")
        return "\n".join(lines), value


def make_problems(n: int, split: str, seed: int = 0, level: int = 2) -> list[Problem]:
    """``n`` distinct problems of ``split`` ("train" or "test"), deterministic in the seed;
    a question's split is a function of its text."""
    if level not in LEVELS:
        raise ValueError(f"level: unknown {level}; valid: {sorted(LEVELS)}")
    count, largest, ops = LEVELS[level]

    def draw(rng: random.Random) -> Problem:
        return Problem(tuple(rng.randint(1, largest) for _ in range(count)),
                       tuple(rng.choice(ops) for _ in range(count - 1)))

    return distinct_problems(n, split, draw, random.Random(f"countdown-{seed}-{split}-{level}"),
                             f"level {level}")


def make_questions(n: int, split: str, seed: int = 0, level: int = 2) -> list[Question]:
    """The split as :class:`Question` rows with ``numbers`` and ``target`` for the reward."""
    return [Question(id=f"{split}-{i}", problem=p.text, answer=str(p.target),
                     source=f"countdown-L{level}",
                     extra={"numbers": list(p.numbers), "target": p.target})
            for i, p in enumerate(make_problems(n, split, seed, level))]
