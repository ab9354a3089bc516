"""Inputs for the tests (numpy + ml_dtypes only): hypothesis strategies for the
MCF numerics, and the seeded gradient streams of the optimizer tests.

(Fixtures are in ``conftest.py``, float64 references in ``reference.py``.)

Floats are drawn as raw bit patterns of their format (sign + magnitude bits),
so every finite value is reachable: signed zeros, subnormals, the largest
finite number, and huge/tiny ratios between operands. Magnitudes never exceed
the largest finite pattern, so no NaN or Inf is ever drawn; operations that
overflow are masked by the tests themselves.

Each example is a batch: hypothesis draws a seed for numpy's generator (bulk
elements, vectorised and cheap) and the first ``PINNED`` elements' bit patterns
itself, so that it can steer and shrink those.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import ml_dtypes
import numpy as np
from hypothesis import strategies as st


class Format(NamedTuple):
  """An IEEE-style binary format: ``p`` significant bits, exponents ``[emin, emax]``."""

  name: str
  dtype: np.dtype
  uint: np.dtype
  p: int
  emin: int
  emax: int

  @property
  def nmant(self) -> int:
    return self.p - 1

  @property
  def bias(self) -> int:
    return -self.emin + 1

  @property
  def max_bits(self) -> int:
    """Magnitude bit pattern of the largest finite number."""
    return ((2 * self.bias) << self.nmant) | ((1 << self.nmant) - 1)

  @property
  def sign_bit(self) -> int:
    return 1 << (8 * self.dtype.itemsize - 1)

  @property
  def one_bits(self) -> int:
    return self.bias << self.nmant


BF16 = Format("bfloat16", np.dtype(ml_dtypes.bfloat16), np.dtype(np.uint16), 8, -126, 127)
F16 = Format("float16", np.dtype(np.float16), np.dtype(np.uint16), 11, -14, 15)
F32 = Format("float32", np.dtype(np.float32), np.dtype(np.uint32), 24, -126, 127)
FORMATS = (BF16, F16, F32)


def from_bits(fmt: Format, magnitude, negative) -> np.ndarray:
  """Floats of ``fmt`` from magnitude bit patterns and sign flags."""
  bits = np.asarray(magnitude, np.int64) | np.where(negative, fmt.sign_bit, 0)
  return bits.astype(fmt.uint).view(fmt.dtype)


@functools.lru_cache(maxsize=None)
def magnitudes(fmt: Format, max_bits: int | None = None) -> st.SearchStrategy[int]:
  """Magnitude bit patterns, uniform plus the format's landmarks."""
  top = fmt.max_bits if max_bits is None else max_bits
  landmarks = [
      0, 1, 2,                                  # zero, smallest subnormals
      (1 << fmt.nmant) - 1,                     # largest subnormal
      1 << fmt.nmant, (1 << fmt.nmant) + 1,     # smallest normals
      fmt.one_bits - 1, fmt.one_bits, fmt.one_bits + 1,
      top - 1, top,
  ]
  return st.one_of(st.integers(0, top), st.sampled_from([m for m in landmarks if m <= top]))


PINNED = 2  # leading elements whose bit patterns hypothesis draws itself


@functools.lru_cache(maxsize=None)
def seeds() -> st.SearchStrategy[np.random.Generator]:
  """numpy generators from hypothesis-drawn seeds (for the bulk of a batch)."""
  return st.integers(0, 2**64 - 1).map(np.random.default_rng)


@functools.lru_cache(maxsize=None)
def pinned(fmt: Format, k: int = PINNED) -> st.SearchStrategy[tuple[np.ndarray, np.ndarray]]:
  """``k`` magnitude bit patterns and sign flags chosen (and shrunk) by hypothesis."""
  return st.tuples(
      st.lists(magnitudes(fmt), min_size=k, max_size=k).map(lambda m: np.array(m, np.int64)),
      st.lists(st.booleans(), min_size=k, max_size=k).map(lambda s: np.array(s, bool)),
  )


def raw_magnitudes(fmt: Format, rng: np.random.Generator, n: int, top: int | None = None) -> np.ndarray:
  """Uniform magnitude bit patterns (every binade equally likely: huge/tiny
  ratios, subnormals) with ~1/8 landmarks (zero, subnormal edges, 1, max)."""
  top = fmt.max_bits if top is None else top
  m = rng.integers(0, top + 1, n)
  marks = np.array([0, 1, (1 << fmt.nmant) - 1, 1 << fmt.nmant, fmt.one_bits, top])
  marks = marks[marks <= top]
  return np.where(rng.random(n) < 1 / 8, rng.choice(marks, n), m)


