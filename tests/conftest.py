"""Shared fixtures: a tiny base model that answers the arithmetic task some of the time."""

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 1-layer Qwen2 taught level-1 arithmetic for a few dozen steps (seconds on CPU)."""
    from nftune.tasks.base_model import BaseSpec, build_base_model

    spec = BaseSpec(level=1, hidden=32, layers=1, heads=2, train_problems=300, noise=0.2,
                    sft_steps=150, batch_size=32, lr=1e-2)
    return build_base_model(tmp_path_factory.mktemp("base") / "model", spec)


@pytest.fixture(scope="session")
def arithmetic_files(tmp_path_factory) -> dict[str, Path]:
    from nftune.tasks.arithmetic import make_questions

    root = tmp_path_factory.mktemp("arith")
    out = {}
    for split, n in (("train", 200), ("test", 16)):
        out[split] = root / f"{split}.jsonl"
        out[split].write_text("".join(json.dumps(q.__dict__) + "\n"
                                      for q in make_questions(n, split, 0, 1)))
    return out



@pytest.fixture(autouse=True)
def _registries_restored():
    """Whatever a test registers (objectives, prompt weights, plugin modules) is gone after it,
    so no test passes or fails because of the order the files run in."""
    import sys

    from nftune.objectives import OBJECTIVES, PROMPT_WEIGHTS

    saved = dict(OBJECTIVES), dict(PROMPT_WEIGHTS)
    modules = {name for name in sys.modules if name.startswith("nftune_plugin_")}
    yield
    for registry, before in zip((OBJECTIVES, PROMPT_WEIGHTS), saved, strict=True):
        registry.clear()
        registry.update(before)
    for name in [n for n in sys.modules if n.startswith("nftune_plugin_") and n not in modules]:
        del sys.modules[name]
