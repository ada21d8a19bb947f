"""Question sets: loading by name or path, cleaning, prompt templates, and the order in which
training draws them (:class:`PromptSampler`).

Every loader returns :class:`Question` rows (``id``, ``problem``, ``answer``, ``source``).
Known names map to a Hugging Face hub copy and its schema; ``data_dir`` (or the environment
variable ``NFTUNE_DATA_DIR``) points them at local files ``<data_dir>/<name>.jsonl`` instead.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nftune.verify import MAX_ANSWER_CHARS

if TYPE_CHECKING:
    from pyarrow import Table as _Table


def _is_table(rows: object) -> bool:
    """A pyarrow Table (checked without importing pyarrow for the JSON paths)."""
    return type(rows).__name__ == "Table" and type(rows).__module__.startswith("pyarrow")


DATA_DIR_ENV = "NFTUNE_DATA_DIR"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# the longest problem of the six benchmarks and DAPO-Math-17k is 4,507 characters; a far longer
# one is a broken row (and a 50 MB prompt would take the tokenizer down with it)
MAX_PROBLEM_CHARS = 20_000



@dataclass(frozen=True)
class Question:
    id: str
    problem: str
    answer: str
    source: str
    # the row's other fields (e.g. ``numbers``, ``target``, ``tests``), for reward functions
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class HubSet:
    """Where a known set lives on the hub and how its rows are laid out."""

    repo: str
    split: str
    schema: str  # "plain" | "dapo" | "gsm8k" | "olympiad"
    config: str | None = None
    problem_key: str = "problem"
    answer_key: str = "answer"
    id_key: str | None = "id"


KNOWN_SETS: dict[str, HubSet] = {
    "dapo17k": HubSet("BytedTsinghua-SIA/DAPO-Math-17k", "train", "dapo"),
    "math500": HubSet("HuggingFaceH4/MATH-500", "test", "plain", id_key="unique_id"),
    "aime24": HubSet("HuggingFaceH4/aime_2024", "train", "plain"),
    "aime25": HubSet("math-ai/aime25", "test", "plain"),
    "amc23": HubSet("math-ai/amc23", "test", "plain", problem_key="question"),
    "olympiadbench": HubSet("Hothan/OlympiadBench", "train", "olympiad", "OE_TO_maths_en_COMP",
                            problem_key="question", answer_key="final_answer"),
    "minerva": HubSet("math-ai/minervamath", "test", "plain", problem_key="question", id_key=None),
    "gsm8k": HubSet("openai/gsm8k", "test", "gsm8k", "main", problem_key="question", id_key=None),
}

# DAPO-Math-17k wraps every problem in this instruction (its `prompt` field).
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response "
               "should be of the form Answer: $Answer (without quotes) where $Answer is the "
               "answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

TEMPLATES = {
    "dapo": DAPO_PREFIX + "{problem}" + DAPO_SUFFIX,
    "boxed": "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "raw": "{problem}",
}
# the verifier's extraction strategy for each template
TEMPLATE_STRATEGY = {"dapo": "answer_line", "boxed": "boxed", "raw": "auto"}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_questions(name_or_path: str, data_dir: str | os.PathLike | None = None,
                   clean: bool = True, limit: int | None = None) -> QuestionSet:
    """Load a question set by known name, local file path or hub dataset id.

    Args:
        name_or_path: a known name (``KNOWN_SETS``), a ``.jsonl``/``.json``/``.parquet`` file,
            or a hub dataset id ``org/name`` (optionally ``org/name:split``).
        data_dir: directory with ``<name>.jsonl`` files for known names (default: the
            ``NFTUNE_DATA_DIR`` environment variable); otherwise known names load from the hub.
        clean: apply :func:`clean_questions`.
        limit: keep the first ``limit`` questions after cleaning.
    """
    path = Path(name_or_path)
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        rows, origin, schema = _read_local(path), str(path), None
    elif name_or_path in KNOWN_SETS:
        spec = KNOWN_SETS[name_or_path]
        local = _find_local(name_or_path, data_dir)
        if local is not None:
            rows, origin, schema = _read_local(local), str(local), None
        else:
            rows, origin, schema = _read_hub(spec.repo, spec.config, spec.split), spec.repo, spec
    elif "/" in name_or_path and not path.exists():
        repo, _, split = name_or_path.partition(":")
        rows, origin, schema = _read_hub(repo, None, split or "train"), repo, None
    else:
        raise FileNotFoundError(f"{name_or_path}: no such file, and not a known set "
                                f"({', '.join(KNOWN_SETS)}) or hub id")
    if not len(rows):
        raise ValueError(f"{origin}: the question set is empty")
    if schema is None:
        first = rows.slice(0, 1).to_pylist() if _is_table(rows) else rows[:1]
        schema = HubSet("", "", _detect_schema(first))
    counts = None
    if _is_table(rows):  # columnar: identical questions are counted, not copied
        rows, counts, numbers = unique_rows(rows, schema) if clean else \
            (rows.to_pylist(), None, None)
    questions = [_normalise(row, schema, origin, (numbers[i] if counts else i) + 1)
                 for i, row in enumerate(rows)]
    report = CleaningReport(rows_in=sum(counts) if counts else len(questions))
    if clean:
        questions, report = clean_questions(questions, counts)
    if not questions:
        raise ValueError(f"{origin}: no questions left after cleaning")
    if limit is not None:
        questions = questions[:limit]
    return QuestionSet(questions, origin, report)


@dataclass
class QuestionSet:
    questions: list[Question]
    origin: str
    report: CleaningReport

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> Question:
        return self.questions[i]

    def __iter__(self):
        return iter(self.questions)


def _find_local(name: str, data_dir: str | os.PathLike | None) -> Path | None:
    if not data_dir:
        return None
    for suffix in LOCAL_SUFFIXES:
        candidate = Path(data_dir) / f"{name}{suffix}"
        if candidate.exists():
            return candidate
    return None


def _read_local(path: Path) -> list[dict] | _Table:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from None
        if isinstance(data, dict):  # {"data": [...]} or {"<split>": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows")
        return data
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: row {n}: invalid JSON ({err.msg})") from None
    return rows


def _read_hub(repo: str, config: str | None, split: str) -> _Table:
    import datasets

    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as err:  # offline, unknown repo, missing split
        raise FileNotFoundError(f"{repo}: cannot load from the hub ({type(err).__name__}: "
                                f"{err}); pass a local file or --data-dir") from None
    return dataset_table(ds)


def dataset_table(ds) -> _Table:
    """A ``datasets.Dataset``'s rows as one Arrow table (memory-mapped where the cache is)."""
    return ds.with_format("arrow")[:]


