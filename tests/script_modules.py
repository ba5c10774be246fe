"""Importing a script that is not a package module (bench/*.py, tools/*.py) by its path, in tests.

Example:
    reproduce = load_script("reproduce_bench", ROOT / "bench" / "reproduce.py")
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(name: str, path: Path) -> ModuleType:
    """The module at ``path``, registered as ``name`` (dataclasses look their module up while a class is built)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
