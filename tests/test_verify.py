"""The verifier: extraction by hand, the benchmarks' own golds, and inputs built to hang it."""

import json
import os
import random
import time
from pathlib import Path

import pytest

from nftune.verify import Verifier, extract_answer, fast_verdict

BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "bench"
SIX = ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"]
needs_bench = pytest.mark.skipif(not BENCH.exists(), reason="../shared/data/bench not present")


@pytest.fixture(scope="module")
def verifier():
    v = Verifier(workers=2, timeout_s=2.0)
    yield v
    v.close()


@pytest.mark.parametrize("text, strategy, expected", [
    ("so \\boxed{42}.", "auto", "42"),
    ("\\boxed{1} then \\boxed{\\frac{a}{b^{2}}}", "auto", "\\frac{a}{b^{2}}"),
    ("\\fbox{7}", "boxed", "7"),
    ("\\boxed 5$ end", "boxed", "5"),
    ("work\nAnswer: $12$", "auto", "12"),
    ("Answer: 3\nmore\n**Answer:** 45.", "answer_line", "45"),
    ("Answer: \\boxed{8}", "answer_line", "8"),
    ("cut off \\boxed{\\frac{1}{2", "auto", None),
    ("no answer here", "auto", None),
    ("Answer: 9", "boxed", None),
    ("\\boxed{3}\nAnswer: 9", "answer_line", "9"),
])
def test_extract_answer(text, strategy, expected):
    assert extract_answer(text, strategy) == expected


def test_fast_path_numbers():
    assert fast_verdict("1,000", "1000") is True
    assert fast_verdict("-3", "3") is False
    assert fast_verdict("2.50", "2.5") is True
    assert fast_verdict("0.333", "0.3333") is None  # different decimals: math-verify rounds
    assert fast_verdict("\\frac{1}{2}", "0.5") is None


def test_verdicts(verifier):
    cases = [
        ("The answer is \\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{\\dfrac{\\pi}{2}}", "\\frac{\\pi}{2}", True),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3, \\frac{\\pi}{2})", True),
        ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
        ("Answer: 17", "17", True),
        ("Answer: 18", "17", False),
        ("\\boxed{\\sqrt{2}}", "\\sqrt{3}", False),
        ("I think it is 5", "5", False),  # never committed to an answer
    ]
    out = verifier.verify([c[0] for c in cases], [c[1] for c in cases])
    assert out == [c[2] for c in cases]


def test_hostile_inputs_are_false_and_bounded(verifier):
    hostile = [
        "\\boxed{9^{9^{9^{9}}}}",
        "\\boxed{(x+1)^{200000}}",
        "x" * 1_000_000 + " \\boxed{17",
        "\\boxed{{{{{{{{{{",
        "\\boxed{1\x00+\x00}",
        "bad \udcff\udcfe utf \\boxed{\udcff}",
        "\\boxed{" + "(" * 5000 + "}",
    ]
    for text in hostile:
        start = time.monotonic()
        assert verifier.verify([text], ["5"]) == [False]
        assert time.monotonic() - start < verifier.timeout_s + 1.0 + 0.5  # + worker restart
    # and the pool still works afterwards
    assert verifier.verify(["\\boxed{\\frac{6}{4}}"], ["3/2"]) == [True]


def test_pool_survives_a_killed_worker(verifier):
    verifier.verify(["\\boxed{\\frac{1}{3}}"], ["1/3"])
    for w in verifier._pool:
        os.kill(w.proc.pid, 9)
    before = verifier.restarts
    out = verifier.verify(["\\boxed{\\frac{2}{6}}", "\\boxed{x+1}"], ["1/3", "1+x"])
    assert out == [True, True]
    assert verifier.restarts > before


def test_pool_survives_a_dead_worker_it_still_thinks_alive(verifier):
    """A killed worker can look alive until it is reaped; sending to it must not fail."""
    verifier.verify(["\\boxed{\\frac{1}{3}}"], ["1/3"])
    for w in verifier._pool:
        os.kill(w.proc.pid, 9)
        w.proc.join(timeout=5)
        w.proc.is_alive = lambda: True  # the lag, made certain
    before = verifier.restarts
    out = verifier.verify(["\\boxed{\\frac{2}{6}}", "\\boxed{x+1}"], ["1/3", "1+x"])
    assert out == [True, True]
    assert verifier.restarts >= before + 1


def test_bytes_responses_are_decoded(verifier):
    assert verifier.verify([b"\\boxed{12}\xff"], ["12"]) == [True]


@needs_bench
@pytest.mark.parametrize("name", SIX)
def test_benchmark_golds_verify_against_themselves(verifier, name):
    rows = [json.loads(line) for line in (BENCH / f"{name}.jsonl").open()]
    golds = [r["answer"] for r in rows]
    verdicts = verifier.verify([f"\\boxed{{{g}}}" for g in golds], golds)
    failing = [(r["id"], r["answer"]) for r, ok in zip(rows, verdicts, strict=True) if not ok]
    assert not failing


@needs_bench
def test_other_items_answers_almost_never_match(verifier):
    total, hits = 0, []
    for name in SIX:
        golds = [json.loads(line)["answer"] for line in (BENCH / f"{name}.jsonl").open()]
        other = golds[:]
        random.Random(0).shuffle(other)
        pairs = [(o, g) for o, g in zip(other, golds, strict=True) if o.strip() != g.strip()]
        verdicts = verifier.verify([f"\\boxed{{{o}}}" for o, _ in pairs], [g for _, g in pairs])
        total += len(pairs)
        hits += [p for p, ok in zip(pairs, verdicts, strict=True) if ok]
    # measured: 1 of 1,529 pairs ("+2" vs "2" in minerva, which are equal)
    assert len(hits) / total < 0.005, hits
