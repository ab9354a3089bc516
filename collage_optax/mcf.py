"""Multi-component floats (MCF) and error-free transformations: the number type and its reference arithmetic.

The optimizers store values in formats (:mod:`collage_optax.formats`) and
compute one float32 expression per step; the ``mcf`` format's encode gives
the bits of :func:`from_float`. :func:`grow`, :func:`add` and :func:`mul` are
the paper's MCF arithmetic as a small reference library (each error-free
step rounded explicitly), tested against float64.

An MCF is the unevaluated sum ``hi + lo`` of two floats of one storage dtype,
normalised so that ``|lo| <= ulp(hi) / 2``. Two bfloat16 components carry about
16 significant bits instead of 8; two float16 components about 22.

All arithmetic is done on a *wider* type (float32 for 16-bit storage) and every
operation is rounded explicitly to the storage precision with
:func:`round_to`, which uses ``jax.lax.reduce_precision`` (and an exact
integer-rounding path for float16 subnormals). XLA must honour
``reduce_precision``, so the compensation terms survive whatever XLA does with
excess precision (``--xla_allow_excess_precision``), on every backend. Because
float32 has ``24 >= 2 * 8 + 2`` (bfloat16) and ``24 >= 2 * 11 + 2`` (float16)
significant bits, a float32 ``+ - *`` followed by one rounding to the storage
precision is *the* correctly rounded storage-precision result (double rounding
is innocuous, Figueroa 1995), i.e. ``⊕ ⊖ ⊗`` exactly as IEEE defines them.
float32 storage uses native float32 arithmetic, with the products of
:func:`two_prod` split by bit masks so that fused multiply-adds cannot change
them.

Subnormals: XLA on CPU and TPU reads float32 subnormal operands as zero (DAZ) and
flushes subnormal float32 results to zero (FTZ). For bfloat16 and float32
storage ``two_prod`` is therefore exact whenever the operands, the rounded
product and its exact error are zero or at least the smallest normal
``2**-126``; ``two_sum`` and ``fast_two_sum`` are exact whenever each operand is
zero or at least ``2**(p - 127)`` (``2**-119`` for bfloat16, ``2**-103`` for
float32), since every intermediate value is then a multiple of ``2**-126``.
(Closer to the threshold an intermediate below ``2**-126`` can be flushed
although the operands, the result and its error are normal:
``two_sum(-1.8e-37, -1.2e-35)`` in bfloat16 misses by ``8e-39``.) Otherwise a
subnormal operand is read as (signed) zero -- so ``two_prod`` of a subnormal
and any number returns zeros -- and ``s + e`` misses the exact result on the
operands as read by less than ``2**-126``. ``grow``, ``add`` and ``mul`` inherit
a few multiples of ``2**-126`` of absolute error (times the other factor's
magnitude in ``mul`` when an operand is subnormal). float16 subnormals are
normal float32 numbers, so float16 results are exact including its subnormals
(``two_prod`` is exact whenever its error term is a float16 number). On
backends that keep float32 subnormals (GPUs by default) sums are exact
including subnormals, and products whenever their error term is a number of
the storage dtype.

References:
  T. J. Dekker, "A floating-point technique for extending the available
  precision", Numer. Math. 18, 1971.
  D. E. Knuth, The Art of Computer Programming vol. 2, 3rd ed., 4.2.2.
  J. R. Shewchuk, "Adaptive precision floating-point arithmetic and fast robust
  geometric predicates", Discrete Comput. Geom. 18, 1997.
  T. Yu et al., "Collage: Light-Weight Low-Precision Strategy for LLM
  Training", ICML 2024.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from collage_optax._bits import pow2, wide_dtype

__all__ = [
  "MCF",
  "SUPPORTED_DTYPES",
  "add",
  "fast_two_sum",
  "from_float",
  "grow",
  "mul",
  "round_to",
  "split_scalar",
  "to_float",
  "two_prod",
  "two_sum",
]

#: The component dtypes an MCF may have.
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))

Array = jax.Array
Scalar = Union[float, Array, "MCF"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MCF:
  """A multi-component float: the unevaluated sum ``hi + lo``.

  ``hi`` and ``lo`` are arrays of one dtype and shape with ``|lo| <= ulp(hi)/2``.
  It is a JAX pytree (leaves ``hi`` then ``lo``), so it goes through ``jit``,
  ``vmap``, ``device_put`` with a sharding and checkpointing like any pytree.
  """

  hi: Any
  lo: Any

  @property
  def dtype(self):
    return self.hi.dtype

  @property
  def shape(self):
    return self.hi.shape

  @property
  def sharding(self):
    return self.hi.sharding

  def __add__(self, other):  # Guard against tuple-like surprises.
    raise TypeError("MCF does not overload '+': use collage_optax.mcf.add(m1, m2) or collage_optax.mcf.grow(m, x).")


# ---------------------------------------------------------------------------
# Rounding and the wide type.
# ---------------------------------------------------------------------------


def _check_dtype(dtype) -> jnp.dtype:
  dtype = jnp.dtype(dtype)
  if dtype not in SUPPORTED_DTYPES:
    raise TypeError(f"MCF components must be bfloat16, float16 or float32, got {dtype}.")
  return dtype


def round_to(x: Array, dtype) -> Array:
  """Rounds ``x`` (a wider float) to ``dtype``'s precision, keeping its type.

  Round to nearest, ties to even, with overflow to ``±inf``; the result is a
  ``dtype`` number stored in ``x``'s wider type, so that ``x.astype(dtype)`` is
  then exact. Uses ``lax.reduce_precision``, which XLA must honour (unlike a
  ``convert`` pair, which it may elide under excess precision). When ``dtype``
  has fewer exponent bits than ``x`` (float16 from float32; anything from
  float64), ``reduce_precision`` flushes ``dtype``'s subnormal range; those
  numbers are normal in ``x``'s type, so they are rounded to multiples of the
  smallest subnormal by exact power-of-two scaling and integer rounding.
  """
  dtype = jnp.dtype(dtype)
  x = jnp.asarray(x)
  if dtype == x.dtype:
    return x
  if jnp.finfo(dtype).bits >= jnp.finfo(x.dtype).bits:
    raise TypeError(f"round_to: {dtype} is not narrower than {x.dtype}.")
  info = jnp.finfo(dtype)
  rounded = lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  if info.nexp < jnp.finfo(x.dtype).nexp:
    q = jnp.asarray(float(info.smallest_subnormal), x.dtype)
    sub = lax.round(x / q, lax.RoundingMethod.TO_NEAREST_EVEN) * q
    rounded = jnp.where(jnp.abs(x) < float(info.smallest_normal), sub, rounded)
  return rounded


def _rounder(dtype) -> Callable[[Array], Array]:
  dtype = _check_dtype(dtype)
  return lambda x: round_to(x, dtype)


def _up(x, dtype) -> Array:
  return jnp.asarray(x).astype(wide_dtype(dtype))


# ---------------------------------------------------------------------------
# Error-free transformations, on wide values with an explicit rounding ``r``.
# ---------------------------------------------------------------------------


def _fast_two_sum(a, b, r):
  s = r(a + b)
  e = r(b - r(s - a))
  return s, e


def _two_sum(a, b, r):
  # Knuth's TwoSum with every operation rounded by ``r``, except those whose
  # wide result is always a storage-precision number already, so that their
  # rounding is the identity: ``s ⊖ b'``, ``a ⊖ a'``, ``b ⊖ b'`` and the final
  # sum are exact (only ``b' = s ⊖ a`` may round; Knuth, TAOCP 4.2.2, Thm B).
  # Checked bit for bit (NaN for NaN) against the fully rounded sequence on all
  # 2**32 bfloat16 and all 2**32 float16 operand pairs, float32
  # flush-to-zero included.
  s = r(a + b)
  bb = r(s - a)
  aa = s - bb
  e = (a - aa) + (b - bb)
  return s, e


_SPLIT_MASK_F32 = np.uint32(0xFFFFF000)  # keeps sign, exponent, 11 of 23 bits.


def _split_f32(a):
  """Splits a float32 into 12 + 12 significant bits with a bit mask."""
  hi = lax.bitcast_convert_type(lax.bitcast_convert_type(a, jnp.uint32) & _SPLIT_MASK_F32, jnp.float32)
  return hi, a - hi


def _exponent_f32(a):
  """``floor(log2|a|)`` of a normal float32, ``-126`` for zero and subnormals."""
  biased = (lax.bitcast_convert_type(a, jnp.uint32) >> 23) & 0xFF
  return jnp.clip(biased.astype(jnp.int32), 1, 254) - 127


def _two_prod(a, b, dtype, r):
  if jnp.dtype(dtype).itemsize < 4:
    # The product of two 8- or 11-bit significands is exact in float32.
    ab = a * b
    p = r(ab)
    return p, r(ab - p)
  # float32: Dekker's product with a bit-mask split; every partial product is
  # exact (12 x 12 bits), so fused multiply-adds cannot change the result. The
  # split runs on a and b scaled by powers of two into [2, 4): unscaled, the
  # low halves of small normal numbers are subnormal and flushed (DAZ/FTZ),
  # and e would miss their products with the other factor.
  ka, kb = _exponent_f32(a), _exponent_f32(b)
  a_s, b_s = a * pow2(1 - ka), b * pow2(1 - kb)
  p_s = a_s * b_s
  ah, al = _split_f32(a_s)
  bh, bl = _split_f32(b_s)
  e_s = ((ah * bh - p_s) + ah * bl + al * bh) + al * bl
  # e = e_s * 2**(ka + kb - 2), in two steps that stay in range; below -252
  # the result underflows to zero either way.
  k = jnp.maximum(ka + kb - 2, -252)
  k1 = lax.shift_right_arithmetic(k, 1)
  return a * b, e_s * pow2(k1) * pow2(k - k1)


def _check_same(a, b, name):
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.dtype != b.dtype:
    raise TypeError(f"{name}: both operands must have one dtype, got {a.dtype} and {b.dtype}.")
  return _check_dtype(a.dtype)


def fast_two_sum(a: Array, b: Array) -> tuple[Array, Array]:
  """Dekker's Fast2Sum: ``s = a ⊕ b; e = b ⊖ (s ⊖ a)``.

  ``s + e == a + b`` exactly when ``|a| >= |b|`` or ``a == 0`` (Dekker 1971).
  Returns ``(s, e)`` in the operands' dtype.
  """
  dtype = _check_same(a, b, "fast_two_sum")
  s, e = _fast_two_sum(_up(a, dtype), _up(b, dtype), _rounder(dtype))
  return s.astype(dtype), e.astype(dtype)


def two_sum(a: Array, b: Array) -> tuple[Array, Array]:
  """Knuth's TwoSum: ``s = a ⊕ b`` and its exact rounding error ``e``.

  ``s = a ⊕ b; b' = s ⊖ a; a' = s ⊖ b'; e = (a ⊖ a') ⊕ (b ⊖ b')`` gives
  ``s + e == a + b`` exactly for any ``a, b`` (Knuth, TAOCP vol. 2, 4.2.2).
  """
  dtype = _check_same(a, b, "two_sum")
  s, e = _two_sum(_up(a, dtype), _up(b, dtype), _rounder(dtype))
  return s.astype(dtype), e.astype(dtype)


def two_prod(a: Array, b: Array) -> tuple[Array, Array]:
  """``p = a ⊗ b`` and its exact rounding error ``e`` (barring underflow).

  For bfloat16 and float16 the product is exact in float32, so
  ``p = round(a·b), e = round(a·b − p)``. For float32, Dekker's TwoProduct
  with a 12 + 12-bit split by bit mask (Dekker 1971).
  """
  dtype = _check_same(a, b, "two_prod")
  p, e = _two_prod(_up(a, dtype), _up(b, dtype), dtype, _rounder(dtype))
  return p.astype(dtype), e.astype(dtype)


# ---------------------------------------------------------------------------
# MCF arithmetic.
# ---------------------------------------------------------------------------


def from_float(x: ArrayLike, dtype=jnp.bfloat16) -> MCF:
  """Splits ``x`` into an MCF of ``dtype``: ``hi = round(x)``, ``lo = round(x − hi)``.

  ``x`` may be any float (a Python float is taken at float64 precision). A
  float32 subnormal ``x`` (bfloat16/float32 storage) gives ``hi = round(x)``
  and ``lo = 0``: arithmetic reads ``x`` as zero on CPU/TPU (see the module
  docstring).
  """
  dtype = _check_dtype(dtype)
  if isinstance(x, (float, int, np.floating, np.integer)) or (isinstance(x, np.ndarray) and x.dtype == np.float64):
    hi_np = np.asarray(x, np.float64).astype(dtype)
    lo_np = (np.asarray(x, np.float64) - hi_np.astype(np.float64)).astype(dtype)
    return MCF(jnp.asarray(hi_np), jnp.asarray(lo_np))
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(wide_dtype(dtype))
  wide = x.dtype if jnp.finfo(x.dtype).bits > jnp.finfo(wide_dtype(dtype)).bits else wide_dtype(dtype)
  hi, lo = _split(x.astype(wide), lambda v: round_to(v, dtype))
  return MCF(hi.astype(dtype), lo.astype(dtype))


def _split(xw: Array, r: Callable[[Array], Array]) -> tuple[Array, Array]:
  """:func:`from_float` of a wide ``xw``, rounding with ``r``: ``(hi, lo)`` in ``xw``'s type."""
  hi = r(xw)
  lo = r(xw - hi)
  # |lo| <= ulp(hi)/2 < |hi| unless x is a float32 subnormal that hi rounds up
  # to the smallest normal: arithmetic reads x as 0 (DAZ), so lo came out -hi.
  lo = jnp.where((lo == -hi) & (hi != 0), jnp.zeros_like(lo), lo)
  return hi, lo


def to_float(m: MCF, dtype=jnp.float32) -> Array:
  """The value ``hi + lo`` as a ``dtype`` array (rounded once to ``dtype``)."""
  return m.hi.astype(dtype) + m.lo.astype(dtype)


def split_scalar(s: Scalar, dtype) -> MCF:
  """A scalar as an MCF of ``dtype``: ``c = round(s)``, ``d = round(s − c)``.

  A Python float is split in float64, so ``0.999`` becomes, in bfloat16,
  ``c = 1.0, d = -0.0009994...`` (not ``s - float32(s)``, which would leave
  ``c + d == 1`` in bfloat16). A traced scalar (e.g. from
  ``optax.inject_hyperparams``) is split from its float32 value.
  """
  if isinstance(s, MCF):
    return s
  return from_float(s, dtype)


def grow(m: MCF, b: Array) -> MCF:
  """Adds a float ``b`` to the MCF ``m`` (Yu et al. 2024, Algorithm "Grow").

  ``b`` is first rounded to the storage precision. Then
  ``(s, e) = two_sum(x, b); t = r + e; x' = s ⊕ t; r' = round((s − x') + t)``
  with ``t`` and ``(s − x') + t`` computed in float32 (for float32 storage:
  ``t = r ⊕ e; (x', r') = two_sum(s, t)``). Using TwoSum instead of the paper's
  Fast2Sum keeps the step exact when ``|b| > |x|`` (zero crossings, updates
  larger than the parameter); keeping ``t`` wide stops a low part at exactly
  ``ulp(x)/2`` (a tie) from swallowing every later small increment. The result
  equals ``x + r + b`` to within ``ulp(r')/2`` plus float32 rounding (MCF
  precision, about ``2**-16`` relative for bfloat16).
  """
  dtype = _check_dtype(m.hi.dtype)
  r = _rounder(dtype)
  x, lo = _up(m.hi, dtype), _up(m.lo, dtype)
  b = jnp.asarray(b)
  bw = r(b.astype(jnp.promote_types(wide_dtype(dtype), b.dtype))).astype(wide_dtype(dtype))  # rounded once
  s, e = _two_sum(x, bw, r)
  if wide_dtype(dtype) == dtype:  # float32 storage: no wider type.
    hi, lo = _two_sum(s, r(lo + e), r)
  else:
    # t = r + e stays wide (it is exact in float32 unless the two are 2**16
    # apart): rounding it to storage precision first would let a low part at
    # exactly ulp(hi)/2 stick there, since hi + ulp(hi)/2 ties to even and small
    # increments to lo are below half its own ulp (a constant +1e-5 on θ = 1
    # then lost 98% of its sum). hi = s ⊕ t; lo = round((s − hi) + t): s − hi
    # is exact (two nearby storage numbers) and the float32 sum errs by 2**-24.
    t = lo + e
    hi = r(s + t)
    lo = r((s - hi) + t)
  return MCF(hi.astype(dtype), lo.astype(dtype))


def add(m1: MCF, m2: MCF) -> MCF:
  """The sum of two MCFs: ``(s, e) = two_sum(x1, x2); e = e ⊕ (r1 ⊕ r2); fast_two_sum(s, e)``.

  Shewchuk 1997 / Dekker 1971 double-length addition, accurate to MCF
  precision.
  """
  dtype = _check_same(m1.hi, m2.hi, "add")
  hi, lo = _add(_up(m1.hi, dtype), _up(m1.lo, dtype), _up(m2.hi, dtype), _up(m2.lo, dtype), _rounder(dtype))
  return MCF(hi.astype(dtype), lo.astype(dtype))


def _add(x1, r1, x2, r2, r):
  """:func:`add` of wide components, rounding with ``r``; returns wide ``(hi, lo)``."""
  s, e = _two_sum(x1, x2, r)
  e = r(e + r(r1 + r2))
  return _two_sum(s, e, r)


def mul(m: MCF, s: Scalar) -> MCF:
  """``m × s`` for a float or MCF scalar ``s = c + d`` (Dekker 1971 mul2).

  ``(p, e) = two_prod(x, c); e = e ⊕ (x ⊗ d ⊕ r ⊗ c); (x', r') = fast_two_sum(p, e)``.
  A float ``s`` is split with :func:`split_scalar` first, so ``mul(v, 0.999)``
  multiplies by 0.999, not by ``bfloat16(0.999) == 1.0``.
  """
  dtype = _check_dtype(m.hi.dtype)
  sm = split_scalar(s, dtype)
  if jnp.dtype(sm.hi.dtype) != dtype:
    raise TypeError(f"mul: scalar MCF of {sm.hi.dtype} for an MCF of {dtype}.")
  r = _rounder(dtype)
  x, lo = _up(m.hi, dtype), _up(m.lo, dtype)
  c, d = _up(sm.hi, dtype), _up(sm.lo, dtype)
  p, e = _two_prod(x, c, dtype, r)
  e = r(e + r(r(x * d) + r(lo * c)))
  hi, lo = _fast_two_sum(p, e, r)
  return MCF(hi.astype(dtype), lo.astype(dtype))
