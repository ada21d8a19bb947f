"""Every command a user can copy from README.md, docs/ and examples/ parses as written.

The ``nftune`` lines of every shell block are run through the CLI's own parser (and, for
``train`` / ``compare``, through the config's validation of ``--key value`` pairs), which is
what a user's shell would reach first; the commands that finish in seconds on CPU
(``objectives``, ``data inspect`` on the bundled test data, every sub-command's ``--help``)
are run for real.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = sorted((ROOT / "examples").rglob("*.sh"))
SHELL_BLOCK = re.compile(r"```(?:bash|sh|shell|console)\n(.*?)```", re.S)
# a page's Python example that a command then uses starts with its file name: "# my_file.py"
NAMED_FILE = re.compile(r"```python\n# (\w+\.py)\n(.*?)```", re.S)
NFTUNE = re.compile(r"^(?:\S*/)?nftune\s")


def _shell_lines(text: str) -> list[str]:
    """Logical lines (continuations joined, comments dropped) of ``text``, split at ``&&``."""
    text = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        out.extend(part.strip() for part in line.split("&&") if part.strip())
    return out


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for block in SHELL_BLOCK.findall(page.read_text()):
            found += [(page.name, c) for c in _shell_lines(block) if NFTUNE.match(c)]
    for script in SCRIPTS:
        found += [(script.name, c) for c in _shell_lines(script.read_text()) if NFTUNE.match(c)]
    return found


COMMANDS = documented_commands()


def test_the_docs_have_commands_to_check():
    pages = {page for page, _ in COMMANDS}
    assert {"README.md", "training.md", "evaluation.md", "compare.md", "demo.md",
            "scale.md"} <= pages, pages
    assert len(COMMANDS) >= 30


def _argv(command: str) -> list[str]:
    """The command's arguments; ``...`` (a placeholder for the rest of a command) and shell
    variables' quoting are dropped."""
    argv = shlex.split(command)[1:]
    return [a for a in argv if a != "..."]


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_documented_command_parses(page, command, monkeypatch, tmp_path):
    from nftune import objectives
    from nftune.cli import build_parser
    from nftune.config import build_config, parse_overrides

    # a page's example may register an objective: only for this test
    monkeypatch.setattr(objectives, "OBJECTIVES", dict(objectives.OBJECTIVES))
    for name, code in NAMED_FILE.findall((ROOT / "docs" / page).read_text()
                                         if page.endswith(".md") and page != "README.md"
                                         else ""):
        (tmp_path / name).write_text(code)  # the page's own example file, as a user saves it
    monkeypatch.chdir(tmp_path)
    argv = _argv(command)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as err:  # argparse's way of saying "invalid"
        pytest.fail(f"{page}: `{command}` does not parse (exit {err.code})")
    assert getattr(args, "func", None), f"{page}: `{command}` names no sub-command"
    if not getattr(args, "takes_extra", False):
        assert not extra, f"{page}: `{command}`: unknown arguments {extra}"
        return
    overrides = parse_overrides(extra)
    if args.command == "train":
        for key in ("model", "train_data", "algo", "steps", "output_dir", "seed"):
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
    if args.command == "compare" and args.sweep:
        key, _, values = args.sweep.partition("=")
        overrides[key] = values.split(",")[0]
    overrides.setdefault("model", "m")
    overrides.setdefault("train_data", "d")
    if overrides.get("rollout_engine") == "vllm":
        pytest.importorskip("vllm")
    cfg = build_config(None, overrides)  # every key exists, every value has its type, combos
    from nftune.plan import KNOWN_SHAPES, parse_memory, plan_run, read_shape

    if args.command == "train" and cfg.model.lower() in KNOWN_SHAPES and cfg.device == "cuda":
        # a one-GPU command the docs give must fit the largest common card by the fit check
        plan = plan_run(cfg, read_shape(cfg.model), "cuda", parse_memory("80GB"))
        assert plan.fits, f"{page}: `{command}` does not fit an 80 GB card:\n{plan.report()}"
    from nftune.reward import Reward, parse_reward_spec

    files = [t.target.rpartition(":")[0] for t in parse_reward_spec(cfg.reward)]
    if all(not f.endswith(".py") or Path(f).exists() for f in files):  # not a placeholder
        Reward(verifier=object(), spec=cfg.reward).close()  # the functions import and exist


@pytest.mark.parametrize("sub", ["objectives", "demo", "compare", "eval", "train", "data",
                                 "verl-data", "plan", "push"])
def test_every_sub_command_has_help(sub, capsys):
    from nftune.cli import main

    with pytest.raises(SystemExit) as err:
        main([sub, "--help"])
    assert err.value.code == 0
    assert "usage: nftune" in capsys.readouterr().out


def test_defaults_the_help_states_are_the_code_defaults(capsys):
    """`nftune demo --help` once said 40 steps while the demo ran 80."""
    from nftune.cli import main
    from nftune.demo import DemoSettings

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    settings = DemoSettings()
    assert f"rollout steps (default {settings.steps})" in text
    assert f"task difficulty 1-5 (default {settings.base.level})" in text


QUICK = [(p, c) for p, c in COMMANDS if _argv(c)[:1] == ["objectives"]
         or _argv(c)[:2] == ["data", "inspect"]]


@pytest.mark.parametrize("page,command", QUICK, ids=[f"{p}:{c[:60]}" for p, c in QUICK])
def test_documented_quick_commands_run(page, command, monkeypatch, capsys):
    """The documented commands that take seconds run as written, from the repository root
    (where the docs' ../shared/data/bench paths point)."""
    from nftune.cli import main

    argv = _argv(command)
    if argv[0] == "data" and "--data-dir" not in argv:
        pytest.skip("loads the set from the hub (no network in tests)")
    data_dir = next((a for a in argv if "shared/data" in a), None)
    if data_dir and not (ROOT / data_dir).is_dir():
        pytest.skip(f"{data_dir}: this project's own data copy is not here")
    monkeypatch.chdir(ROOT)
    assert main(argv) == 0, f"{page}: `{command}` failed"
    assert capsys.readouterr().out.strip()


def test_fit_tables_are_the_fit_checks_own():
    """README's and docs/gpu.md's fit tables are nftune.plan's output, not written by hand."""
    from nftune.plan import fit_markdown

    table = fit_markdown()
    for page in (ROOT / "README.md", ROOT / "docs" / "gpu.md"):
        assert table in page.read_text(), f"{page.name}: regenerate the fit table"
