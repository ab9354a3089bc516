"""Storage formats: one float32 value kept in fewer bytes.

Everything an optimizer keeps per parameter -- the parameter itself, Adam's
``m`` and ``v`` -- is a float32 quantity *stored* in a format. A format is a
pair of pure elementwise functions, ``encode(x32) -> storage`` and
``decode(storage) -> x32``, plus its bytes per value. A step decodes, does its
arithmetic in float32 and encodes; the only roundings are the encode's, and
they are explicit (``lax.reduce_precision`` or integer bit operations), so
XLA's excess precision (``--xla_allow_excess_precision``) cannot remove them.

Two kinds:

* :class:`MomentFormat` -- a value kept entirely in the optimizer state (a moment):
  its storage is a single array of the parameter's shape, so that a jitted
  step writes it with a single loop (XLA:CPU has no multi-output fusion, and
  a value stored as two arrays would be computed twice and copied).

  ====== ========================== ===== ==========================================
  name   storage                    B     precision
  ====== ========================== ===== ==========================================
  bf16   bfloat16                   2     8 bits (``v`` with β2 = 0.999 stalls)
  mcf    uint32: bf16 hi | lo       4     ~16 bits: the paper's two-bfloat16 MCF
  f32    float32                    4     24 bits (alias ``exact``: the float32 bits)
  q8     :class:`Q8`: 8-bit codes   1.06  8 bits relative to a group's largest
         + a bf16 scale per 32            value (FlashOptim's moments)
  ====== ========================== ===== ==========================================

  ``q8`` has two variants: ``Q8_M`` stores ``m`` as int8 codes of
  ``φ(m/s) = 2y/(1+|y|)``, ``Q8_V`` stores ``v`` as uint8 codes of
  ``√v/s``, ``s`` the largest magnitude in each group of 32 along the last
  axis; :func:`moment_format` picks the one of the moment's role. The
  ``mcf`` moment (``MCF_PACKED``) is the paper's MCF packed in one uint32.

* :class:`ParamFormat` -- a parameter: its first component is the parameter
  array the model computes with (bfloat16 or float16); the rest (the
  *residual*) lives in the optimizer state.

  ======= =========================== == =========================================
  name    residual                    B  precision
  ======= =========================== == =========================================
  mcf     lo of the param's dtype     2  ~16 bits (bf16), ~22 (fp16): COLLAGE
  exact   int16 (bf16 params only)    2  24 bits: the float32, bit for bit
  compact int8 (bf16 params only)     1  ~16 bits: ``hi`` ± ulp(hi)/508
  bf16    none                        0  the param's own 8 (11) bits
  ======= =========================== == =========================================

An ``mcf`` value ``hi + lo`` (the packed moment ``MCF_PACKED``, or a
param with its residual ``MCF_RESIDUAL``) is the :class:`collage_optax.MCF`
number of ``collage_optax.mcf``: the encode is ``mcf.from_float``, the decode
``mcf.to_float``.

The optimizers resolve each leaf's formats once, from the names they were
given and the param (never from the state's dtypes); :func:`param_format_of`
reads a residual's format from its dtype for tools that see a state without
its optimizer (``master_params``).

References:
  T. Yu et al., "Collage: Light-Weight Low-Precision Strategy for LLM
  Training", ICML 2024 (the MCF formats).
  J. Ortiz et al., "FlashOptim", 2026 (the ``compact`` master-weight split and
  the companded 8-bit moments of ``q8``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from collage_optax import _tree, mcf
from collage_optax._bits import HIGH_HALF, pow2

__all__ = [
  "BF16",
  "COMPACT",
  "EXACT",
  "F32",
  "MCF_PACKED",
  "MCF_RESIDUAL",
  "MOMENT_FORMATS",
  "NO_RESIDUAL",
  "PARAM_FORMATS",
  "Q8",
  "Q8_M",
  "Q8_V",
  "MomentFormat",
  "ParamFormat",
  "emit",
  "landed",
  "lift_storage",
  "mcf_components",
  "moment_format",
  "moment_format_of",
  "narrow",
  "native_format",
  "param_format",
  "param_format_of",
  "per_param",
  "q8_bound",
  "widen",
]

Array = jax.Array

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


class MomentFormat(NamedTuple):
  """A storage format for a value kept in the optimizer state (a moment).

  ``zeros(like)`` is the storage of 0 for an array shaped like ``like``;
  ``encode`` rounds a float32 array into the storage, ``decode`` returns its
  float32 value; ``max`` is the largest finite value it holds (the step
  saturates finite results there); ``bytes`` per value. ``coarse``: a format
  of 8 significant bits or fewer, whose step uses the new value before its
  rounding rather than the stored one (2**-9 relative for ``bf16``).
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


