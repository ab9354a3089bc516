"""Shared pytest fixtures of the test suite.

Where the test helpers live:

* ``conftest.py`` (this file): fixtures, which pytest hands to any test that
  names them as an argument:

  - ``tree_bits``: a pytree's leaves as raw bytes, to assert "bit for bit".
  - ``run_with_excess_precision``: reruns a script in a fresh Python process
    with ``XLA_FLAGS=--xla_allow_excess_precision=<true|false>`` (XLA reads its
    flags once, when JAX starts, so a flag needs a new process).

* ``reference.py``: float64 references in numpy (AdamW, EMAs, ulps), no
  ``jax``: the yardstick the library is measured against (the benchmarks
  import it too).
* ``strategies.py``: inputs: hypothesis strategies of floats drawn as bit
  patterns, and seeded gradient streams (``gradient_stream``).
* ``multidevice.py``: the examples run once per session in subprocesses with 8
  simulated CPU devices.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import pytest


def _tree_bits(tree) -> list[bytes]:
  """Every array leaf of ``tree`` as raw bytes (``None`` leaves skipped): equal iff bit-identical."""
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.fixture
def tree_bits() -> Callable[[object], list[bytes]]:
  """``tree_bits(tree)``: the leaves' raw bytes; ``tree_bits(a) == tree_bits(b)`` iff bit-identical."""
  return _tree_bits


@pytest.fixture
def run_with_excess_precision(tmp_path: Path):
  """``run(script, inputs, excess) -> (outputs, stdout)``.

  Saves ``inputs`` (a dict of numpy arrays) to ``in.npz``, runs ``script`` with
  ``python -c script in.npz out.npz`` in a fresh process whose ``XLA_FLAGS``
  add ``--xla_allow_excess_precision=<excess>``, asserts that it exits 0 and
  returns what it saved in ``out.npz`` (a dict of arrays) and its stdout.

  XLA's excess precision lets a chain of bfloat16 ops run in float32 and skip
  the intermediate roundings; error-free transformations are only exact if
  every rounding happens, so the numerics are checked with it on and off.
  """

  def run(script: str, inputs: dict[str, np.ndarray], excess: str) -> tuple[dict[str, np.ndarray], str]:
    src, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(src, **inputs)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_allow_excess_precision={excess}").strip()
    proc = subprocess.run([sys.executable, "-c", script, str(src), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out) as got:
      return dict(got), proc.stdout

  return run


@pytest.fixture(scope="module")
def accel():
  """``benchmarks/accelerators.py`` (deviceless GPU/TPU compiles), or a skip naming what is missing."""
  import bench  # tests/bench.py: benchmarks/ modules by name

  module = bench.load("accelerators")
  why = module.unavailable()
  if why:
    pytest.skip(why)
  return module
