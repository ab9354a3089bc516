"""``load(name)``: a module of ``benchmarks/`` (a folder of scripts, not a package), for the tests."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
  """``benchmarks/<name>.py`` imported with ``benchmarks/`` on the path (its own imports: ``_common``, ...)."""
  sys.path.insert(0, str(BENCH))
  try:
    return importlib.import_module(name)
  finally:
    sys.path.remove(str(BENCH))
