"""Running the multi-device examples in subprocesses, once per test session.

JAX reads ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` when it
starts, so the 8-device checks run ``examples/*.py`` in subprocesses; this
process keeps its single device. Under pytest-xdist each worker would run a
module fixture again: :func:`shared_dir` runs the producer once per session
(the first worker to get there, under a file lock; the others wait for it and
read its files).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np

try:
  import fcntl
except ImportError:  # not POSIX: every worker produces its own copy.
  fcntl = None

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def command(script: str, *args: str, devices: int) -> tuple[list[str], dict[str, str]]:
  """argv and environment that run ``examples/<script>`` on ``devices`` CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return [sys.executable, str(EXAMPLES / script), *args], env


def check(proc, stdout: str, stderr: str) -> str:
  assert proc.returncode == 0, f"{' '.join(map(str, proc.args))} failed:\n{stdout}\n{stderr[-6000:]}"
  return stdout


def run_example(script: str, *args: str, devices: int = 8, timeout: int = 600) -> str:
  """Runs ``examples/<script>`` to completion; returns its stdout."""
  argv, env = command(script, *args, devices=devices)
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
  return check(proc, proc.stdout, proc.stderr)


def load_npz(path: Path) -> dict:
  """All arrays of an ``.npz`` file (closed after reading)."""
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@contextlib.contextmanager
def _locked(path: Path):
  with open(path, "w") as f:
    if fcntl is not None:
      fcntl.flock(f, fcntl.LOCK_EX)
    yield


def shared_dir(tmp_path_factory, name: str, produce: Callable[[Path], None]) -> Path:
  """A directory ``produce`` filled once in this session, shared by xdist workers."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER") and fcntl is not None:
    base = base.parent  # the session's directory, common to all workers
  out = base / f"shared-{name}"
  with _locked(base / f"shared-{name}.lock"):
    if not (out / "DONE").exists():
      shutil.rmtree(out, ignore_errors=True)  # a failed attempt's leftovers
      out.mkdir(parents=True)
      produce(out)
      (out / "DONE").write_text("ok")
  return out
