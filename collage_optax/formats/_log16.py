"""The ``log16`` second-moment format: 16-bit codes of ``log2 v`` below its group's largest, as a :class:`Log16`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from collage_optax.formats._arith import finite_max
from collage_optax.formats._moments import GROUP, MomentFormat, grouped, ungrouped

Array = jax.Array

# A log16 code counts steps of 2**12 float32 bit-units down from the group's largest (2**11 steps
# per octave of Mitchell's log2, 32 octaves); codes 0 .. 2**16 − 4 hold values, the top three are
# special. (Steps of 2**13, 64 octaves: 3.1× the trajectory error, see benchmarks/lean_probe.py.)
_SHIFT = 12
_ZERO, _NAN, _FLOOR = 0xFFFF, 0xFFFE, 0xFFFD


class Log16(NamedTuple):
  """The storage of a ``log16`` second moment.

  ``codes``: uint16, the param's shape; ``scales``: float32, one per group of
  32 consecutive elements along the last axis (laid out as ``Q8``'s:
  ``param.shape[:-1] + (ceil(n / 32),)``, ``(1,)`` for a scalar), the
  group's largest finite ``v``. 2 + 4/32 bytes per value. See the
  ``LOG16`` format's encode for the codes and ``log16_bound`` for the error.
  """

  codes: Any  # arrays (or, as a tree of shardings or shapes, their descriptions)
  scales: Any


def _bits(x: Array) -> Array:
  """The float32 bits of ``x`` as an int32 where ``x > 0`` is finite, else 0 (by the bits: no flush)."""
  b = lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)
  return jnp.where((b > 0) & (b < 0x7F800000), b, 0)


def _per_group(k: Array, shape: tuple[int, ...]) -> Array:
  """A per-group array ``(..., groups)`` repeated onto the elements of ``shape``."""
  return ungrouped(jnp.broadcast_to(k[..., None], (*k.shape, GROUP)), shape)


def _dither(b: Array) -> Array:
  """A pseudo-random integer in ``[0, 2**12)`` from the mantissa bits of ``b`` (int32): a hash's low bits.

  The hash is C. Wellons' "lowbias32" (2018): on uint32, ``x ^= x >> 16;
  x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16``
  (multiplications wrap). Added to the distance before the shift, it rounds
  stochastically: up with probability ``(distance mod 2**12)/2**12``, so the
  rounding is unbiased on average, deterministically (the same ``v`` always
  gives the same code; no key, no state). Only the 23 mantissa bits are
  hashed, so ``v·2**k`` gets ``v``'s codes.
  """
  x = (b & 0x7FFFFF).astype(jnp.uint32)
  x = x ^ (x >> 16)
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x846CA68B)
  x = x ^ (x >> 16)
  return (x & np.uint32((1 << _SHIFT) - 1)).astype(jnp.int32)


def _encode(x: Array) -> Log16:
  """``v ≥ 0`` as uint16 codes ``c ≈ (bits(s) − bits(v)) / 2**12`` and a float32 ``s`` per group of 32.

  ``s`` is the group's largest finite ``v`` and ``bits`` the float32 bit
  pattern as an integer, so ``bits/2**23 − 127`` is Mitchell's piecewise-
  linear ``log2``: a code counts 1/2048 octaves (in that log) down from ``s``,
  and decodes to the float32 whose bits are ``bits(s) − c·2**12``, within
  a step (< 2**12 bit-units, ≤ 2**-11 relative) of ``v``.

  Rounding is stochastic, unbiased: the distance ``bits(s) − bits(v)`` plus
  a pseudo-random ``u ∈ [0, 2**12)`` hashed from ``v``'s mantissa bits
  (:func:`_dither`), shifted right by 12. A moment's per-step change,
  ``(1 − b2)·(g² − v)``, is about 1e-3 of it: two steps of the grid. Rounded
  to nearest, its error is a deterministic function of where ``v`` sits, and
  it adds up coherently over a decay (measured: v off by 13% after 3000 steps
  of ``g = 0``, against 1.7% rounded stochastically). The grid also hangs
  from ``s``, which moves every step (a fixed float grid measured 3× the
  trajectory error).

  Codes:

  * ``0 .. 2**16 − 4``: values, up to ``65532`` steps (32 octaves) below ``s``;
    a positive ``v`` further down saturates at ``2**16 − 3`` (the floor, above
    ``v``: Adam's step is then smaller than ``m/√v``, never larger);
  * ``2**16 − 1``: ``v = 0`` (and ``v < 0``, ``-0.0``);
  * ``2**16 − 2``: NaN or ±inf, left out of the group's ``s`` (a
    non-finite gradient poisons only its element).

  Integer operations, one integer max per group, no float arithmetic: the
  same bits on every backend and under any XLA flag.
  """
  x = jnp.asarray(x, jnp.float32)
  b = _bits(x)
  top = jnp.max(grouped(b), axis=-1)  # bits(s): the largest positive finite v (ints compare as the floats)
  d = _per_group(top, x.shape) - b
  c = (d + _dither(b)) >> _SHIFT  # stochastic rounding, by a hash of v's bits
  # Never below bits 0 (a v within 2**-137 of 0), never past the floor.
  c = jnp.minimum(jnp.minimum(c, _per_group(top >> _SHIFT, x.shape)), _FLOOR)
  c = jnp.where(b == 0, _ZERO, c)
  c = jnp.where(jnp.isfinite(x), c, _NAN)
  return Log16(c.astype(jnp.uint16), lax.bitcast_convert_type(top, jnp.float32))


def _decode(q: Log16) -> Array:
  """The float32 ``v`` of a ``log16`` storage: the float32 with bits ``bits(s) − c·2**12``.

  The zero code decodes to +0.0, the NaN code to NaN. Integer operations and
  a bitcast only: exact, the same bits on every backend.
  """
  c = q.codes.astype(jnp.int32)
  top = _per_group(lax.bitcast_convert_type(q.scales, jnp.int32), q.codes.shape)
  v = lax.bitcast_convert_type(jnp.maximum(top - (c << _SHIFT), 0), jnp.float32)
  return jnp.where(c == _ZERO, 0.0, jnp.where(c == _NAN, jnp.nan, v))


def _zeros(like: Any) -> Log16:
  """The ``log16`` storage of 0: zero codes (shaped and sharded like ``like``), ``s = 0`` per group."""
  codes = jnp.full_like(like, _ZERO, dtype=jnp.uint16)  # keeps the sharding
  # The scales by the reduction the encode uses, so that they get the sharding a step gives them.
  return Log16(codes, jnp.max(grouped(jnp.zeros_like(like, dtype=jnp.float32)), axis=-1))


def log16_bound() -> tuple[float, float, float]:
  """``(rel, floor, tiny)``: the error of the ``log16`` value ``ṽ`` of a finite ``v ≥ 0``.

  With ``s`` the largest finite ``v`` of its group (of 32 along the last axis),
  ``rel = 2**-11/(1 − 2**-11)``, ``floor = 2**-31``, ``tiny = 2**-137``:

  * always ``v − rel·v − tiny ≤ ṽ ≤ max(v + rel·v + tiny, floor·s)``;
  * so for ``v ≥ floor·s``: ``|ṽ − v| ≤ rel·v + tiny`` (``√v``: half that);
    ``ṽ = s`` exactly for the group's largest; on average over the hash,
    ``ṽ``'s bits are ``v``'s (unbiased rounding);
  * ``v = 0``: ``ṽ = 0``; a non-finite ``v``: NaN.

  Derivation: ``ṽ``'s bits are less than 2**12 from ``v``'s (a step, rounded
  stochastically), and a float32 ``y`` is at least 2**23 of its own
  bit-units; so ``ṽ − v ≤ 2**-11·ṽ`` above ``v``, ``v − ṽ ≤ 2**-11·v`` below it, whence
  ``rel``. Below 2**-126 a bit-unit is 2**-149 (and the clamp at bits 0
  costs at most 2**12 of them): ``tiny``. The floor code is 65533 steps of
  1/2048 of Mitchell's log2 below ``s``; that log is within 0.0861 of log2,
  so the floor is at most ``2**-(65533/2048 − 0.09)·s ≤ 2**-31·s`` (in
  ``√v``: 2**-15.5 ≈ 2.2e-5 of the group's largest; q8's ``√v`` floor is
  1/508 of it, and q8's ``√v`` is off by up to 1/256 of the largest).
  """
  return 2.0**-11 / (1 - 2.0**-11), 2.0**-31, 2.0**-137


#: ``log16`` (second moments only: its codes are of ``log2 v``, ``v ≥ 0``): uint16 codes, a float32 scale per 32.
LOG16 = MomentFormat("log16", 2 + 4 / GROUP, _zeros, _encode, _decode, finite_max(jnp.float32))
