"""Storage formats: one float32 value kept in fewer bytes (DESIGN §6).

Everything an optimizer keeps per parameter -- the parameter itself, Adam's
``m`` and ``v`` -- is a float32 quantity *stored* in a format. A format is a
pair of pure elementwise functions, ``encode(x32) -> storage`` and
``decode(storage) -> x32``, plus its bytes per value. A step decodes, does its
arithmetic in float32 and encodes; the only roundings are the encode's, and
they are explicit (``lax.reduce_precision`` or integer bit operations), so
XLA's excess precision (``--xla_allow_excess_precision``) cannot remove them.

Two kinds:

* :class:`Format` -- a value kept entirely in the optimizer state (a moment):
  its storage is a single array of the parameter's shape, so that a jitted
  step writes it with a single loop (XLA:CPU has no multi-output fusion, and
  a value stored as two arrays would be computed twice and copied).

  ====== ====================== == ==============================================
  name   storage                B  precision
  ====== ====================== == ==============================================
  bf16   bfloat16               2  8 bits (``v`` with β2 = 0.999 stalls)
  mcf    uint32: bf16 hi | lo   4  ~16 bits: the paper's two-bfloat16 MCF
  f32    float32                4  24 bits
  ====== ====================== == ==============================================

* :class:`ParamFormat` -- a parameter: its first component is the parameter
  array the model computes with (bfloat16 or float16); the rest (the
  *residual*) lives in the optimizer state.

  ====== =========================== == =========================================
  name   residual                    B  precision
  ====== =========================== == =========================================
  mcf    lo of the param's dtype     2  ~16 bits (bf16), ~22 (fp16): COLLAGE
  exact  int16 (bf16 params only)    2  24 bits: the float32, bit for bit
  bf16   none                        0  the param's own 8 (11) bits
  ====== =========================== == =========================================

An ``mcf`` value ``hi + lo`` is the :class:`collage_optax.MCF` number of
``collage_optax.mcf`` (``hi = round(x)``, ``lo = round(x − hi)``): encoding a
float32 by two roundings gives the same bits as ``mcf.from_float``, and the
float32 sum ``hi + lo`` is ``mcf.to_float``.

References:
  T. Yu et al., "Collage: Light-Weight Low-Precision Strategy for LLM
  Training", ICML 2024 (the MCF formats).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from collage_optax import mcf

__all__ = [
  "MOMENT_FORMATS",
  "PARAM_FORMATS",
  "Format",
  "ParamFormat",
  "landed",
  "mcf_components",
  "moment_format",
  "moment_format_of",
  "narrow",
  "native_format",
  "param_format",
  "param_format_of",
  "widen",
]

Array = jax.Array

_HIGH = np.uint32(0xFFFF0000)
_BF16 = jnp.dtype(jnp.bfloat16)


def widen(x: Array) -> Array:
  """``x`` as float32 (or its own type if wider), exactly.

  bfloat16 is widened by a bit shift (its bits are the upper half of the
  float32), which XLA:CPU vectorises, where a ``convert`` is scalar code.
  """
  x = jnp.asarray(x)
  if x.dtype == _BF16:
    return lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16, jnp.float32)
  if jnp.finfo(x.dtype).bits < 32:
    return x.astype(jnp.float32)
  return x


def narrow(x: Array, dtype: Any) -> Array:
  """``x.astype(dtype)`` with the rounding made explicit (:func:`mcf.round_to`).

  Round to nearest even; overflow gives ``±inf``. XLA may drop the rounding
  of a narrowing ``convert`` that it fuses into a consumer (excess
  precision); ``reduce_precision`` it must honour, so every consumer sees the
  stored value.
  """
  dtype = jnp.dtype(dtype)
  x = jnp.asarray(x)
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < jnp.finfo(x.dtype).bits:
    x = mcf.round_to(x, dtype)
  return x.astype(dtype)


def _finite_max(dtype: Any) -> float:
  return float(jnp.finfo(dtype).max)


# ---------------------------------------------------------------------------
# Moment formats: the whole value in the state, one array.
# ---------------------------------------------------------------------------


class Format(NamedTuple):
  """A storage format for a value kept in the optimizer state.

  ``zeros(like)`` is the storage of 0 for an array shaped like ``like``;
  ``encode`` rounds a float32 array into the storage, ``decode`` returns its
  float32 value; ``max`` is the largest finite value it holds (the step
  saturates finite results there); ``bytes`` per value.
  """

  name: str
  bytes: float
  zeros: Callable[[Any], Array]
  encode: Callable[[Array], Array]
  decode: Callable[[Array], Array]
  max: float


def _bf16_encode(x: Array) -> Array:
  # The narrowing convert is exact (x is rounded first); it marks the moment
  # as worth materialising: XLA:CPU's consumers then read the stored moment
  # instead of recomputing it from the donated old one.
  return mcf.round_to(x.astype(jnp.float32), _BF16).astype(_BF16)


def _mcf_split(x: Array) -> tuple[Array, Array]:
  """``hi = round(x)``, ``lo = round(x − hi)`` in bfloat16 (``lo = 0`` where ``hi`` is not finite)."""
  hi, lo = mcf._split(x, lambda v: mcf.round_to(v, _BF16))  # mcf.from_float's bits
  return hi, jnp.where(jnp.isfinite(hi), lo, 0.0)


def _mcf_encode(x: Array) -> Array:
  """Two bfloat16 components packed in a uint32: ``hi`` in the upper half, ``lo`` in the lower."""
  hi, lo = _mcf_split(x.astype(jnp.float32))
  # The narrowing converts are exact (the values are bfloat16 numbers): they
  # mark the result as worth materialising, so that XLA:CPU's consumers read
  # the stored moment instead of recomputing it from the donated old one.
  bits = lambda c: lax.bitcast_convert_type(c.astype(_BF16), jnp.uint16).astype(jnp.uint32)
  return (bits(hi) << 16) | bits(lo)


def _mcf_decode(s: Array) -> Array:
  hi = lax.bitcast_convert_type(s & _HIGH, jnp.float32)
  lo = lax.bitcast_convert_type(s << 16, jnp.float32)
  return hi + lo


def mcf_components(s: Array) -> mcf.MCF:
  """The :class:`collage_optax.MCF` ``(hi, lo)`` held by an ``mcf`` moment's packed storage."""
  half = lambda b: lax.bitcast_convert_type(b.astype(jnp.uint16), _BF16)
  return mcf.MCF(half(s >> 16), half(s & np.uint32(0xFFFF)))