_zeros = lambda dtype: lambda like: jnp.zeros_like(like, dtype=dtype)  # keeps the sharding

# ---------------------------------------------------------------------------
# q8: 8-bit codes and one bfloat16 scale per group of 32 along the last axis.
# ---------------------------------------------------------------------------

_GROUP = 32


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


def _grouped(x: Array) -> Array:
  """``x`` (any shape) as ``(..., groups, 32)`` along its last axis, zero-padded."""
  x = jnp.reshape(x, x.shape or (1,))
  pad = -x.shape[-1] % _GROUP
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(*x.shape[:-1], -1, _GROUP)


def _ungrouped(x: Array, shape: tuple[int, ...]) -> Array:
  """The inverse of :func:`_grouped`: drops the padding, restores ``shape``."""
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
    groups = _grouped(y)
    s = mcf.round_to(jnp.max(jnp.abs(groups), axis=-1), _BF16)
    inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
    y = _ungrouped(groups * inv[..., None], x.shape)
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
  x = _ungrouped(_grouped(c) * s[..., None], shape)
  if not signed:
    x = x * x
  return jnp.where(q.codes == _Q8_NAN[jnp.dtype(q.codes.dtype)], jnp.nan, x)


def _q8_zeros(dtype: Any) -> Callable[[Any], Q8]:
  def zeros(like: Any) -> Q8:
    codes = jnp.zeros_like(like, dtype=dtype)  # keeps the sharding
    # The scales by the reduction the encode uses, so that they get the sharding a step gives them.
    return Q8(codes, jnp.max(_grouped(jnp.zeros_like(like, dtype=_BF16)), axis=-1))

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


_Q8_BYTES = 1 + 2 / _GROUP

#: ``bf16``: one bfloat16 (8 significant bits).
BF16 = MomentFormat("bf16", 2, _zeros(_BF16), _bf16_encode, widen, _finite_max(_BF16), coarse=True)
#: ``mcf``: the paper's two-bfloat16 MCF (~16 bits), packed in a uint32.
MCF_PACKED = MomentFormat("mcf", 4, _zeros(jnp.uint32), _mcf_encode, _mcf_decode, _finite_max(_BF16))
#: ``f32``: float32 (the ``exact`` preset's ``v``).
F32 = MomentFormat(
  "f32", 4, _zeros(jnp.float32), lambda x: x.astype(jnp.float32), lambda s: s, _finite_max(jnp.float32)
)
#: ``q8`` for a first moment: int8 codes of ``φ(m/s)``, a bfloat16 scale per 32.
Q8_M = MomentFormat("q8", _Q8_BYTES, _q8_zeros(jnp.int8), _q8_encoder(True), _q8_decode, _Q8_MAX, coarse=True)
#: ``q8`` for a second moment (``v ≥ 0``): uint8 codes of ``√v/s``, a bfloat16 scale per 32.
Q8_V = MomentFormat("q8", _Q8_BYTES, _q8_zeros(jnp.uint8), _q8_encoder(False), _q8_decode, _Q8_MAX, coarse=True)

#: The moment formats by name (``exact`` is ``f32``: the float32 bits, as the ``exact`` param format keeps them).
MOMENT_FORMATS: dict[str, MomentFormat] = {"bf16": BF16, "mcf": MCF_PACKED, "f32": F32, "exact": F32, "q8": Q8_M}


