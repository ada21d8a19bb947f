"""Loading DAPO-Math-17k in its hub layout: 1.79 M rows (each of 17,917 questions 100 times),
time and peak memory, the row-by-row path against the columnar one.

Usage: python benchmarks/hub_scale_data.py [--data-dir ../shared/data/bench] [--copies 100]

Builds the hub's layout once from the offline copy (prompt as chat messages carrying the DAPO
instruction, reward_model.ground_truth, extra_info.index unique per row) as a parquet file,
opens it as the hub hands it over (``datasets``: a memory-mapped Arrow table), then, each in a
fresh process so that peak memory is its own:

  rows     every row as a Python dict (``Dataset.to_list()``), normalised, then cleaned — how
           ``nftune`` loaded the hub before;
  columnar ``nftune.data.load_questions`` as it is: duplicates counted in Arrow, one Python
           row per distinct question.

Targets (issue 29): columnar <= 60 s and <= 2 GB peak on the 2-core machine. The peak is the
process's resident set (ru_maxrss), which counts the pages of ``datasets``' memory-mapped Arrow
cache that were read; the split at the end separates them from the process's own memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def build(data_dir: Path, copies: int, out: Path) -> Path:
    """The hub layout of DAPO-Math-17k, ``copies`` repeats of the offline copy's rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nftune.data import DAPO_PREFIX, DAPO_SUFFIX

    path = out / f"dapo17k-hub-x{copies}.parquet"
    if path.exists():
        return path
    rows = [json.loads(x) for x in (data_dir / "dapo17k.jsonl").read_text().splitlines() if x]
    one = pa.Table.from_pylist([{
        "data_source": "math_dapo",
        "prompt": [{"content": DAPO_PREFIX + r["problem"] + DAPO_SUFFIX, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": r["answer"], "style": "rule-lighteval"},
    } for r in rows])
    n = len(one) * copies
    table = pa.concat_tables([one] * copies).append_column(
        "extra_info", pa.array([{"index": f"{i:08d}"} for i in range(n)]))
    pq.write_table(table, path)
    return path


def run(path: str, mode: str) -> None:
    """One measurement, in this (fresh) process; prints one JSON line."""
    import datasets

    from nftune import data

    datasets.disable_progress_bars()
    start = time.perf_counter()
    import tempfile

    # a fresh cache: the conversion to Arrow that a first download pays is measured too
    ds = datasets.load_dataset("parquet", data_files=path, split="train",
                               cache_dir=tempfile.mkdtemp(prefix="nftune-hub-cache-"))
    opened = time.perf_counter() - start
    if mode == "rows":
        spec = data.KNOWN_SETS["dapo17k"]
        rows = ds.to_list()
        questions = [data._normalise(r, spec, "hub", i + 1) for i, r in enumerate(rows)]
        kept, report = data.clean_questions(questions)
    else:
        kept, report = _columnar(ds)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    status = {line.split(":")[0]: int(line.split()[1]) * 1024
              for line in Path("/proc/self/status").read_text().splitlines()
              if line.startswith(("RssAnon", "RssFile"))}
    print(json.dumps({"mode": mode, "rows_in": report.rows_in, "questions": len(kept),
                      "duplicates": report.duplicates_dropped,
                      "conflicts": report.conflicts_dropped, "open_s": opened,
                      "seconds": elapsed, "peak_bytes": peak,
                      "anon_end": status.get("RssAnon"), "file_end": status.get("RssFile")}))


def _columnar(ds):
    """load_questions("dapo17k") on the hub, with ``ds`` as what the hub returned."""
    import datasets

    from nftune.data import load_questions

    real = datasets.load_dataset
    datasets.load_dataset = lambda *a, **k: ds
    try:
        loaded = load_questions("dapo17k", data_dir=None)
    finally:
        datasets.load_dataset = real
    return loaded.questions, loaded.report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/bench")
    parser.add_argument("--copies", type=int, default=100)
    parser.add_argument("--work", default="/tmp/nftune-hub-scale")
    parser.add_argument("--only", choices=["rows", "columnar"], default=None)
    parser.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._run:
        run(*args._run)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    path = build(Path(args.data_dir), args.copies, work)
    print(f"hub layout: {path} ({path.stat().st_size / 1e6:.0f} MB, built or found in "
          f"{time.perf_counter() - started:.0f} s)")
    results = {}
    for mode in [args.only] if args.only else ["columnar", "rows"]:
        done = subprocess.run([sys.executable, __file__, "--_run", str(path), mode],
                              capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1",
                                                                   "PATH": "/usr/bin:/bin",
                                                                   "HOME": "/tmp"})
        if done.returncode:
            print(f"{mode}: failed\n{done.stderr[-2000:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results[mode] = r
        print(f"{mode:9s} {r['rows_in']:>9,} rows -> {r['questions']:,} questions "
              f"({r['duplicates']:,} duplicates, {r['conflicts']:,} conflicting rows dropped): "
              f"{r['seconds']:.1f} s (opening {r['open_s']:.1f} s), "
              f"peak {r['peak_bytes'] / 2**30:.2f} GiB (at the end: "
              f"{r['anon_end'] / 2**30:.2f} GiB own + {r['file_end'] / 2**30:.2f} GiB of the "
              "memory-mapped Arrow cache)")
    if "columnar" in results:
        r = results["columnar"]
        ok = r["seconds"] <= 60 and r["peak_bytes"] <= 2 * 2**30
        print(f"targets (<= 60 s, <= 2 GiB): {'met' if ok else 'NOT met'}")
    if len(results) == 2:
        a, b = results["rows"], results["columnar"]
        print(f"rows / columnar: time {a['seconds'] / b['seconds']:.1f}x, "
              f"peak memory {a['peak_bytes'] / b['peak_bytes']:.1f}x")


if __name__ == "__main__":
    main()