def _signs(rng, n):
  return rng.random(n) < 0.5


def _pin(mags, signs, pins):
  if pins is not None:
    k = pins[0].size
    mags[:k], signs[:k] = pins
  return mags, signs


def sum_batch(fmt: Format, rng: np.random.Generator, n: int, pins_a=None, pins_b=None):
  """``(a, b)``: finite floats of ``fmt``. A third of the ``b`` have ``a``'s
  magnitude or a neighbour's (exact cancellation, ties), a third lie within a
  few binades of ``a`` (``b`` just below ``ulp(a)``), the rest are independent
  (huge/tiny ratios)."""
  a = raw_magnitudes(fmt, rng, n)
  reach = (fmt.p + 3) << fmt.nmant
  kind = rng.integers(0, 3, n)
  delta = np.where(kind == 0, rng.integers(-8, 9, n), rng.integers(-reach, reach + 1, n))
  b = np.where(kind == 2, raw_magnitudes(fmt, rng, n), np.clip(a + delta, 0, fmt.max_bits))
  a, sa = _pin(a, _signs(rng, n), pins_a)
  b, sb = _pin(b, _signs(rng, n), pins_b)
  return from_bits(fmt, a, sa), from_bits(fmt, b, sb)


def product_batch(fmt: Format, rng: np.random.Generator, n: int, pins_a=None, pins_b=None):
  """``(a, b)``: finite floats of ``fmt``; half the pairs have a product near
  ``2**t``, ``t`` anywhere from below the subnormals to the overflow threshold,
  the rest are independent."""
  a = raw_magnitudes(fmt, rng, n)
  b_free = raw_magnitudes(fmt, rng, n)
  t = rng.integers(fmt.emin - fmt.p - 2, fmt.emax + 2, n)
  b_exp = np.clip(2 * fmt.bias - (a >> fmt.nmant) + t, 0, 2 * fmt.bias)
  b_aimed = (b_exp << fmt.nmant) | (b_free & ((1 << fmt.nmant) - 1))
  b = np.where(rng.random(n) < 0.5, b_aimed, b_free)
  a, sa = _pin(a, _signs(rng, n), pins_a)
  b, sb = _pin(b, _signs(rng, n), pins_b)
  return from_bits(fmt, a, sa), from_bits(fmt, b, sb)


def below_ulp(hi: np.ndarray, fmt: Format, rng: np.random.Generator) -> np.ndarray:
  """A second component for ``hi`` with ``|lo| <= ulp(hi)/2``.

  ``lo = ±|hi|·(1 + f)·2**-(p + 1 + gap)``, ``f`` in ``[0, 1)``, ``gap`` 0 (``lo``
  next to ``hi``'s last bit) or up to ``3p`` binades lower, or ``lo = 0``;
  rounded to ``fmt``. ``|hi|·2·2**-(p+1) <= ulp(hi)/2`` is representable (or
  below half the smallest subnormal), so rounding keeps the bound.
  """
  n = hi.shape[0]
  gap = np.where(rng.random(n) < 0.5, 0, rng.integers(0, 3 * fmt.p + 1, n))
  lo = np.abs(hi.astype(np.float64)) * (1.0 + rng.random(n)) * np.exp2(-(fmt.p + 1.0 + gap))
  lo = np.where(_signs(rng, n), -lo, lo)
  lo = np.where(rng.random(n) < 1 / 8, 0.0, lo)
  return lo.astype(np.float32).astype(fmt.dtype)


def mcf_batch(fmt: Format, rng: np.random.Generator, n: int, headroom: int = 3, pins=None):
  """Normalised MCFs ``(hi, lo)`` of ``fmt`` with ``|hi| < 2**(emax + 1 - headroom)``."""
  top = ((2 * fmt.bias - headroom) << fmt.nmant) - 1
  mags, signs = _pin(raw_magnitudes(fmt, rng, n, top), _signs(rng, n), pins)
  hi = from_bits(fmt, np.minimum(mags, top), signs)
  return hi, below_ulp(hi, fmt, rng)


