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
