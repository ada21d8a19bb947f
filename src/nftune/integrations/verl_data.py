"""nftune's question sets as the parquet files verl's ``RLHFDataset`` reads (needs no verl).

One row per question, in verl's schema:

    data_source   the set's name (routes verl's built-in scorers; nftune's reward ignores it)
    prompt        [{"role": "user", "content": <the template's text>}]; verl applies the
                  model's chat template itself
    ability       "math"
    reward_model  {"style": "rule", "ground_truth": <answer>}
    extra_info    {"index", "id", "split", "strategy"}: ``strategy`` is the verifier's answer
                  extraction matching the template, read by nftune's verl reward
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nftune.data import Question, format_prompt, load_questions, strategy_for


def verl_rows(questions: list[Question], template: str, data_source: str, split: str
              ) -> list[dict[str, Any]]:
    """verl rows for ``questions`` with the prompt ``template`` (not a ``chat`` one: verl
    applies the chat template)."""
    if template.startswith("chat"):
        raise ValueError(f"template: {template!r}: verl applies the chat template itself; give "
                         "the inner template (dapo, boxed or raw)")
    strategy = strategy_for(template)
    return [{
        "data_source": data_source,
        "prompt": [{"role": "user", "content": format_prompt(q.problem, template)}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(q.answer)},
        "extra_info": {"index": i, "id": str(q.id), "split": split, "strategy": strategy},
    } for i, q in enumerate(questions)]


def write_verl_parquet(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``rows`` as parquet atomically (temporary file, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)
    return path


def prepare_verl_data(train: str, val: list[str], output_dir: str | os.PathLike,
                      template: str = "dapo", val_template: str | None = None,
                      data_dir: str | None = None, train_limit: int | None = None
                      ) -> dict[str, Any]:
    """Load (and clean) the train set and validation sets with nftune's loaders, write
    ``train.parquet`` and ``val.parquet``; returns counts and the cleaning report. Validation
    sets default to ``nftune eval``'s template per benchmark (dapo for integer answers)."""
    from nftune.evaluate import benchmark_template

    out = Path(output_dir)
    train_set = load_questions(train, data_dir=data_dir, limit=train_limit)
    rows = verl_rows(train_set.questions, template, Path(train).stem, "train")
    write_verl_parquet(rows, out / "train.parquet")
    summary: dict[str, Any] = {"train": {"file": str(out / "train.parquet"), "rows": len(rows),
                                         "origin": train_set.origin,
                                         "cleaning": train_set.report.lines()}}
    if val:
        val_rows: list[dict[str, Any]] = []
        for name in val:
            qs = load_questions(name, data_dir=data_dir)
            set_name = Path(name).stem
            val_rows.extend(verl_rows(qs.questions, benchmark_template(set_name, val_template),
                                      set_name, "test"))
        write_verl_parquet(val_rows, out / "val.parquet")
        summary["val"] = {"file": str(out / "val.parquet"), "rows": len(val_rows), "sets": val}
    return summary
