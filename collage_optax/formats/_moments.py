"""Moment formats: a value kept entirely in the optimizer state, as one array (or a :class:`Q8`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from collage_optax import mcf
from collage_optax._bits import HIGH_HALF
from collage_optax.formats._arith import finite_max, widen

Array = jax.Array
_BF16 = jnp.dtype(jnp.bfloat16)


class MomentFormat(NamedTuple):
  """A storage format for a value kept in the optimizer state (a moment).

  ``zeros(like)`` is the storage of 0 for an array shaped like ``like``;
  ``encode`` rounds a float32 array into the storage, ``decode`` returns its
  float32 value; ``max`` is the largest finite value it holds (the step
  saturates finite results there); ``bytes`` per value. ``coarse``: an 8-bit
  format whose step uses the new value before its rounding rather than the
  stored one (``q8``: a code step is up to 1/127 of the group's largest).
  """

  name: str
  bytes: float
  zeros: Callable[[Any], Any]  # the storage: an array, or a Q8
  encode: Callable[[Array], Any]
  decode: Callable[[Any], Array]
  max: float
  coarse: bool = False


def _bf16_encode(x: Array) -> Array:
  # The narrowing convert is exact (x is rounded first); it marks the moment
  # as worth materialising: XLA:CPU's consumers then read the stored moment
  # instead of recomputing it from the donated old one.
  return mcf.round_to(x.astype(jnp.float32), _BF16).astype(_BF16)


def _mcf_encode(x: Array) -> Array:
  """``mcf.from_float(x)`` packed in a uint32: ``hi`` in the upper half, ``lo`` in the lower.

  ``lo = 0`` where ``hi`` is not finite. The bfloat16 components (exact
  narrowing converts) mark the result as worth materialising, so that
  XLA:CPU's consumers read the stored moment instead of recomputing it from
  the donated old one.
  """
  m = mcf.from_float(x.astype(jnp.float32), _BF16)
  lo = jnp.where(jnp.isfinite(m.hi), m.lo, jnp.zeros_like(m.lo))
  bits = lambda c: lax.bitcast_convert_type(c, jnp.uint16).astype(jnp.uint32)
  return (bits(m.hi) << 16) | bits(lo)


def _mcf_decode(s: Array) -> Array:
  hi = lax.bitcast_convert_type(s & HIGH_HALF, jnp.float32)
  lo = lax.bitcast_convert_type(s << 16, jnp.float32)
  return hi + lo


def mcf_components(s: Array) -> mcf.MCF:
  """The :class:`collage_optax.MCF` ``(hi, lo)`` held by an ``mcf`` moment's packed storage."""
  half = lambda b: lax.bitcast_convert_type(b.astype(jnp.uint16), _BF16)
  return mcf.MCF(half(s >> 16), half(s & np.uint32(0xFFFF)))


def zeros_of(dtype: Any) -> Callable[[Any], Array]:
  """The ``zeros`` of a one-array storage of ``dtype``: ``zeros_like`` keeps the param's sharding."""
  return lambda like: jnp.zeros_like(like, dtype=dtype)


# ---------------------------------------------------------------------------
# q8: 8-bit codes and one bfloat16 scale per group of 32 along the last axis.
# ---------------------------------------------------------------------------

#: The group size of the grouped storages (q8, log16): 32 consecutive elements along the last axis.
GROUP = 32


class Q8(NamedTuple):
  """The storage of a ``q8`` moment.

  ``codes`` has the param's shape (int8 for ``m``, uint8 for ``v``);
  ``scales`` one bfloat16 per group of 32 consecutive elements along the last
  axis (the last group of a row may be shorter: rows are padded, not
  refused), shape ``param.shape[:-1] + (ceil(n / 32),)`` (``(1,)`` for a
  scalar). Grouping along the last axis lets both arrays be sharded like the
  param; a step needs no communication for them where each shard's part of
  the last axis is a multiple of 32 (else a group's maximum spans shards).
  ``v``'s code 0 (``√v < s/508``) decodes at the middle of its range,
  ``s/508``·½, not at 0: an element far below its group's largest then
  takes a step smaller than Adam's, not one up to ``1/√(1 − b2)`` larger.
  """

  codes: Any  # arrays (or, as a tree of shardings or shapes, their descriptions)
  scales: Any


def grouped(x: Array) -> Array:
  """``x`` (any shape) as ``(..., groups, 32)`` along its last axis, zero-padded."""
  x = jnp.reshape(x, x.shape or (1,))
  pad = -x.shape[-1] % GROUP
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(*x.shape[:-1], -1, GROUP)


def ungrouped(x: Array, shape: tuple[int, ...]) -> Array:
  """The inverse of :func:`grouped`: drops the padding, restores ``shape``."""
  n = shape[-1] if shape else 1
  return x.reshape(*x.shape[:-2], -1)[..., :n].reshape(shape)


# Codes that mark a non-finite element (a NaN or ±inf gradient poisons that element only).
_Q8_NAN = {jnp.dtype(jnp.int8): -128, jnp.dtype(jnp.uint8): 255}
# The largest magnitude a q8 moment holds (its scale's square stays finite).
_Q8_MAX = 1e38


def _q8_encoder(signed: bool) -> Callable[[Array], Q8]:
  """``m``: ``c = round(127·φ(x/s))``, ``φ(y) = 2y/(1+|y|)``; ``v``: ``c = round(254·√x/s)``.

  ``s`` is the group's largest finite magnitude (of ``x``, or of ``√x``),
  rounded to bfloat16: its 8 exponent bits span float32's range, so the codes
  do not depend on the moments' scale (an fp16 scale underflows at gradients
  of 1e-6 to 1e-8). Non-finite elements get the NaN code.
  """
  dtype, levels = (jnp.dtype(jnp.int8), 127.0) if signed else (jnp.dtype(jnp.uint8), 254.0)

  def encode(x: Array) -> Q8:
    x = jnp.asarray(x, jnp.float32)
    finite = jnp.isfinite(x)
    y = jnp.where(finite, x if signed else jnp.sqrt(jnp.maximum(x, 0.0)), 0.0)
    groups = grouped(y)
    s = mcf.round_to(jnp.max(jnp.abs(groups), axis=-1), _BF16)
    inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
    y = ungrouped(groups * inv[..., None], x.shape)
    if signed:
      y = 2.0 * y / (1.0 + jnp.abs(y))
    c = jnp.clip(jnp.round(levels * y), -levels if signed else 0.0, levels)
    c = jnp.where(finite, c, float(_Q8_NAN[dtype]))
    return Q8(c.astype(dtype), s.astype(_BF16))

  return encode


def _q8_decode(q: Q8) -> Array:
  """The float32 moment of a ``q8`` storage (NaN at the NaN code)."""
  signed = jnp.dtype(q.codes.dtype) == jnp.int8
  c = q.codes.astype(jnp.float32)
  shape = q.codes.shape
  if signed:
    z = c * (1.0 / 127.0)
    c = z / (2.0 - jnp.abs(z))  # φ⁻¹
  if not signed:
    # Code 0 holds √v in [0, s/508): decoded at its middle, not at 0, so that an element
    # much smaller than its group's largest does not step by m/√((1 − b2)·g²) next time.
    c = jnp.where(q.codes == 0, 0.5, c)
  s = widen(q.scales) * (1.0 if signed else 1.0 / 254.0)
  x = ungrouped(grouped(c) * s[..., None], shape)
  if not signed:
    x = x * x
  return jnp.where(q.codes == _Q8_NAN[jnp.dtype(q.codes.dtype)], jnp.nan, x)


def _q8_zeros(dtype: Any) -> Callable[[Any], Q8]:
  def zeros(like: Any) -> Q8:
    codes = jnp.zeros_like(like, dtype=dtype)  # keeps the sharding
    # The scales by the reduction the encode uses, so that they get the sharding a step gives them.
    return Q8(codes, jnp.max(grouped(jnp.zeros_like(like, dtype=_BF16)), axis=-1))

  return zeros


def q8_bound(second: bool) -> float:
  """The error of a ``q8`` moment, as a fraction of its group's largest magnitude ``s``.

  ``m``: ``|m̃ − m| ≤ q8_bound(False)·s`` (half a code step, 1/254, times
  ``φ⁻¹``'s largest slope, 2, times the bfloat16 scale's rounding, 1 + 2⁻⁸);
  ``v``: ``|√ṽ − √v| ≤ q8_bound(True)·s`` with ``s`` the largest ``√v``:
  half a code step, 1/508, times 1 + 2⁻⁸, except in a group whose scale
  rounds below ``s`` (half of them): its largest elements clip at code 254,
  off by up to that rounding, 2⁻⁸·s. (A clipped ``m`` is off by at most
  2⁻⁸·s too, within its bound.) Plus float32 rounding (a few ulp of ``s``).
  """
  return 2.0**-8 if second else (1.0 / 127.0) * (1.0 + 2.0**-8)


_Q8_BYTES = 1 + 2 / GROUP

#: ``bf16``: one bfloat16 (8 significant bits).
BF16 = MomentFormat("bf16", 2, zeros_of(_BF16), _bf16_encode, widen, finite_max(_BF16))
#: ``mcf``: the paper's two-bfloat16 MCF (~16 bits), packed in a uint32.
MCF_PACKED = MomentFormat("mcf", 4, zeros_of(jnp.uint32), _mcf_encode, _mcf_decode, finite_max(_BF16))
#: ``f32``: float32 (the ``exact`` preset's ``v``).
F32 = MomentFormat(
  "f32", 4, zeros_of(jnp.float32), lambda x: x.astype(jnp.float32), lambda s: s, finite_max(jnp.float32)
)
#: ``q8`` for a first moment: int8 codes of ``φ(m/s)``, a bfloat16 scale per 32.
Q8_M = MomentFormat("q8", _Q8_BYTES, _q8_zeros(jnp.int8), _q8_encoder(True), _q8_decode, _Q8_MAX, coarse=True)
#: ``q8`` for a second moment (``v ≥ 0``): uint8 codes of ``√v/s``, a bfloat16 scale per 32.
Q8_V = MomentFormat("q8", _Q8_BYTES, _q8_zeros(jnp.uint8), _q8_encoder(False), _q8_decode, _Q8_MAX, coarse=True)