def grow_increments(fmt: Format, hi: np.ndarray, lo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """float32 increments ``b`` for ``grow((hi, lo), b)``: zero crossings
  (``b ≈ -(hi + lo)``, exactly or within ``2**-30`` relative), ``b`` up to
  ``2**12`` times ``|hi|``, ``b`` far below ``ulp(hi)``, unrelated values and 0."""
  n = hi.shape[0]
  x = hi.astype(np.float64) + lo.astype(np.float64)
  sign = np.where(_signs(rng, n), -1.0, 1.0)
  eps = np.where(rng.random(n) < 0.3, 0.0, np.exp2(-rng.integers(0, 31, n).astype(np.float64)) * sign)
  crossing = -x * (1.0 + eps)
  shift = rng.integers(-3 * fmt.p - 10, 13, n).astype(np.float64)
  scaled = np.where(x == 0, 1.0, x) * rng.uniform(0.5, 2.0, n) * np.exp2(shift) * sign
  top = int(np.float32(2.0 ** (fmt.emax - 3)).view(np.uint32))
  free = from_bits(F32, raw_magnitudes(F32, rng, n, top), _signs(rng, n)).astype(np.float64)
  kind = rng.integers(0, 4, n)
  b = np.select([kind == 0, kind == 1, kind == 2], [crossing, scaled, free], 0.0)
  with np.errstate(over="ignore"):
    b = b.astype(np.float32)
  limit = np.float32(2.0 ** (fmt.emax - 2))
  return np.where(np.abs(b) < limit, b, np.float32(0.0)).astype(np.float32)


# Hypothesis strategies: a seeded bulk plus PINNED elements hypothesis steers.


@functools.lru_cache(maxsize=None)
def sum_operands(fmt: Format, n: int = 64) -> st.SearchStrategy:
  return st.tuples(seeds(), pinned(fmt), pinned(fmt)).map(lambda t: sum_batch(fmt, t[0], n, t[1], t[2]))


@functools.lru_cache(maxsize=None)
def product_operands(fmt: Format, n: int = 64) -> st.SearchStrategy:
  return st.tuples(seeds(), pinned(fmt), pinned(fmt)).map(lambda t: product_batch(fmt, t[0], n, t[1], t[2]))


@functools.lru_cache(maxsize=None)
def mcf_operands(fmt: Format, n: int = 64) -> st.SearchStrategy:
  return st.tuples(seeds(), pinned(fmt)).map(lambda t: mcf_batch(fmt, t[0], n, pins=t[1]))


def mcf_lows(fmt: Format, hi: np.ndarray) -> st.SearchStrategy[np.ndarray]:
  return seeds().map(lambda rng: below_ulp(hi, fmt, rng))


def increments(fmt: Format, hi: np.ndarray, lo: np.ndarray) -> st.SearchStrategy[np.ndarray]:
  return seeds().map(lambda rng: grow_increments(fmt, hi, lo, rng))


@functools.cache
def backend_flushing() -> tuple[bool, bool]:
  """(DAZ, FTZ) of this backend's float32 arithmetic: whether it reads / writes subnormals as 0."""
  import jax  # pylint: disable=import-outside-toplevel

  t = np.float32(2.0**-127)
  daz = float(jax.jit(lambda a, b: a + b)(t, t)) == 0.0  # 2**-126 is normal
  ftz = float(jax.jit(lambda a, b: a * b)(np.float32(2.0**-63), np.float32(2.0**-64))) == 0.0
  return daz, ftz


# Seeded gradient streams: a small model's params and gradients, fixed once per seed.

#: How :func:`gradient_stream` initialises each leaf it knows (in this order of draws).
_LEAVES = {
    "gain": lambda rng: np.ones(16),                   # a LayerNorm gain at 1.0
    "w": lambda rng: rng.normal(0.0, 0.5, (8, 8)),     # a weight matrix
    "h": lambda rng: rng.normal(0.0, 0.5, (8,)),       # a vector (kept in float16 by some tests)
    "b": lambda rng: rng.normal(0.0, 0.1, (8,)),       # a bias
}


@functools.lru_cache(maxsize=None)
def _gradient_stream(dtypes: tuple[tuple[str, np.dtype], ...], steps: int, seed: int):
  rng = np.random.default_rng(seed)
  p0 = {k: _LEAVES[k](rng) for k, _ in dtypes}
  grads = [{k: 0.5 + rng.normal(0.0, 1.0, v.shape) for k, v in p0.items()} for _ in range(steps)]
  held = lambda t: {k: np.asarray(v, np.float64).astype(dt).astype(np.float64)
                    for (k, v), (_, dt) in zip(t.items(), dtypes)}
  return held(p0), [held(g) for g in grads]


def gradient_stream(dtypes: dict, steps: int, seed: int = 0):
  """``(params0, grads)``: initial params and ``steps`` gradients (mean 0.5, so
  the params drift), as dicts of float64 arrays holding values of each leaf's
  dtype in ``dtypes`` (keys among ``gain``, ``w``, ``h``, ``b``; their order is
  the order of the draws). Cached: treat the arrays as read-only."""
  key = tuple((k, np.dtype(d)) for k, d in dtypes.items())
  return _gradient_stream(key, steps, seed)