def _key_batches(table: _Table, schema: HubSet):
    """The raw (problems, answers) of ``table``'s rows as Python lists, a record batch at a
    time; None where the layout is not the expected one (the row-by-row path then reports
    the problem). Only one batch's strings are held at once."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = table.column_names
    if schema.schema == "dapo":
        if not {"prompt", "reward_model"} <= set(names):
            return None
        columns = ["prompt", "reward_model"]
    else:
        pkey = schema.problem_key if schema.problem_key in names else next(
            (k for k in _PROBLEM_KEYS if k in names), None)
        akey = schema.answer_key if schema.answer_key in names else next(
            (k for k in _ANSWER_KEYS if k in names), None)
        if pkey is None or akey is None:
            return None
        columns = [pkey, akey]

    def batches():
        for batch in table.select(columns).to_batches(max_chunksize=8192):
            first, second = batch.column(0), batch.column(1)
            if schema.schema == "dapo":
                if first.null_count or pc.min(pc.list_value_length(first)).as_py() < 1:
                    raise _LayoutError
                offsets = first.offsets.to_numpy()
                last = first.values.take(pa.array(offsets[1:] - 1))  # each prompt's last message
                first = pc.struct_field(last, "content")
                second = pc.struct_field(second, "ground_truth")
            yield first.to_pylist(), second.cast(pa.string()).to_pylist()

    return batches()


class _LayoutError(Exception):
    """A batch is not in the layout its schema describes."""


def unique_rows(table: _Table, schema: HubSet) -> tuple[list[dict], list[int] | None,
                                                         list[int] | None]:
    """The rows of ``table`` with each (problem, answer) pair once — the first occurrence, in
    order — with how often it occurs and its row index; only those rows become Python dicts
    (DAPO-Math-17k on the hub repeats each of its 17,917 rows 100 times), the others are read
    a batch at a time. Falls back to every row (counts None) where the columns are not the
    expected ones."""
    import pyarrow as pa

    keys = _key_batches(table, schema)
    if keys is None:
        return table.to_pylist(), None, None
    first: dict[tuple, int] = {}
    counts: dict[tuple, int] = {}
    row = 0
    try:
        for problems, answers in keys:
            for key in zip(problems, answers, strict=True):
                if key in counts:
                    counts[key] += 1
                else:
                    first[key], counts[key] = row, 1
                row += 1
    except (_LayoutError, KeyError, pa.ArrowException):
        return table.to_pylist(), None, None
    index = list(first.values())  # ascending: the order of first occurrence
    return _take_rows(table, index), [counts[k] for k in first], index


def _take_rows(table: _Table, index: list[int]) -> list[dict]:
    """The rows at ascending ``index`` as dicts, a record batch at a time (``Table.take``
    would first join each column's chunks into one copy)."""
    import bisect

    import pyarrow as pa

    rows: list[dict] = []
    start = 0
    for batch in table.to_batches():
        lo, hi = bisect.bisect_left(index, start), bisect.bisect_left(index, start + len(batch))
        if hi > lo:
            rows += batch.take(pa.array([i - start for i in index[lo:hi]])).to_pylist()
        start += len(batch)
    return rows


def _detect_schema(rows: list[dict]) -> str:
    first = rows[0] if rows and isinstance(rows[0], dict) else {}
    if isinstance(first.get("prompt"), list) and "reward_model" in first:
        return "dapo"
    if isinstance(first.get("final_answer"), list):
        return "olympiad"
    if "####" in str(first.get("answer", "")):
        return "gsm8k"
    return "plain"


_PROBLEM_KEYS = ("problem", "question", "prompt")
_ANSWER_KEYS = ("answer", "final_answer", "ground_truth", "gold")


def _normalise(row: Any, spec: HubSet, origin: str, n: int) -> Question:
    """One raw row of any supported schema → Question; errors name the file, row and field."""
    if not isinstance(row, dict):
        raise ValueError(f"{origin}: row {n}: expected an object, got {type(row).__name__}")
    where = f"{origin}: row {n}"
    if spec.schema == "dapo":
        messages = row.get("prompt")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: field 'prompt' must be a list of chat messages")
        problem = messages[-1].get("content") if isinstance(messages[-1], dict) else None
        answer = (row.get("reward_model") or {}).get("ground_truth")
        rid = (row.get("extra_info") or {}).get("index", n - 1)
        source = row.get("data_source") or origin
        used = ("prompt", "reward_model", "data_source")
        _require(problem, "prompt[-1].content", where)
        _require(answer, "reward_model.ground_truth", where)
    else:
        pkey = spec.problem_key if spec.problem_key in row else next(
            (k for k in _PROBLEM_KEYS if k in row), spec.problem_key)
        akey = spec.answer_key if spec.answer_key in row else next(
            (k for k in _ANSWER_KEYS if k in row), spec.answer_key)
        problem, answer = row.get(pkey), row.get(akey)
        _require(problem, pkey, where)
        _require(answer, akey, where)
        if spec.schema == "olympiad" and isinstance(answer, list):
            answer = re.sub(r"(?<!\\)\$", "", ",".join(map(str, answer)))  # unescaped $ only
        if spec.schema == "gsm8k":
            answer = str(answer).split("####")[-1].strip().replace(",", "")
        id_key = spec.id_key if spec.id_key in row else "id"
        rid = row.get(id_key, n - 1)
        source = row.get("source") or origin
        used = (pkey, akey, id_key, "source")
    if not isinstance(problem, str):
        raise ValueError(f"{where}: field 'problem' must be text, got {type(problem).__name__}")
    if not isinstance(answer, str):
        warnings.warn(f"{where}: non-string answer {answer!r} converted to text", stacklevel=3)
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)
        answer = str(answer)
    if not answer.strip():
        raise ValueError(f"{where}: field 'answer' is empty")
    for name, text, limit in (("problem", problem, MAX_PROBLEM_CHARS),
                              ("answer", answer, MAX_ANSWER_CHARS)):
        if len(text) > limit:
            raise ValueError(f"{where}: field '{name}' is {len(text):,} characters; the limit is "
                             f"{limit:,}")
    extra = {k: v for k, v in row.items() if k not in used and k != "extra"}
    if isinstance(row.get("extra"), dict):  # a Question written out as a row, read back
        extra = {**row["extra"], **extra}
    return Question(str(rid), problem, answer.strip(), str(source), extra)


