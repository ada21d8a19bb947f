"""User code named in a config: Python modules or ``.py`` files imported before a run, so that
what they register (objectives) is known to the config, the loop and the CLI.

Only code a user names is imported; nothing in a run directory is ever executed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def import_plugin(name: str) -> ModuleType:
    """Import ``name``: a module path (``mypkg.objectives``) or a ``.py`` file. A file is
    imported once per absolute path (a second call returns the same module), so what it
    registers is registered once."""
    name = name.strip()
    if not name.endswith(".py"):
        try:
            return importlib.import_module(name)
        except ImportError as err:
            raise ValueError(f"plugins: cannot import {name!r} ({err})") from None
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"plugins: {name}: no such file")
    key = f"nftune_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module


def import_plugins(names: str) -> list[ModuleType]:
    """Every comma-separated module or file of ``names`` ("" for none)."""
    return [import_plugin(n) for n in names.split(",") if n.strip()]
