"""Helpers shared by test files."""

import contextlib
import io
from dataclasses import dataclass


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args) -> CliResult:
    """``nftune ARGS`` in this process (where a separate process is not what is tested): exit
    code and captured output, as a subprocess would give them."""
    from nftune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


# a few-second run on the tiny base and the arithmetic files (conftest's fixtures)
TINY_RUN = dict(template="raw", steps=3, prompts_per_step=4, answers_per_prompt=4,
                max_new_tokens=24, lr=1e-3, warmup_steps=1, minibatches=2, save_every=0,
                verify_workers=1)


def tiny_run_values(model, files, out=None, **overrides) -> dict:
    """The settings every trainer test starts from, ``overrides`` on top (no output_dir when
    ``out`` is None)."""
    values = dict(model=str(model), train_data=str(files["train"]), **TINY_RUN)
    if out is not None:
        values["output_dir"] = str(out)
    values.update(overrides)
    return values


def tiny_run_config(model, files, out, **overrides):
    """:func:`tiny_run_values` as a validated TrainConfig."""
    from nftune.config import build_config

    return build_config(None, tiny_run_values(model, files, out, **overrides))


# what differs between two runs of the same computation: wall-clock figures
TIMING_KEYS = {"time_generate_s", "time_verify_s", "time_update_s", "tokens_per_s",
               "time_step_s", "time_old_logprobs_s"}


def same_runs(a: list[dict], b: list[dict]) -> bool:
    """Two runs' metrics rows are the same but for the timings (and as many)."""
    def untimed(row: dict) -> dict:
        return {k: v for k, v in row.items() if k not in TIMING_KEYS}

    return len(a) == len(b) and all(untimed(x) == untimed(y) for x, y in zip(a, b, strict=True))
