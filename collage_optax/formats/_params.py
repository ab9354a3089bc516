"""Param formats: the param array is the first component, the residual lives in the state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from collage_optax import mcf
from collage_optax._bits import pow2
from collage_optax.formats._arith import emit, narrow, widen

Array = jax.Array
_BF16 = jnp.dtype(jnp.bfloat16)


class ParamFormat(NamedTuple):
  """A storage format for a parameter whose first component is the param array.

  ``init(p)`` is the residual of a param ``p`` taken as exact (``None``: the
  format keeps none); ``decode(p, r)`` the float32 value; ``encode(x, p,
  u_dtype)`` returns ``(u, r')``: the update, of dtype ``u_dtype``, that
  carries ``p`` to the new first component under ``optax.apply_updates``,
  and the residual that makes the pair worth ``x``. Should ``apply_updates``
  land elsewhere (an update that is not a ``u_dtype`` number), the residual
  is taken from where it lands, so the miss is not lost.
  """

  name: str
  residual_bytes: float
  init: Callable[[Array], Array | None]
  decode: Callable[[Array, Array | None], Array]
  encode: Callable[[Array, Array, Any], tuple[Array, Array | None]]


def _mcf_param_encode(x: Array, p: Array, u_dtype: Any) -> tuple[Array, Array]:
  u, at = emit(x, mcf.round_to(x, p.dtype), p, u_dtype)
  # Past the dtype's range the param overflows (as apply_updates would) and
  # the residual is 0, so the pair decodes to that ±inf, not to NaN.
  return u, narrow(jnp.where(jnp.isfinite(at), x - at, 0.0), p.dtype)


def _plain_param_encode(x: Array, p: Array, u_dtype: Any) -> tuple[Array, None]:
  return emit(x, mcf.round_to(x, p.dtype), p, u_dtype)[0], None


_RESIDUAL_RANGE = (-(1 << 15), (1 << 15) - 1)


def _bf16_only(name: str, dtype: Any) -> Callable[[Array], Array]:
  """The ``init`` of a residual of ``dtype`` that only bfloat16 params have (a clear error otherwise)."""

  def init(p: Array) -> Array:
    if jnp.dtype(p.dtype) != _BF16:
      raise TypeError(
        f"param format {name!r} keeps bfloat16 params (the upper half of a float32); got a "
        f"{jnp.dtype(p.dtype)} param. Use the 'mcf' format for float16 params (adamw's mode='plus' or "
        "param_format='mcf'; compensate(format='mcf'))."
      )
    return jnp.zeros_like(p, dtype=dtype)

  return init


def _exact_decode(p: Array, r: Any) -> Array:
  """``(bits(p) << 16) + r`` as float32 bits: the float32 value, bit for bit."""
  hi = lax.bitcast_convert_type(p, jnp.uint16).astype(jnp.uint32) << 16
  return lax.bitcast_convert_type(hi + r.astype(jnp.int32).astype(jnp.uint32), jnp.float32)


def _exact_param_encode(x: Array, p: Array, u_dtype: Any) -> tuple[Array, Array]:
  """``hi`` = the bfloat16 nearest ``x`` with ties away from zero, ``r`` = the rest of its bits.

  ``hi_bits = (bits(x) + 0x8000) >> 16`` and ``r = bits(x) − (landed_bits << 16)``,
  in ``[−2**15, 2**15)`` when ``apply_updates`` lands on ``hi``. Should it
  land elsewhere (``hi − p`` is no ``u_dtype`` number: a bfloat16 update
  across binades or across zero), the residual absorbs up to half an ulp of
  where it lands; beyond that it is clipped (:func:`_bits_residual`). Such a
  miss needs ``ulp(hi − p) > ulp(hi)`` and leaves an error of at most an ulp
  of the bfloat16 update, ``2**-7·|hi − p|``. float32 updates always land on
  ``hi``.
  """
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  # A NaN becomes the quiet NaN of its sign, so that hi is a NaN too (the
  # rounding of 0x7FFF8000 would carry into the sign bit).
  bits = jnp.where(jnp.isnan(x), (bits & np.uint32(0x80000000)) | np.uint32(0x7FC00000), bits)
  hi = lax.bitcast_convert_type(((bits + np.uint32(0x8000)) >> 16) << 16, jnp.float32)
  u, at = emit(x, hi, p, u_dtype)
  return u, _bits_residual(bits, lax.bitcast_convert_type(at, jnp.uint32), at)


def _bits_residual(bits: Array, at_bits: Array, at: Array) -> Array:
  """``bits − at_bits`` as an int16, clipped to what keeps ``at``'s sign (the decode adds it to ``at_bits``).

  Sign and magnitude are apart in a float's bits: the distance is taken
  between magnitudes, ``x``'s counted negative when its sign is not
  ``at``'s, and clipped to ``[max(−2**15, −|at|), 2**15)`` so that the
  decoded value is the one of ``at``'s sign nearest ``x`` (``±0`` when ``x``
  is across zero), never a NaN pattern.
  """
  mag = lambda b: (b & np.uint32(0x7FFFFFFF)).astype(jnp.int32)
  at_mag = mag(at_bits)
  same = (bits >> 31) == (at_bits >> 31)
  t = jnp.where(same, mag(bits), -mag(bits))
  # Clipped before the subtraction, so that it cannot overflow int32.
  t = jnp.clip(t, at_mag + _RESIDUAL_RANGE[0] - 1, at_mag + _RESIDUAL_RANGE[1] + 1)
  r = jnp.clip(t - at_mag, jnp.maximum(_RESIDUAL_RANGE[0], -at_mag), _RESIDUAL_RANGE[1])
  return jnp.where(jnp.isfinite(at), r, 0).astype(jnp.int16)


_COMPACT_LEVELS = 127.0


def _half_ulp_exponent(hi: Array) -> Array:
  """``k`` with ``2**k = ulp(hi)/2`` for a bfloat16 value ``hi`` held in float32, at least −126.

  From the exponent bits: ``ulp = 2**(e − 7)``. Below ``2**-118`` the unit is
  held at ``2**-126`` (the smallest normal float32), so both it and its
  inverse are normal numbers.
  """
  e = (lax.bitcast_convert_type(hi, jnp.uint32) >> 23) & np.uint32(0xFF)
  return jnp.maximum(e.astype(jnp.int32) - 127 - 8, -126)


def _compact_lift(k: Array) -> Array:
  """``s`` (64 or 0) such that the residual's arithmetic, done ``2**s`` higher, meets no float32 subnormal.

  Below ``2**-64`` the unit ``2**k/127`` and ``x − hi`` may be subnormal,
  which XLA:CPU flushes to zero (it would lose the residual of every
  ``|hi| < 2**-110``); scaling by a power of two is exact.
  """
  return jnp.where(k < -64, 64, 0)


def _compact_decode(p: Array, r: Any) -> Array:
  """``hi + r·(ulp(hi)/2)/127``: the value of a ``compact`` param."""
  hi = widen(p)
  k = _half_ulp_exponent(hi)
  s = _compact_lift(k)
  return (hi * pow2(s) + r.astype(jnp.float32) * (pow2(k + s) * (1.0 / _COMPACT_LEVELS))) * pow2(-s)


def _compact_param_encode(x: Array, p: Array, u_dtype: Any) -> tuple[Array, Array]:
  """``hi = round(x)`` (bfloat16, nearest even), ``r = round(127·(x − hi)/(ulp(hi)/2))``.

  ``|x − hi| ≤ ulp(hi)/2``, so ``r`` is in [−127, 127] and the value is kept
  within ``ulp(hi)/508`` (FlashOptim's "24-bit" master weights: bf16 + int8).
  The residual is taken from where ``apply_updates`` lands; a miss beyond
  half an ulp is clipped, an error of at most the miss.
  """
  u, at = emit(x, mcf.round_to(x, _BF16), p, u_dtype)
  k = _half_ulp_exponent(at)
  s = _compact_lift(k)
  # (x − at)·127 is exact (16 + 7 significant bits), the power-of-two scalings too. A miss so
  # large that the product overflows is clipped like any other (r is NaN only for a non-finite x).
  r = jnp.round((x * pow2(s) - at * pow2(s)) * _COMPACT_LEVELS * pow2(-k - s))
  r = jnp.where(jnp.isfinite(at) & ~jnp.isnan(r), jnp.clip(r, -_COMPACT_LEVELS, _COMPACT_LEVELS), 0.0)
  return u, r.astype(jnp.int8)


#: ``mcf``: the paper's ``lo``, a residual of the param's own dtype (any bfloat16/float16 param).
MCF_RESIDUAL = ParamFormat("mcf", 2, jnp.zeros_like, lambda p, r: widen(p) + widen(cast(Array, r)), _mcf_param_encode)
#: ``bf16``: no residual, the param alone (round to nearest).
NO_RESIDUAL = ParamFormat("bf16", 0, lambda p: None, lambda p, r: widen(p), _plain_param_encode)
#: ``exact``: an int16 residual, the float32 bit for bit (bfloat16 params).
EXACT = ParamFormat("exact", 2, _bf16_only("exact", jnp.int16), _exact_decode, _exact_param_encode)
#: ``compact``: an int8 residual, ``hi ± ulp(hi)/508`` (bfloat16 params).
COMPACT = ParamFormat("compact", 1, _bf16_only("compact", jnp.int8), _compact_decode, _compact_param_encode)
