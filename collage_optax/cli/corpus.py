"""Training text for ``collage-optax compare``: bytes, split deterministically.

The default corpus is the ``.py`` source of the running Python's standard
library (``sysconfig.get_paths()['stdlib']``): a few MB of real text that
every Python installation has, so nothing is downloaded. ``--corpus PATH``
takes a text file or a directory of text files instead.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["Corpus", "CorpusError", "load", "read", "split", "stdlib_files"]

# Directories left out of the default corpus: installed packages and test suites.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class CorpusError(ValueError):
  """A corpus that cannot be used (missing, empty, unreadable, too small)."""


class Corpus(NamedTuple):
  """Training and validation bytes (``uint8`` arrays) and where they came from."""

  train: np.ndarray
  val: np.ndarray
  source: str
  n_files: int


def stdlib_files(root: str | None = None) -> list[Path]:
  """The standard library's ``.py`` files, sorted, without site-packages or tests."""
  base = Path(root or sysconfig.get_paths()["stdlib"])
  if not base.is_dir():
    raise CorpusError(
      f"the Python standard library was not found at {base}; pass --corpus PATH "
      "with a text file or a directory of text files."
    )
  files: list[Path] = []
  for dirpath, dirnames, filenames in os.walk(base):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
  return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def _text_files(root: Path) -> list[Path]:
  """A directory's non-hidden files, recursively, in sorted order."""
  files: list[Path] = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    files.extend(Path(dirpath, f) for f in filenames if not f.startswith("."))
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_bytes(path: Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError as e:
    raise CorpusError(f"cannot read corpus file {path}: {e.strerror or e}.") from None


def _is_binary(data: bytes) -> bool:
  """NUL bytes in the first 8 KiB: the usual sign of a non-text file."""
  return b"\0" in data[:8192]


def read(path: str | None = None) -> tuple[bytes, str, int]:
  """All bytes of a corpus: ``(data, description, number of files)``.

  ``path=None`` reads the standard library's ``.py`` files. A file is read
  whole; a directory contributes every non-hidden text file under it (files
  with NUL bytes are skipped as binary), concatenated in sorted order.

  Raises:
    CorpusError: the path is missing, unreadable, or holds no text.
  """
  if path is None:
    files = stdlib_files()
    source = f"Python {sysconfig.get_python_version()} standard library ({sysconfig.get_paths()['stdlib']})"
  else:
    p = Path(path).expanduser()
    if not p.exists():
      raise CorpusError(f"--corpus {path}: no such file or directory.")
    if p.is_dir():
      files = _text_files(p)
    elif p.is_file():
      files = [p]
    else:
      raise CorpusError(f"--corpus {path}: not a regular file or a directory.")
    source = str(p)
  chunks = []
  for f in files:
    data = _read_bytes(f)
    if path is not None and p.is_dir() and _is_binary(data):
      continue
    chunks.append(data)
  data = b"".join(chunks)
  if not data:
    what = "has no text files" if path is not None and Path(path).is_dir() else "is empty"
    raise CorpusError(f"the corpus {source} {what}; pass --corpus PATH with some text.")
  return data, source, len(chunks)


def split(data: bytes, min_len: int, val_every: int = 10, block: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic train/validation split of ``data``.

  ``data`` is cut into blocks of ``block`` bytes (smaller for a small corpus,
  so there are at least ``2·val_every`` of them); every ``val_every``-th block
  (indices ``val_every-1, 2·val_every-1, ...``) is validation, the rest
  training: validation text is spread over the whole corpus and never seen in
  training.

  Raises:
    CorpusError: either part is shorter than ``min_len`` bytes (one window).
  """
  arr = np.frombuffer(data, np.uint8)
  block = max(1, min(block, len(arr) // (2 * val_every)))
  idx = np.arange(len(arr)) // block
  is_val = idx % val_every == val_every - 1
  train, val = arr[~is_val], arr[is_val]
  if min(len(train), len(val)) < min_len:
    raise CorpusError(
      f"the corpus has {len(arr)} bytes: too small for windows of {min_len} bytes "
      f"(training gets {len(train)}, validation {len(val)}). Use a larger corpus "
      f"(at least {min_len * 2 * val_every} bytes) or a smaller --context."
    )
  return train, val


def load(path: str | None, context: int) -> Corpus:
  """Reads and splits a corpus for windows of ``context + 1`` bytes."""
  data, source, n_files = read(path)
  train, val = split(data, context + 1)
  return Corpus(train, val, source, n_files)