def _require(value: Any, name: str, where: str) -> None:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: missing field '{name}'")


# ---------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------


@dataclass
class CleaningReport:
    rows_in: int = 0
    prefix_stripped: int = 0
    escapes_repaired: int = 0
    control_chars_dropped: int = 0
    duplicates_dropped: int = 0
    conflicts_dropped: int = 0
    conflict_ids: list[str] = field(default_factory=list)
    rows_out: int = 0

    def lines(self) -> list[str]:
        return [f"{k}: {v}" for k, v in asdict(self).items() if k != "conflict_ids"] + (
            [f"conflicting ids: {', '.join(self.conflict_ids[:20])}"
             + (" ..." if len(self.conflict_ids) > 20 else "")] if self.conflict_ids else [])


# JSON escapes that turned a LaTeX command's backslash into a control character:
# "\frac" → "\x0crac", "\beta" → "\x08eta", "\times" → "\trimes"-style TAB, "\right" → "\rright".
_ESCAPE_DAMAGE = {"\x0c": "\\f", "\x08": "\\b", "\x07": "\\a", "\x0b": "\\v"}
_TAB_COMMANDS = ("times", "triangle", "text", "theta", "tan", "tau", "tfrac", "to", "top",
                 "tilde", "textbf", "textit", "textrm")