_zeros = lambda dtype: lambda like: jnp.zeros_like(like, dtype=dtype)  # keeps the sharding

MOMENT_FORMATS: dict[str, Format] = {
  "bf16": Format("bf16", 2, _zeros(_BF16), _bf16_encode, widen, _finite_max(_BF16)),
  "mcf": Format("mcf", 4, _zeros(jnp.uint32), _mcf_encode, _mcf_decode, _finite_max(_BF16)),
  "f32": Format("f32", 4, _zeros(jnp.float32), lambda x: x.astype(jnp.float32), lambda s: s, _finite_max(jnp.float32)),
}


def native_format(dtype: Any) -> Format:
  """The format that stores a value in ``dtype`` itself (float32/float64 params' moments)."""
  dtype = jnp.dtype(dtype)
  if dtype == _BF16:
    return MOMENT_FORMATS["bf16"]
  if dtype == jnp.float32:
    return MOMENT_FORMATS["f32"]
  return Format(
    dtype.name,
    dtype.itemsize,
    _zeros(dtype),
    lambda x: narrow(x, dtype),
    lambda s: s.astype(jnp.promote_types(dtype, jnp.float32)),
    _finite_max(dtype),
  )


def moment_format_of(storage: Any) -> Format:
  """The format of a moment's storage, from its dtype (a packed uint32 is ``mcf``)."""
  dtype = jnp.dtype(storage.dtype)
  if dtype == jnp.uint32:
    return MOMENT_FORMATS["mcf"]
  if jnp.issubdtype(dtype, jnp.floating):
    return native_format(dtype)
  raise TypeError(f"no moment format is stored as {dtype}.")


def _named(table: dict[str, Any], name: Any, kind: type, what: str) -> Any:
  """``table[name]``, or ``name`` itself when it is a ``kind`` already; a clear error otherwise."""
  if isinstance(name, kind):
    return name
  if name not in table:
    raise ValueError(f"unknown {what} format {name!r}; use one of {', '.join(map(repr, table))}.")
  return table[name]


def moment_format(name: Any) -> Format:
  """The :class:`Format` called ``name`` (``"bf16"``, ``"mcf"``, ``"f32"``), or ``name`` itself."""
  return _named(MOMENT_FORMATS, name, Format, "moment")


# ---------------------------------------------------------------------------
# Param formats: the param array is the first component.
# ---------------------------------------------------------------------------


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


def landed(p: Array, u: Array) -> Array:
  """Where ``optax.apply_updates`` puts ``p`` given ``u``: ``(p + u).astype(p.dtype)``, in float32.

  The rounding is explicit, so XLA's excess precision cannot hide it.
  """
  wide = jnp.promote_types(jnp.promote_types(p.dtype, u.dtype), jnp.float32)
  return mcf.round_to(widen(p).astype(wide) + widen(u).astype(wide), p.dtype).astype(jnp.float32)