def native_format(dtype: Any) -> MomentFormat:
  """The format that stores a value in ``dtype`` itself (float32/float64 params' moments)."""
  dtype = jnp.dtype(dtype)
  if dtype == _BF16:
    return BF16
  if dtype == jnp.float32:
    return F32
  return MomentFormat(
    dtype.name,
    dtype.itemsize,
    _zeros(dtype),
    lambda x: narrow(x, dtype),
    lambda s: s.astype(jnp.promote_types(dtype, jnp.float32)),
    _finite_max(dtype),
  )


def moment_format_of(storage: Any) -> MomentFormat:
  """The format of a moment's storage found in a state, from its dtype (a packed uint32 is ``mcf``).

  For reading a state without its optimizer (``moment_format_of(s).decode(s)``)
  and for error messages; the optimizers never guess a format from a dtype.
  """
  if isinstance(storage, Q8):
    return Q8_M if jnp.dtype(storage.codes.dtype) == jnp.int8 else Q8_V
  dtype = jnp.dtype(storage.dtype)
  if dtype == jnp.uint32:
    return MCF_PACKED
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


def moment_format(name: Any, *, second: bool = False) -> MomentFormat:
  """The :class:`MomentFormat` called ``name`` (a key of :data:`MOMENT_FORMATS`), or ``name`` itself.

  ``second=True`` asks for the format of a second moment (``v ≥ 0``):
  ``"q8"`` is then ``Q8_V``, unsigned codes of ``√v``; a first moment's
  ``"q8"`` is always ``Q8_M``. Every other format holds either sign.
  """
  fmt = _named(MOMENT_FORMATS, name, MomentFormat, "moment")
  if fmt in (Q8_M, Q8_V):
    return Q8_V if second else Q8_M
  return fmt


def per_param(tree: Any) -> Any:
  """A state tree with each storage of several arrays (a ``q8`` moment's codes and scales) as one leaf.

  So that a moment tree has the params' tree structure.
  """
  is_leaf = lambda x: isinstance(x, Q8) or _tree.is_empty(x)
  return jax.tree.map(lambda x: x.codes if isinstance(x, Q8) else x, tree, is_leaf=is_leaf)


def lift_storage(tree: Any) -> Any:
  """A state tree with each flax ``nnx.Variable`` holding a ``q8`` moment split into two, under the ``Q8``.

  ``tx.init(nnx.state(model, nnx.Param))`` mirrors the params' Variables;
  a Variable's value must be an array (``nnx.Optimizer`` writes each step's
  state back into it with ``nnx.update``, which would turn a pytree value
  into an ``nnx.State``), so a ``Q8(codes, scales)`` value becomes
  ``Q8(Variable(codes), Variable(scales))``.
  """
  if "flax" not in sys.modules:
    return tree
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def lift(x):
    if isinstance(x, nnx.Variable) and isinstance(x.get_value(), Q8):
      q = x.get_value()
      return Q8(x.replace(q.codes), x.replace(q.scales))
    return x

  return jax.tree.map(lift, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


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


def emit(x: Array, hi: Array, p: Array, u_dtype: Any) -> tuple[Array, Array]:
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

#: The param formats by name.
PARAM_FORMATS: dict[str, ParamFormat] = {f.name: f for f in (MCF_RESIDUAL, NO_RESIDUAL, EXACT, COMPACT)}


def param_format(name: Any) -> ParamFormat:
  """The :class:`ParamFormat` called ``name`` (a key of :data:`PARAM_FORMATS`), or ``name`` itself."""
  return _named(PARAM_FORMATS, name, ParamFormat, "param")


def param_format_of(residual: Any) -> ParamFormat:
  """The param format of a residual found in a state, from its dtype (a bf16/fp16 ``lo`` is ``mcf``).

  For reading a state without its optimizer (``master_params``); the
  optimizers themselves never guess a format from a dtype.
  """
  if residual is None:
    return NO_RESIDUAL
  dtype = jnp.dtype(residual.dtype)
  if dtype in (_BF16, jnp.dtype(jnp.float16)):
    return MCF_RESIDUAL
  if dtype == jnp.int16:
    return EXACT
  if dtype == jnp.int8:
    return COMPACT
  raise TypeError(f"no param format keeps a residual of dtype {dtype}.")
