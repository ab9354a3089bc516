"""Static checks: ruff (lint and format) and mypy on collage_optax/ and benchmarks/, as configured in pyproject.toml.

Each runs the checker from this interpreter's environment (``python -m ruff``,
``python -m mypy``) in the repository root, so the ``[tool.ruff]`` and
``[tool.mypy]`` sections apply, the files they cover included. A check whose tool is not installed is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(module: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> None:
  if importlib.util.find_spec(module) is None:
    pytest.skip(f"{module} is not installed (pip install -e '.[test]')")
  cmd = [sys.executable, "-m", module, *args]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
  assert proc.returncode == 0, f"`{' '.join(cmd[1:])}` exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


def test_ruff_check():
  _run("ruff", "check", "--no-cache")


def test_ruff_format():
  _run("ruff", "format", "--check", "--no-cache")


def test_mypy(tmp_path_factory):
  # The files, options and strictness come from [tool.mypy]; the cache goes to a
  # per-session temporary directory, so the run leaves nothing in the tree.
  cache = tmp_path_factory.mktemp("mypy_cache")
  env = {**os.environ, "MYPY_CACHE_DIR": str(cache)}
  _run("mypy", "--config-file", str(ROOT / "pyproject.toml"), timeout=600, env=env)