_CR_COMMANDS = ("right", "rho", "rangle", "rfloor", "rceil", "rm")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def repair_text(text: str) -> tuple[str, int, int]:
    """Undo JSON-escape damage to LaTeX and drop other control characters.

    Returns (text, repaired escapes, dropped control characters).
    """
    repaired = 0
    for char, escape in _ESCAPE_DAMAGE.items():
        n = text.count(char)
        if n:
            text, repaired = text.replace(char, escape), repaired + n
    for char, escape, commands in (("\t", "\\t", _TAB_COMMANDS), ("\r", "\\r", _CR_COMMANDS)):
        if char in text:
            pattern = re.compile(re.escape(char) + "(" + "|".join(
                c[1:] for c in sorted(commands, key=len, reverse=True)) + r")(?![a-z])")
            text, n = pattern.subn(lambda m, e=escape: e + m.group(1), text)
            repaired += n
    text, dropped = _CONTROL.subn("", text.replace("\r\n", "\n"))
    return text, repaired, dropped


def strip_dapo_prompt(problem: str) -> tuple[str, bool]:
    """Remove DAPO-Math-17k's instruction prefix and reminder suffix, if present."""
    stripped = False
    if problem.startswith(DAPO_PREFIX):
        problem, stripped = problem[len(DAPO_PREFIX):], True
    if problem.endswith(DAPO_SUFFIX):
        problem, stripped = problem[: -len(DAPO_SUFFIX)], True
    return problem.strip(), stripped