def _emit(x: Array, hi: Array, p: Array, u_dtype: Any) -> tuple[Array, Array]:
  """The update that carries ``p`` to the format's new first component ``hi``, and where it lands.

  An ``x`` within the param's range never makes it overflow: the update is
  clipped to its dtype's range, and where ``apply_updates`` would still land
  on ±inf (rounding the update up past the param's largest value) the update
  is 0; the residual then holds the rest of ``x``. Beyond the range the
  param overflows, as ``apply_updates`` would.
  """
  big, finite = float(jnp.finfo(u_dtype).max), jnp.isfinite(hi)
  d = hi - widen(p)
  u = narrow(jnp.clip(d, jnp.where(finite, -big, -jnp.inf), jnp.where(finite, big, jnp.inf)), u_dtype)
  u = jnp.where(finite & ~jnp.isfinite(landed(p, u)), jnp.zeros_like(u), u)
  return u, landed(p, u)


def _mcf_param_encode(x: Array, p: Array, u_dtype: Any) -> tuple[Array, Array]:
  u, at = _emit(x, mcf.round_to(x, p.dtype), p, u_dtype)
  # Past the dtype's range the param overflows (as apply_updates would) and
  # the residual is 0, so the pair decodes to that ±inf, not to NaN.
  return u, narrow(jnp.where(jnp.isfinite(at), x - at, 0.0), p.dtype)


def _plain_param_encode(x: Array, p: Array, u_dtype: Any) -> tuple[Array, None]:
  return _emit(x, mcf.round_to(x, p.dtype), p, u_dtype)[0], None


_RESIDUAL_RANGE = (-(1 << 15), (1 << 15) - 1)


def _exact_init(p: Array) -> Array:
  if jnp.dtype(p.dtype) != _BF16:
    raise TypeError(
      f"param format 'exact' keeps bfloat16 params (the upper half of a float32); got a {jnp.dtype(p.dtype)} "
      "param. Use param_format='mcf' for float16 params."
    )
  return jnp.zeros_like(p, dtype=jnp.int16)


def _exact_decode(p: Array, r: Any) -> Array:
  """``(bits(p) << 16) + r`` as float32 bits: the float32 value, bit for bit."""
  hi = lax.bitcast_convert_type(p, jnp.uint16).astype(jnp.uint32) << 16
  return lax.bitcast_convert_type(hi + r.astype(jnp.int32).astype(jnp.uint32), jnp.float32)


def _exact_param_encode(x: Array, p: Array, u_dtype: Any) -> tuple[Array, Array]:
  """``hi`` = the bfloat16 nearest ``x`` with ties away from zero, ``r`` = the rest of its bits.

  ``hi_bits = (bits(x) + 0x8000) >> 16`` and ``r = bits(x) − (landed_bits << 16)``,
  in ``[−2**15, 2**15)`` when ``apply_updates`` lands on ``hi``; a landing
  miss larger than that (an update that is no ``u_dtype`` number, e.g. a bf16
  update across binades) is clipped to the residual's range, an error of at
  most the miss.
  """
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  # A NaN is made quiet (its quiet bit is in the upper half), so that hi is a NaN too.
  bits = jnp.where(jnp.isnan(x), bits | np.uint32(0x00400000), bits)
  hi = lax.bitcast_convert_type(((bits + np.uint32(0x8000)) >> 16) << 16, jnp.float32)
  u, at = _emit(x, hi, p, u_dtype)
  at_bits = lax.bitcast_convert_type(mcf.round_to(at, _BF16), jnp.uint32)
  r = bits.astype(jnp.int32) - at_bits.astype(jnp.int32)
  r = jnp.where(jnp.isfinite(at), jnp.clip(r, *_RESIDUAL_RANGE), 0)
  return u, r.astype(jnp.int16)


PARAM_FORMATS: dict[str, ParamFormat] = {
  # The mcf format always keeps a residual (init is zeros_like), so its decode never sees r=None.
  "mcf": ParamFormat("mcf", 2, jnp.zeros_like, lambda p, r: widen(p) + widen(cast(Array, r)), _mcf_param_encode),
  "bf16": ParamFormat("bf16", 0, lambda p: None, lambda p, r: widen(p), _plain_param_encode),
  "exact": ParamFormat("exact", 2, _exact_init, _exact_decode, _exact_param_encode),
}


def param_format(name: Any) -> ParamFormat:
  """The :class:`ParamFormat` called ``name`` (``"mcf"``, ``"bf16"``, ``"exact"``), or ``name`` itself."""
  return _named(PARAM_FORMATS, name, ParamFormat, "param")


def param_format_of(residual: Any) -> ParamFormat:
  """The param format whose residual ``residual`` is (from its dtype: a bf16/fp16 ``lo`` is ``mcf``)."""
  if residual is None:
    return PARAM_FORMATS["bf16"]
  dtype = jnp.dtype(residual.dtype)
  if dtype in (_BF16, jnp.dtype(jnp.float16)):
    return PARAM_FORMATS["mcf"]
  if dtype == jnp.int16:
    return PARAM_FORMATS["exact"]
  raise TypeError(f"no param format keeps a residual of dtype {dtype}.")
