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

import json
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


STAMP = "nftune_verl_data.json"  # the options the parquet files were written with


def _options(train: str, val: list[str], template: str, val_template: str | None,
             data_dir: str | None, train_limit: int | None) -> dict[str, Any]:
    from nftune import __version__

    return {"train": train, "val": val, "template": template,
            "val_template": val_template or template, "data_dir": data_dir,
            "train_limit": train_limit, "nftune": __version__}


def is_up_to_date(output_dir: str | os.PathLike, options: dict[str, Any]) -> bool:
    """True if ``output_dir`` holds parquet files written with exactly ``options``."""
    out = Path(output_dir)
    try:
        stamp = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return False
    files = [out / "train.parquet"] + ([out / "val.parquet"] if options["val"] else [])
    return stamp == options and all(f.exists() for f in files)


def prepare_verl_data(train: str, val: list[str], output_dir: str | os.PathLike,
                      template: str = "boxed", val_template: str | None = None,
                      data_dir: str | None = None, train_limit: int | None = None,
                      if_changed: bool = False) -> dict[str, Any]:
    """Load (and clean) the train set and validation sets with nftune's loaders, write
    ``train.parquet`` and ``val.parquet`` and, last, a stamp of the options used; returns
    counts and the cleaning report (``{"up_to_date": True}`` alone when ``if_changed`` and the
    stamp matches). Validation sets take the training template unless ``val_template`` is
    given: verl wraps both in the same chat template."""
    out = Path(output_dir)
    options = _options(train, val, template, val_template, data_dir, train_limit)
    if if_changed and is_up_to_date(out, options):
        return {"up_to_date": True, "output_dir": str(out)}
    (out / STAMP).unlink(missing_ok=True)  # a crash below leaves no stamp that lies
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
            val_rows.extend(verl_rows(qs.questions, options["val_template"], set_name, "test"))
        write_verl_parquet(val_rows, out / "val.parquet")
        summary["val"] = {"file": str(out / "val.parquet"), "rows": len(val_rows), "sets": val}
    (out / STAMP).write_text(json.dumps(options, indent=1))
    return summary
