"""Question loading for every hub schema (fixtures written here), cleaning, templates, errors."""

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nftune import data
from nftune.data import (
    DAPO_PREFIX,
    DAPO_SUFFIX,
    KNOWN_SETS,
    Question,
    clean_questions,
    format_prompt,
    load_questions,
    strategy_for,
)

BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "bench"

# One or two rows per known set, laid out like that set's hub copy.
HUB_FIXTURES = {
    "dapo17k": [{"data_source": "math_dapo",
                 "prompt": [{"role": "user", "content": DAPO_PREFIX + "What is 1+\x0crac{2}{2}?"
                             + DAPO_SUFFIX}],
                 "ability": "MATH", "reward_model": {"ground_truth": "2", "style": "rule"},
                 "extra_info": {"index": "a1"}}],
    "math500": [{"problem": "Find $x$.", "solution": "...", "answer": "\\frac{1}{2}",
                 "subject": "Algebra", "level": 2, "unique_id": "test/algebra/1.json"}],
    "aime24": [{"id": 60, "problem": "AIME?", "solution": "s", "answer": "204", "url": "u",
                "year": "2024"}],
    "aime25": [{"problem": "AIME 25?", "answer": "70", "id": "0"}],
    "amc23": [{"id": 0, "question": "AMC?", "answer": 27.0, "url": "u"}],
    "olympiadbench": [{"id": 1606, "question": "Oly?", "solution": ["s"],
                       "final_answer": ["$69$,$84$"], "context": None, "is_multiple_answer": True}],
    "minerva": [{"question": "Telescope?", "answer": "1.6"}],
    "gsm8k": [{"question": "Ducks?", "answer": "16 - 3 = 13\n#### 1,450"}],
}
EXPECTED = {
    "dapo17k": ("a1", "What is 1+\\frac{2}{2}?", "2"),
    "math500": ("test/algebra/1.json", "Find $x$.", "\\frac{1}{2}"),
    "aime24": ("60", "AIME?", "204"),
    "aime25": ("0", "AIME 25?", "70"),
    "amc23": ("0", "AMC?", "27"),
    "olympiadbench": ("1606", "Oly?", "69,84"),
    "minerva": ("0", "Telescope?", "1.6"),
    "gsm8k": ("0", "Ducks?", "1450"),
}


@pytest.mark.parametrize("name", list(HUB_FIXTURES))
def test_known_names_load_their_hub_schema(monkeypatch, name):
    calls = []

    def fake_load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        return datasets.Dataset.from_list(HUB_FIXTURES[name])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.warns(UserWarning) if name == "amc23" else _no_warning():
        qs = load_questions(name)
    spec = KNOWN_SETS[name]
    assert calls == [(spec.repo, spec.config, spec.split)]
    q = qs[0]
    assert (q.id, q.problem, q.answer) == EXPECTED[name]


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_dapo_schema_from_a_local_parquet_file(tmp_path):
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(HUB_FIXTURES["dapo17k"] * 2), path)
    qs = load_questions(str(path))
    assert len(qs) == 1 and qs.report.duplicates_dropped == 1
    assert qs[0].problem == "What is 1+\\frac{2}{2}?"
    assert qs.report.prefix_stripped == 2 and qs.report.escapes_repaired == 2