def clean_questions(questions: Iterable[Question], counts: list[int] | None = None
                    ) -> tuple[list[Question], CleaningReport]:
    """Strip the DAPO prompt, repair escapes, drop duplicates and conflicting answers.
    ``counts``: how many times each question occurred in the source (its identical copies
    were not materialised); the report counts every copy."""
    questions = list(questions)
    counts = counts or [1] * len(questions)
    report = CleaningReport(rows_in=sum(counts))
    fixed = []
    for q, n in zip(questions, counts, strict=True):
        problem, stripped = strip_dapo_prompt(q.problem)
        problem, repaired, dropped = repair_text(problem)
        answer, repaired_a, dropped_a = repair_text(q.answer)
        report.prefix_stripped += stripped * n
        report.escapes_repaired += (repaired + repaired_a) * n
        report.control_chars_dropped += (dropped + dropped_a) * n
        fixed.append(Question(q.id, problem, answer.strip(), q.source, q.extra))
    answers: dict[str, set[str]] = defaultdict(set)
    ids: dict[str, list[str]] = defaultdict(list)
    for q in fixed:
        answers[q.problem].add(q.answer)
        ids[q.problem].append(q.id)
    conflicting = {p for p, a in answers.items() if len(a) > 1}
    for p in sorted(conflicting, key=lambda p: ids[p][0]):
        report.conflict_ids.extend(ids[p])
    if conflicting:
        warnings.warn(f"dropped {len(conflicting)} problems that appear with conflicting answers "
                      f"(ids {', '.join(report.conflict_ids[:10])}"
                      f"{' ...' if len(report.conflict_ids) > 10 else ''})", stacklevel=2)
    seen: set[str] = set()
    kept = []
    for q, n in zip(fixed, counts, strict=True):
        if q.problem in conflicting:
            report.conflicts_dropped += n
        elif q.problem in seen:
            report.duplicates_dropped += n
        else:
            seen.add(q.problem)
            kept.append(q)
            report.duplicates_dropped += n - 1
    report.rows_out = len(kept)
    return kept, report


# ---------------------------------------------------------------------------------------------
# Prompt templates
# ---------------------------------------------------------------------------------------------


def _split_template(template: str) -> tuple[bool, str]:
    chat, _, inner = template.partition(":") if template.startswith("chat") else ("", "", template)
    if chat:
        inner = inner or "boxed"
    if chat not in ("", "chat") or inner not in TEMPLATES:
        valid = list(TEMPLATES) + ["chat", "chat:dapo", "chat:boxed", "chat:raw"]
        raise ValueError(f"template: unknown {template!r}; valid: {valid}")
    return bool(chat), inner


class ChatText(str):
    """Text the tokenizer's chat template wrote: it holds its own special tokens (BOS and the
    like), so it is encoded as ``apply_chat_template`` encodes it, adding none."""


def format_prompt(problem: str, template: str = "dapo", tokenizer: Any = None) -> str:
    """The prompt for one problem. ``chat`` / ``chat:<inner>`` wraps the inner template (default
    ``boxed``) in the tokenizer's chat template as one user message (a :class:`ChatText`)."""
    chat, inner = _split_template(template)
    text = TEMPLATES[inner].format(problem=problem)
    if not chat:
        return text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"template: {template!r} needs a tokenizer with a chat template")
    return ChatText(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                  tokenize=False, add_generation_prompt=True))


def strategy_for(template: str) -> str:
    """The verifier's extraction strategy matching a prompt template."""
    return TEMPLATE_STRATEGY[_split_template(template)[1]]


def summary(qs: QuestionSet) -> dict[str, Any]:
    """Counts for `nftune data inspect`."""
    lengths = sorted(len(q.problem) for q in qs)
    return {
        "origin": qs.origin,
        "questions": len(qs),
        "sources": dict(Counter(q.source for q in qs).most_common(5)),
        "problem_chars_median": lengths[len(lengths) // 2],
        "integer_answers": sum(bool(re.fullmatch(r"-?\d+", q.answer)) for q in qs),
    }


class PromptSampler:
    """A seeded order over the questions, reshuffled each epoch, resumable from its state."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._permutation()