def test_json_and_jsonl_files(tmp_path):
    rows = [{"id": "1", "problem": "p1", "answer": "3"}, {"question": "p2", "answer": 4}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for f in ["a.json", "a.jsonl"]:
        with pytest.warns(UserWarning, match="non-string answer"):
            qs = load_questions(str(tmp_path / f))
        assert [(q.problem, q.answer) for q in qs] == [("p1", "3"), ("p2", "4")]


def test_data_dir_points_known_names_at_local_files(tmp_path, monkeypatch):
    (tmp_path / "aime24.jsonl").write_text(json.dumps({"id": "x", "problem": "p", "answer": "1"}))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub used"))
    assert load_questions("aime24", data_dir=tmp_path)[0].id == "x"
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert load_questions("aime24")[0].id == "x"


def test_cleaning_counts_by_hand():
    qs = [
        Question("1", DAPO_PREFIX + "A \x0crac{1}{2}" + DAPO_SUFFIX, "1", "s"),
        Question("2", "A \\frac{1}{2}", "1", "s"),  # duplicate of 1 once repaired
        Question("3", "B\x01 \x08eta", "2", "s"),  # control char dropped, \beta restored
        Question("4", "C", "5", "s"),
        Question("5", "C", "6", "s"),  # conflicts with 4: both dropped
        Question("6", "D \tfrac{1}{2} and \text", "7", "s"),
    ]
    with pytest.warns(UserWarning, match="conflicting answers"):
        kept, report = clean_questions(qs)
    assert [q.id for q in kept] == ["1", "3", "6"]
    assert kept[0].problem == "A \\frac{1}{2}"
    assert kept[1].problem == "B \\beta"
    assert kept[2].problem == "D \\tfrac{1}{2} and \\text"
    assert (report.rows_in, report.rows_out) == (6, 3)
    assert report.prefix_stripped == 1
    assert report.escapes_repaired == 4
    assert report.control_chars_dropped == 1
    assert report.duplicates_dropped == 1
    assert report.conflicts_dropped == 2 and report.conflict_ids == ["4", "5"]


@pytest.mark.skipif(not (BENCH / "dapo17k.jsonl").exists(), reason="no shared data")
def test_real_dapo17k_cleaning():
    with pytest.warns(UserWarning):
        qs = load_questions(str(BENCH / "dapo17k.jsonl"))
    r = qs.report
    assert r.rows_in == 17917
    assert not any("\x0c" in q.problem for q in qs)
    # SOURCES.md: 17,290 distinct problem strings, 11 of them with conflicting answers
    assert r.conflicts_dropped >= 22 and 17_000 < r.rows_out < 17_290
    assert r.rows_out + r.duplicates_dropped + r.conflicts_dropped == r.rows_in


def test_bad_input_names_file_row_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_questions(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl.*empty"):
        load_questions(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: row 2: missing field 'answer'"):
        load_questions(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "a", "answer": "1"}\n{"problem": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl: row 2: invalid JSON"):
        load_questions(str(broken))
    with pytest.raises(FileNotFoundError, match="not a known set"):
        load_questions("no_such_set")


def test_templates_and_strategies():
    assert format_prompt("2+2?", "raw") == "2+2?"
    assert format_prompt("2+2?", "dapo") == DAPO_PREFIX + "2+2?" + DAPO_SUFFIX
    assert format_prompt("2+2?", "boxed").endswith("within \\boxed{}.")
    assert strategy_for("dapo") == "answer_line"
    assert strategy_for("boxed") == strategy_for("chat") == "boxed"
    assert strategy_for("chat:dapo") == "answer_line"
    with pytest.raises(ValueError, match="template"):
        format_prompt("x", "fancy")


def test_chat_template_wraps_the_inner_prompt():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return f"<user>{messages[0]['content']}</user><assistant>"

    out = format_prompt("2+2?", "chat:dapo", Tok())
    assert out == f"<user>{DAPO_PREFIX}2+2?{DAPO_SUFFIX}</user><assistant>"
    with pytest.raises(ValueError, match="chat template"):
        format_prompt("2+2?", "chat", object())


@pytest.mark.skipif(not (BENCH / "dapo17k.jsonl").exists(), reason="no shared data")
def test_hub_copy_of_dapo17k_repeated_as_on_the_hub_cleans_to_the_same_questions(monkeypatch):
    """The hub's DAPO-Math-17k has ~1.79 M rows: the 17,917 rows repeated (100 ×, each with its
    own index). Loaded by name, 400 real rows laid out like that copy and repeated 25 × (in
    the hub's order: the whole set, then the whole set again) clean to exactly the questions
    the same 400 rows give as a flat file — the second method — and the report counts the
    repeats as duplicates."""
    rows = [json.loads(line) for line in
            (BENCH / "dapo17k.jsonl").read_text().splitlines()[:400]]
    hub = [{"data_source": "math_dapo",
            "prompt": [{"role": "user", "content": DAPO_PREFIX + r["problem"] + DAPO_SUFFIX}],
            "ability": "MATH", "reward_model": {"ground_truth": r["answer"], "style": "rule"},
            "extra_info": {"index": f"{copy}-{r['id']}"}}
           for copy in range(25) for r in rows]
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda repo, config=None, split=None: datasets.Dataset.from_list(hub))
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # conflicting answers, if any, are warned about
        from_hub = load_questions("dapo17k")
        flat = clean_questions([Question(r["id"], r["problem"], r["answer"], "flat")
                                for r in rows])[0]
    assert [(q.problem, q.answer) for q in from_hub] == [(q.problem, q.answer) for q in flat]
    assert [q.id for q in from_hub] == [f"0-{q.id}" for q in flat]  # first copy kept
    report = from_hub.report
    assert report.rows_in == 25 * 400 and report.prefix_stripped == 25 * 400
    assert report.duplicates_dropped >= 24 * 400 - report.conflicts_dropped


def test_rows_keep_their_other_fields_for_reward_functions(tmp_path):
    path = tmp_path / "countdown.jsonl"
    path.write_text(json.dumps({"id": "c1", "problem": "Reach 24 with 3 5 8", "answer": "24",
                                "numbers": [3, 5, 8], "target": 24, "tests": ["t1"]}) + "\n")
    q = load_questions(str(path))[0]
    assert q.extra == {"numbers": [3, 5, 8], "target": 24, "tests": ["t1"]}
    # a Question written out as a row (json of its fields) reads back with the same extra
    again = tmp_path / "again.jsonl"
    again.write_text(json.dumps(q.__dict__) + "\n")
    assert load_questions(str(again))[0].extra == q.extra
    dapo = load_questions(_write_parquet(tmp_path, HUB_FIXTURES["dapo17k"]))[0]
    assert dapo.extra == {"ability": "MATH", "extra_info": {"index": "a1"}}


def _write_parquet(tmp_path, rows) -> str:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_verl_data_writes_again_only_when_its_options_change(arithmetic_files, tmp_path):
    """`nftune verl-data --if-changed` (the recipe's launch script runs it before every launch)
    keeps files written with the same options and rewrites them when an option differs, so a
    directory made earlier with another template is never trained on silently."""
    from helpers import run_cli

    out = tmp_path / "verl"
    base = ["verl-data", "--train", arithmetic_files["train"], "--val", arithmetic_files["test"],
            "--output-dir", out, "--if-changed"]

    def strategies(name: str) -> set[str]:
        return {row["strategy"] for row in
                pq.read_table(out / name).column("extra_info").to_pylist()}

    assert run_cli(*base).returncode == 0
    # the default template is the recipe's (boxed), for validation too
    assert strategies("train.parquet") == strategies("val.parquet") == {"boxed"}
    stamp = json.loads((out / "nftune_verl_data.json").read_text())
    assert stamp["template"] == stamp["val_template"] == "boxed"
    written = (out / "train.parquet").stat().st_mtime_ns

    again = run_cli(*base)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert (out / "train.parquet").stat().st_mtime_ns == written

    other = run_cli(*base, "--template", "dapo")
    assert other.returncode == 0 and "up to date" not in other.stdout
    assert strategies("train.parquet") == strategies("val.parquet") == {"answer_line"}
    assert json.loads((out / "nftune_verl_data.json").read_text())["template"] == "dapo"


def _hub_layout_rows(copies: int) -> list[dict]:
    """DAPO-Math-17k's hub layout (prompt as chat messages with the DAPO instruction,
    reward_model.ground_truth), each question repeated ``copies`` times as on the hub, with a
    problem that has two answers and one with JSON-escape damage."""
    problems = [(f"What is {i} + {i}?", str(2 * i)) for i in range(30)]
    problems += [("Find x if x = 3.", "3"), ("Find x if x = 3.", "4"),  # a conflict
                 ("Compute \x0crac{1}{2} + \x0crac{1}{2}.", "1")]  # \frac damaged
    rows = []
    for _ in range(copies):
        for problem, answer in problems:
            rows.append({"data_source": "math_dapo",
                         "prompt": [{"role": "user",
                                     "content": data.DAPO_PREFIX + problem + data.DAPO_SUFFIX}],
                         "ability": "MATH",
                         "reward_model": {"ground_truth": answer, "style": "rule-lighteval"},
                         "extra_info": {"index": str(len(rows))}})
    return rows


def test_hub_layout_with_repeats_loads_as_the_row_by_row_path(tmp_path, monkeypatch):
    """The columnar loader (each repeated question materialised once) gives the questions and
    the cleaning report the row-by-row path gives on the same rows, from a parquet file and
    from a datasets.Dataset as the hub returns it."""
    rows = _hub_layout_rows(copies=5)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the conflict warning
        by_row = load_questions(str(jsonl))
        columnar = load_questions(str(parquet))
        monkeypatch.setattr(datasets, "load_dataset",
                            lambda *a, **k: datasets.Dataset.from_parquet(str(parquet)))
        from_hub = load_questions("dapo17k")
    assert from_hub.origin == "BytedTsinghua-SIA/DAPO-Math-17k"
    # by hand: 33 rows × 5 copies in, the conflicting pair out, 31 questions kept
    assert by_row.report.rows_in == 165 and len(by_row) == 31
    assert by_row.report.duplicates_dropped == 31 * 4 and by_row.report.conflicts_dropped == 10
    for loaded in (columnar, from_hub):
        assert [(q.id, q.problem, q.answer) for q in loaded] == \
            [(q.id, q.problem, q.answer) for q in by_row]
        ours, theirs = asdict(loaded.report), asdict(by_row.report)
        # the conflicting problem's rows are named once each (the ids of their first copies),
        # not once per copy
        assert ours.pop("conflict_ids") == ["30", "31"]
        assert set(theirs.pop("conflict_ids")) >= {"30", "31"}
        assert ours == theirs
    assert "\\frac{1}{2}" in by_row[-1].problem
