"""The per-leaf AdamW step of ``compact`` params as one Pallas kernel (one sweep over the params).

One leaf of ``adamw(mode="compact")`` (``compact`` params, ``q8`` ``m`` and
``v``) or ``adamw(mode="lean")`` (``compact`` params, a ``bf16`` ``m``, a
``log16`` ``v``), or any mix of those moments (compact with
``nu_format="log16"``, …), in one pass: decode the bfloat16 param and its
int8 residual and the moments (8-bit codes and per-32 bfloat16 scales, a
bfloat16 array, or 16-bit log codes and per-32 float32 maxima); Adam in
float32 (optax's formulas, as :func:`collage_optax._kernel.adam`);
decoupled weight decay and the learning rate; encode. The moments' formats
are static choices of the one kernel (:data:`MU_FORMATS`,
:data:`NU_FORMATS`, read from the storages' types). XLA's own fusions
cannot do it in one pass (a group's maximum is a reduction broadcast back
to its 32 elements); a kernel whose block holds whole groups can.

The kernel body mirrors the jnp path (:mod:`collage_optax._kernel`,
:mod:`collage_optax.formats`) operation for operation, so that in Pallas'
interpret mode on CPU it is bit for bit that path (``tests/test_pallas.py``).
Where the jnp path uses a primitive that Mosaic (TPU) or Triton (GPU) does
not lower, the body uses an equivalent with the same bits:
``reduce_precision`` to bfloat16 becomes a round-to-nearest-even on the bits
(:func:`_round_bf16`), ``round`` an integer truncation and its exact
fraction (:func:`_rint`), the bfloat16 bit-shift widening a convert (exact), and a
clip of a value that may be NaN a compare and a select (:func:`_clip`: Triton
lowers ``max``/``min`` to ``maxnumf``/``minnumf``, which drop a NaN).
``log16`` is integer-only (bit patterns, an integer maximum per group, the
lowbias32 hash): mirrored on int32, whose multiplications wrap as uint32's
and whose logical shifts are uint32's (:func:`_dither`).
The bias corrections are folded into the direction's scalars
(:func:`collage_optax._kernel.scaled`), computed outside. On Triton, divisions and square roots
are PTX's correctly rounded ones and no product is contracted into an FMA
(:class:`_Ptx`); whether Mosaic's division and square root round as XLA's
do is not checked here (no TPU).

FMAs: XLA:CPU contracts ``a·b + c`` inside a fusion, and the jnp path's bits
show it where a moment's rounding is fine enough: a ``bf16`` ``m`` and a
``log16`` ``v`` (the ``q8`` codes are too coarse to show it). There the
kernel computes the FMA that the jnp path compiles to (measured, see
:class:`_Interp`): exactly in interpret mode (float64), ``fma.rn`` on
Triton, ``a·b + c`` on Mosaic (whether Mosaic contracts it is not checked).
The jnp path's own choice depends on its fusion: a ``bf16`` ``m`` can round
differently when its leaf is compiled alone and inside a tree (a few
elements in a thousand, where ``(1 − b1)·g + b1·m`` is near a tie between
two bfloat16s); the kernel gives the former.

Layout: the leaf is seen as a 2-D array ``(rows, cols)`` whose rows hold
whole groups of 32: its own ``(prod(shape[:-1]), shape[-1])`` when the last
axis is a multiple of 32 (a 1-D leaf, or rows under 128: ``(n/W, W)``, on
TPU ``W = 128``, the 1-D layout's own memory), else the last axis padded to
one (a copy, outside the kernel; the padding's ``v`` codes are the NaN code,
``q8``'s or ``log16``'s, so that it never raises a group's maximum). The scales are
``(rows, cols/32)``. A block is ``(br, bc)`` with ``bc`` a multiple of 32, so
a group never straddles blocks.

Where it runs: :func:`platform_step` (``adamw`` calls it for compact leaves)
picks the kernel when the step is lowered for CUDA or TPU, the jnp path on
CPU; one device only (:func:`takes`: compact params with a ``q8`` or ``bf16``
``m`` and a ``q8`` or ``log16`` ``v``; other formats keep the jnp path).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from collage_optax import _kernel
from collage_optax.formats._log16 import _FLOOR, _NAN, _SHIFT, _ZERO, Log16
from collage_optax.formats._log16 import _bits as _log16_bits
from collage_optax.formats._moments import _Q8_MAX, GROUP, Q8
from collage_optax.formats._params import _COMPACT_LEVELS as _LEVELS

__all__ = ["Scalars", "compact_step", "scalars"]

_BF16 = jnp.dtype(jnp.bfloat16)
_F32_MAX = float(jnp.finfo(jnp.float32).max)
_BF16_MAX = float(jnp.finfo(_BF16).max)  # formats.BF16.max

#: The moment formats the kernel takes (static choices): ``m`` in ``q8`` or ``bf16``, ``v`` in ``q8`` or ``log16``.
MU_FORMATS = ("q8", "bf16")
NU_FORMATS = ("q8", "log16")


class Scalars(NamedTuple):
  """The float32 scalars of one step, computed outside the kernel as the jnp path computes them.

  ``b1``, ``b2``, ``c2 = 1 − b2`` (rounded once, as optax's weakly typed
  ``1 − decay``), ``wd`` the weight decay (0: none), ``nlr = −max(lr, 0)``,
  and the direction's (:class:`collage_optax._kernel.Scaled`, whose ``nc =
  1 − b1`` is also ``m``'s).
  """

  b1: Any
  c2: Any
  b2: Any
  wd: Any
  nlr: Any
  direction: _kernel.Scaled


# The order of the scalars in the kernel's scalar operand.
_NAMES = (*Scalars._fields[:-1], *_kernel.Scaled._fields)


def scalars(b1, b2, eps, eps_root, count_inc, lr, weight_decay, nesterov: bool) -> Scalars:
  """The :class:`Scalars` of a step, by the jnp path's own expressions (:func:`collage_optax._kernel.scaled`)."""
  f = lambda x: jnp.asarray(x, jnp.float32)
  sc = _kernel.scaled(b1, b2, eps, eps_root, count_inc, nesterov)
  return Scalars(f(b1), f(1 - b2), f(b2), f(weight_decay), -jnp.maximum(f(lr), 0), sc)


# ---------------------------------------------------------------------------
# Bit-exact stand-ins for the primitives the kernels cannot lower.
# ---------------------------------------------------------------------------


def _clip(x, lo, hi):
  """``jnp.clip(x, lo, hi)``, NaN kept on every backend: Triton lowers ``max``/``min`` (and so ``clip``) to
  ``maxnumf``/``minnumf``, which return the operand that is not NaN; a compare and a select keep it."""
  return jnp.where(x < lo, lo, jnp.where(x > hi, hi, x))


_saturate = functools.partial(_kernel.saturate, clip=_clip)


def _round_bf16(x):
  """``mcf.round_to(x, bfloat16)`` (``reduce_precision``) on float32 ``x``, by integer ops on its bits.

  Round to nearest even on the upper 16 bits; overflow carries into the
  exponent and gives ±inf, as ``reduce_precision`` does; a NaN stays a NaN.
  """
  b = jax.lax.bitcast_convert_type(x, jnp.int32)
  r = (b + (0x7FFF + ((b >> 16) & 1))) & np.int32(-65536)
  return jnp.where(jnp.isnan(x), x, jax.lax.bitcast_convert_type(r, jnp.float32))


def _rint(x):
  """``jnp.round(x)`` (nearest, ties to even) of float32 ``x`` by integer truncation (up to the sign of 0).

  ``(|x| + 2**23) − 2**23`` would do it in float arithmetic, but XLA folds
  that to ``|x|``; the truncation and the exact fraction it leaves cannot be
  folded.
  """
  a = jnp.abs(x)
  small = a < 8388608.0
  t = jnp.where(small, a, 0.0).astype(jnp.int32)
  f = a - t.astype(jnp.float32)  # exact: the fraction of |x|
  t = t + ((f > 0.5) | ((f == 0.5) & ((t & 1) == 1))).astype(jnp.int32)
  r = t.astype(jnp.float32)
  return jnp.where(small, jnp.where(x < 0, -r, r), x)


def _pow2(k):
  """``collage_optax._bits.pow2`` with int32 bits: ``2.0**k`` for integer ``k`` in ``[−126, 127]``."""
  # int32 first: under jax_enable_x64 a where() of Python ints is int64, whose bitcast would add an axis.
  return jax.lax.bitcast_convert_type((k + 127).astype(jnp.int32) << 23, jnp.float32)


def _half_ulp_exponent(hi):
  """``formats._params._half_ulp_exponent``: ``k`` with ``2**k = ulp(hi)/2``, at least −126."""
  e = (jax.lax.bitcast_convert_type(hi, jnp.int32) >> 23) & 0xFF
  return jnp.maximum(e - 127 - 8, -126)


class _Plain:
  """The float32 operations of the body that a compiler may round differently: here plain ``lax`` ops."""

  mul = staticmethod(lambda a, b: a * b)
  div = staticmethod(lambda a, b: a / b)
  sqrt = staticmethod(jnp.sqrt)
  #: ``a·b + c`` rounded once (an FMA), where XLA:CPU contracts the jnp path's moment update (see :class:`_Interp`).
  fma = staticmethod(lambda a, b, c: a * b + c)


def _fma64(a, b, c):
  """``a·b + c`` of float32s, rounded once to float32: in float64, whose product of two float32s is exact.

  (The float64 sum can round before the float32 rounding: a double rounding
  that differs from an FMA only where the float64 sum lands exactly halfway
  between two float32s, about 2**-29 of the inputs whose exponents are over
  21 apart.)
  """
  with jax.enable_x64(True):
    w = lambda x: jax.lax.convert_element_type(x, jnp.float64)
    return jax.lax.convert_element_type(w(a) * w(b) + w(c), jnp.float32)


class _Interp(_Plain):
  """:class:`_Plain` in interpret mode (XLA:CPU), with the moment updates' FMA made explicit.

  XLA:CPU contracts ``a·b + c`` into an FMA inside a fusion, and which
  product it contracts depends on the fusion, so on the format. Measured
  on the jnp path (jax 0.10.2, every element of random 64×256 leaves):
  a ``bf16`` ``m`` is ``fma(b1, m, round((1 − b1)·g))`` (0.6% of the stored
  bfloat16s differ from the unfused sum: ``0.1·g + 0.9·m`` is often exactly
  halfway between two bfloat16s), a ``log16`` ``v`` is
  ``fma(1 − b2, g², round(b2·v))`` (an ``f32`` ``v``, by contrast, contracts
  ``b2·v``); ``q8`` moments show no difference. In the kernel, XLA may also
  duplicate the computation into the fusion that stores the moment and the
  one that uses it and contract only one of them (seen on ``lean``: the step
  then uses a value other than the one stored). So where the jnp path's FMA
  shows, the kernel says which (:func:`_body`), and here computes it in
  float64, which has the FMA's bits in every copy.
  """

  fma = staticmethod(_fma64)


class _Ptx:
  """:class:`_Plain` in PTX with explicit rounding (Triton): correctly rounded ``div.rn``/``sqrt.rn``
  (Triton's own ``/`` is the approximate ``div.full``), and a ``mul.rn`` that is never contracted with the
  add that consumes it into an FMA (XLA:CPU rounds the product first)."""

  @staticmethod
  def _asm(op: str, *args):
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel

    xs = list(jnp.broadcast_arrays(*[jnp.asarray(a, jnp.float32) for a in args]))
    regs = ", ".join(f"${i}" for i in range(len(xs) + 1))
    (out,) = pltriton.elementwise_inline_asm(
      f"{op}.rn.f32 {regs};",
      args=xs,
      constraints=",".join(["=r"] + ["r"] * len(xs)),
      pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(xs[0].shape, jnp.float32)],
    )
    return out

  mul = staticmethod(lambda a, b: _Ptx._asm("mul", a, b))
  fma = staticmethod(lambda a, b, c: _Ptx._asm("fma", a, b, c))
  div = staticmethod(lambda a, b: _Ptx._asm("div", a, b))
  sqrt = staticmethod(lambda a: _Ptx._asm("sqrt", a))


# ---------------------------------------------------------------------------
# The formats, on a block (rows of whole groups of 32).
# ---------------------------------------------------------------------------


def _grouped(x):
  return x.reshape(x.shape[0], x.shape[1] // GROUP, GROUP)


def _ungrouped(x):
  return x.reshape(x.shape[0], x.shape[1] * GROUP)


def _q8_decode(codes, scales, signed: bool, o=_Plain):
  """``formats._moments._q8_decode``."""
  c = codes.astype(jnp.float32)
  if signed:
    z = c * (1.0 / 127.0)
    c = o.div(z, 2.0 - jnp.abs(z))
    s = scales.astype(jnp.float32)  # (× 1.0: XLA drops it)
  else:
    c = jnp.where(codes == 0, 0.5, c)
    s = scales.astype(jnp.float32) * (1.0 / 254.0)
  x = _ungrouped(_grouped(c) * s[:, :, None])
  if not signed:
    x = x * x
  return jnp.where(codes == (-128 if signed else 255), jnp.nan, x)


def _q8_encode(x, signed: bool, o=_Plain):
  """``formats._moments._q8_encoder``: ``(codes, scales)`` of float32 ``x``."""
  levels = 127.0 if signed else 254.0
  finite = jnp.isfinite(x)
  y = jnp.where(finite, x if signed else o.sqrt(jnp.maximum(x, 0.0)), 0.0)
  groups = _grouped(y)
  s = _round_bf16(jnp.max(jnp.abs(groups), axis=-1))
  inv = jnp.where(s > 0, o.div(1.0, jnp.where(s > 0, s, 1.0)), 0.0)
  y = _ungrouped(groups * inv[:, :, None])
  if signed:
    y = o.div(2.0 * y, 1.0 + jnp.abs(y))
  c = jnp.clip(_rint(levels * y), -levels if signed else 0.0, levels)
  c = jnp.where(finite, c, -128.0 if signed else 255.0)
  if signed:
    return c.astype(jnp.int8), s.astype(_BF16)
  # float → int32 → uint8: the codes are in [0, 255], so the same bits as a direct convert.
  return c.astype(jnp.int32).astype(jnp.uint8), s.astype(_BF16)


def _per_group(k):
  """A per-group ``(rows, groups)`` array repeated onto its groups' elements: ``(rows, groups·32)``."""
  return _ungrouped(jnp.broadcast_to(k[:, :, None], (*k.shape, GROUP)))


def _srl(x, k: int):
  """The logical right shift of int32 ``x`` (the bits of a uint32 ``>>``)."""
  return jax.lax.shift_right_logical(x, jnp.int32(k))


def _dither(b):
  """``formats._log16._dither`` (lowbias32 of the mantissa bits) on int32: wrapping multiplies, logical shifts.

  int32 and uint32 multiplication wrap to the same 32 bits, and a logical
  shift is uint32's ``>>``: the same bits as the jnp path's uint32 hash.
  """
  x = b & 0x7FFFFF
  x = x ^ _srl(x, 16)
  x = x * np.int32(0x7FEB352D)
  x = x ^ _srl(x, 15)
  x = x * np.int32(0x846CA68B - (1 << 32))
  x = x ^ _srl(x, 16)
  return x & ((1 << _SHIFT) - 1)


def _log16_decode(codes, scales):
  """``formats._log16._decode``: the float32 with bits ``bits(s) − c·2**12`` (integer ops and a bitcast)."""
  c = codes.astype(jnp.int32)
  top = _per_group(jax.lax.bitcast_convert_type(scales, jnp.int32))
  v = jax.lax.bitcast_convert_type(jnp.maximum(top - (c << _SHIFT), 0), jnp.float32)
  return jnp.where(c == _ZERO, 0.0, jnp.where(c == _NAN, jnp.nan, v))


def _log16_encode(x):
  """``formats._log16._encode``: ``(codes, scales)`` of float32 ``v`` (one integer max per group)."""
  b = _log16_bits(x)
  top = jnp.max(_grouped(b), axis=-1)
  d = _per_group(top) - b
  c = (d + _dither(b)) >> _SHIFT
  c = jnp.minimum(jnp.minimum(c, _per_group(top >> _SHIFT)), _FLOOR)
  c = jnp.where(b == 0, _ZERO, c)
  c = jnp.where(jnp.isfinite(x), c, _NAN)
  # int32 → uint16: the codes are in [0, 2**16), so the same bits as a direct convert.
  return c.astype(jnp.uint16), jax.lax.bitcast_convert_type(top, jnp.float32)


def _moment_in(fmt: str, refs, signed: bool, o):
  """The decoded old moment of ``fmt`` from its input refs (``q8``: codes and scales; ``bf16``: one; ``log16``: two)."""
  if fmt == "q8":
    return _q8_decode(refs[0][...], refs[1][...], signed, o)
  if fmt == "bf16":
    return refs[0][...].astype(jnp.float32)  # (exact: formats.widen)
  return _log16_decode(refs[0][...], refs[1][...])


def _moment_out(fmt: str, x, finite, outs, signed: bool, o):
  """``_kernel._moment``'s saturation and store of the new moment ``x``; returns the value the step uses.

  ``q8`` (coarse): saturates at 1e38, the step uses ``x`` before its
  rounding. ``bf16``: saturates at bfloat16's largest, the step uses the
  stored value. ``log16`` (its ``max`` is float32's): only an overflow to
  ±inf is replaced by ±float32 max, and the step uses the stored value.
  """
  if fmt == "q8":
    x = _saturate(x, finite, _Q8_MAX)
    outs[0][...], outs[1][...] = _q8_encode(x, signed, o)
    return x
  if fmt == "bf16":
    stored = _round_bf16(_saturate(x, finite, _BF16_MAX)).astype(_BF16)  # exact: rounded first
    outs[0][...] = stored
    return stored.astype(jnp.float32)  # (exact: formats.widen)
  x = jnp.where(finite & jnp.isinf(x), jnp.where(x < 0, -_F32_MAX, _F32_MAX), x)
  codes, scales = _log16_encode(x)
  outs[0][...], outs[1][...] = codes, scales
  return _log16_decode(codes, scales)


def _n_operands(fmt: str) -> int:
  """How many arrays a moment of ``fmt`` is stored in."""
  return 1 if fmt == "bf16" else 2


def _compact_decode(hi, r, o=_Plain):
  """``formats._params._compact_decode`` of ``hi`` (the bfloat16 param, widened) and the int8 residual ``r``."""
  k = _half_ulp_exponent(hi)
  s = jnp.where(k < -64, 64, 0)
  return (o.mul(hi, _pow2(s)) + o.mul(r.astype(jnp.float32), _pow2(k + s) * (1.0 / _LEVELS))) * _pow2(-s)


def _landed(p, u, narrow_u: bool):
  """``formats._arith.landed``: where ``apply_updates`` puts ``p`` (widened) given ``u`` (float32, of ``u``'s dtype)."""
  del narrow_u
  return _round_bf16(p + u)


def _compact_encode(x, p, u_big: float, narrow_u: bool, o=_Plain):
  """``formats._params._compact_param_encode`` (with ``formats._arith.emit``): ``(update, landed, residual)``.

  ``p`` is the old param widened; the update comes back as a float32 holding a
  value of the gradients' dtype (bfloat16 when ``narrow_u``, else float32).
  """
  hi = _round_bf16(x)
  finite = jnp.isfinite(hi)
  d = hi - p
  u = _saturate(d, finite, u_big)
  if narrow_u:
    u = _round_bf16(u)
  u = jnp.where(finite & ~jnp.isfinite(_landed(p, u, narrow_u)), jnp.zeros_like(u), u)
  at = _landed(p, u, narrow_u)
  k = _half_ulp_exponent(at)
  s = jnp.where(k < -64, 64, 0)
  r = _rint((o.mul(x, _pow2(s)) - o.mul(at, _pow2(s))) * _LEVELS * _pow2(-k - s))
  r = jnp.where(jnp.isfinite(at) & ~jnp.isnan(r), jnp.clip(r, -_LEVELS, _LEVELS), 0.0)
  return u, at, r.astype(jnp.int8)


# ---------------------------------------------------------------------------
# The kernel.
# ---------------------------------------------------------------------------


def _body(
  sc_ref, p_ref, g_ref, lo_ref, *refs,
  mu_fmt: str, nu_fmt: str, nesterov: bool, decay: bool, narrow_u: bool, emit_param: bool, o: Any = _Plain,
):  # fmt: skip
  """One block: the jnp path's ``_kernel.adam`` + ``alias.adamw``'s ``param_step`` for a compact leaf.

  ``refs``: the old ``m``'s and ``v``'s storages (by format), then the
  outputs: the update, the residual, the new ``m``'s and ``v``'s storages.
  """
  nm, nv = _n_operands(mu_fmt), _n_operands(nu_fmt)
  m_in, v_in, (u_ref, lo_out), rest = refs[:nm], refs[nm : nm + nv], refs[nm + nv : nm + nv + 2], refs[nm + nv + 2 :]
  m_out, v_out = rest[:nm], rest[nm:]
  s = {n: sc_ref[i] for i, n in enumerate(_NAMES)}
  g = g_ref[...].astype(jnp.float32)
  finite = jnp.isfinite(g)
  # _kernel._moment, for m and v: optax's (1 − b)·g + b·old, with the FMA XLA:CPU makes of it in the jnp
  # path where that shows in the stored bits (see _Interp): bf16 m: fma(b1, m, ·); log16 v: fma(1 − b2, g², ·).
  m_old, c1g = _moment_in(mu_fmt, m_in, True, o), o.mul(s["nc"], g)
  m = o.fma(s["b1"], m_old, c1g) if mu_fmt == "bf16" else c1g + o.mul(s["b1"], m_old)
  m = _moment_out(mu_fmt, m, finite, m_out, True, o)
  v_old, g2 = _moment_in(nu_fmt, v_in, False, o), g * g
  v = o.fma(s["c2"], g2, o.mul(s["b2"], v_old)) if nu_fmt == "log16" else o.mul(s["c2"], g2) + o.mul(s["b2"], v_old)
  v = _moment_out(nu_fmt, v, finite, v_out, False, o)
  # _kernel._scaled_direction: the bias corrections folded into the scalars, one clip.
  num = o.mul(s["nb"], m) + o.mul(s["nc"], g) if nesterov else m
  v = v - jnp.maximum(v - s["vmax"], 0.0)
  d = _clip(o.div(num, o.mul(o.sqrt(v + s["rc"]) + s["es"], s["k"])), -_F32_MAX, _F32_MAX)
  # alias.adamw's param_step: decoupled weight decay on the decoded param, the learning rate, the store.
  p = p_ref[...].astype(jnp.float32)
  x = _compact_decode(p, lo_ref[...], o)
  if decay:
    d = d + o.mul(s["wd"], x)
  d = o.mul(s["nlr"], d)
  u, at, r = _compact_encode(x + d, p, float(jnp.finfo(jnp.float32 if not narrow_u else _BF16).max), narrow_u, o)
  # The update, or (emit_param) where optax.apply_updates(p, update) lands: the new bfloat16 param.
  u_ref[...] = (at if emit_param else u).astype(u_ref.dtype)
  lo_out[...] = r


class _Blocks(NamedTuple):
  rows: int
  cols: int
  br: int
  bc: int


def _view_cols(shape: tuple[int, ...], widths: tuple[int, ...]) -> tuple[int, int]:
  """``(rows, cols)`` of the 2-D view of a leaf of ``shape`` (``cols`` a multiple of 32, padded if need be).

  A 1-D leaf, or one with rows under 128, is seen as ``(n/W, W)`` with ``W`` the first of ``widths`` that
  divides its size (its groups are consecutive in the flat order).
  """
  shape = shape or (1,)
  n = shape[-1]
  rows = math.prod(shape[:-1])
  if n % GROUP:
    return rows, n + (-n % GROUP)
  if len(shape) == 1 or n < 128:
    total = rows * n
    for w in widths:
      if total % w == 0:
        return total // w, w
  return rows, n


def _blocks(shape: tuple[int, ...], backend: str) -> _Blocks:
  # On TPU a 1-D array is laid out in runs of 1024 (float32) elements: its (n/128, 128) view, in (8, 128) tiles,
  # is the same memory (a bitcast); a wider view is a relayout (a copy of the leaf each way).
  widths = (1024, 512, 256, 128, 64, 32) if backend == "triton" else (128, 64, 32)
  rows, cols = _view_cols(tuple(shape), widths)
  if backend == "triton":
    # Power-of-two blocks of about 4096 elements (Triton's tensors are powers of two).
    bc = next(w for w in (1024, 512, 256, 128, 64, 32) if cols % w == 0)
    br = min(max(1, 4096 // bc), 1 << max(0, (rows - 1).bit_length()))
  else:
    # TPU: a block's last dimension is the whole row or a multiple of 128 (the scales': of 128·32), the
    # one before a multiple of 32 (int8 tiles) or the whole column. Rows wider than 8192 are cut in blocks
    # of 4096 or 8192, the last one partly past the row's end (whole groups of garbage, never written):
    # a (32, 50304) block does not fit v5e's VMEM.
    bc = cols
    if cols > 8192:
      bc = 8192 if cols % 8192 == 0 else 4096
    br = rows if rows <= 32 else 32
  return _Blocks(rows, cols, br, bc)


def _call(
  shape: tuple[int, ...],
  g_dtype: Any,
  backend: str,
  nesterov: bool,
  decay: bool,
  blocks: _Blocks | None = None,
  emit_param: bool = False,
  mu_fmt: str = "q8",
  nu_fmt: str = "q8",
):
  """The ``pallas_call`` over the 2-D views, for ``backend`` ("interpret", "triton" or "mosaic")."""
  rows, cols, br, bc = blocks or _blocks(shape, "triton" if backend == "triton" else "mosaic")
  grid = (pl.cdiv(rows, br), pl.cdiv(cols, bc))
  data = pl.BlockSpec((br, bc), lambda i, j: (i, j))
  scale = pl.BlockSpec((br, bc // GROUP), lambda i, j: (i, j))
  if backend == "mosaic":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel

    scalar = pl.BlockSpec(memory_space=pltpu.SMEM)
    params: Any = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=64 * 2**20)
  else:
    scalar = pl.BlockSpec((len(_NAMES),), lambda i, j: (0,))
    params = None
    if backend == "triton":
      from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel

      params = pltriton.CompilerParams(num_warps=4, num_stages=1)
  sds = lambda w, dt: jax.ShapeDtypeStruct((rows, w), dt)
  # Each moment's storage arrays (as formats._moments / formats._log16 lay them out) and their block specs.
  moment = {
    "q8m": ((sds(cols, jnp.int8), data), (sds(cols // GROUP, _BF16), scale)),
    "q8v": ((sds(cols, jnp.uint8), data), (sds(cols // GROUP, _BF16), scale)),
    "bf16": ((sds(cols, _BF16), data),),
    "log16": ((sds(cols, jnp.uint16), data), (sds(cols // GROUP, jnp.float32), scale)),
  }
  ms = moment["q8m" if mu_fmt == "q8" else mu_fmt]
  vs = moment["q8v" if nu_fmt == "q8" else nu_fmt]
  out_shape = (sds(cols, _BF16 if emit_param else g_dtype), sds(cols, jnp.int8), *(a for a, _ in ms + vs))
  moment_specs = [spec for _, spec in ms + vs]
  # What XLA's cost model cannot see inside the kernel: every operand and result read or written once.
  nbytes = lambda x: math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
  in_bytes = rows * cols * (2 + jnp.dtype(g_dtype).itemsize + 1) + sum(map(nbytes, out_shape[2:])) + 4 * len(_NAMES)
  cost = pl.CostEstimate(
    flops=80 * rows * cols, transcendentals=2 * rows * cols, bytes_accessed=in_bytes + sum(map(nbytes, out_shape))
  )
  # Inputs: scalars 0, p 1, g 2, residual 3, the moments' arrays from 4; outputs: update 0, residual 1, moments from 2.
  aliases = {3: 1, **{4 + k: 2 + k for k in range(len(moment_specs))}, **({1: 0} if emit_param else {})}
  return pl.pallas_call(
    functools.partial(
      _body,
      nesterov=nesterov,
      decay=decay,
      narrow_u=jnp.dtype(g_dtype) != jnp.float32,
      emit_param=emit_param,
      mu_fmt=mu_fmt,
      nu_fmt=nu_fmt,
      o={"triton": _Ptx, "interpret": _Interp}.get(backend, _Plain),
    ),
    out_shape=out_shape,
    grid=grid,
    in_specs=[scalar, data, data, data, *moment_specs],
    out_specs=(data, data, *moment_specs),
    input_output_aliases=aliases,
    compiler_params=params,
    interpret=backend == "interpret",
    name="collage_compact_adamw" if (mu_fmt, nu_fmt) == ("q8", "q8") else f"collage_compact_{mu_fmt}_{nu_fmt}_adamw",
    cost_estimate=cost,
  )


def moment_format(store: Any, second: bool) -> str | None:
  """The kernel's name of a moment storage's format (``None``: not one the kernel takes).

  ``m``: ``q8`` (a :class:`Q8` of int8 codes) or ``bf16`` (a bfloat16 array);
  ``v``: ``q8`` (a :class:`Q8` of uint8 codes) or ``log16`` (a :class:`Log16`).
  """
  if isinstance(store, Q8):
    return "q8" if jnp.dtype(store.codes.dtype) == (jnp.uint8 if second else jnp.int8) else None
  if second:
    return "log16" if isinstance(store, Log16) else None
  return "bf16" if hasattr(store, "dtype") and jnp.dtype(store.dtype) == _BF16 else None


def supported(p: Any, g: Any) -> bool:
  """Whether :func:`compact_step` takes this leaf: a bfloat16 param, bfloat16 or float32 gradients."""
  return jnp.dtype(p.dtype) == _BF16 and jnp.dtype(g.dtype) in (_BF16, jnp.dtype(jnp.float32))


def compact_step(
  p: jax.Array,
  g: jax.Array,
  lo: jax.Array,
  mu: Any,
  nu: Any,
  sc: Scalars,
  *,
  nesterov: bool = False,
  decay: bool = True,
  backend: str = "interpret",
  blocks: _Blocks | None = None,
  emit_param: bool = False,
) -> tuple[jax.Array, jax.Array, Any, Any]:
  """One compact leaf's AdamW step: ``(update, new residual, new mu, new nu)``, as the jnp path.

  ``p`` bfloat16, ``g`` bfloat16 or float32 (the update has its dtype), ``lo``
  the int8 residual, ``mu`` the ``m`` storage (a ``q8`` :class:`Q8` or a
  ``bf16`` array), ``nu`` the ``v`` storage (a ``q8`` :class:`Q8` or a
  :class:`Log16`): the formats are read from the storages' types, ``sc`` from
  :func:`scalars`; ``decay``: whether weight decay applies to this leaf.
  ``backend``: ``"interpret"`` (any platform; the CPU tests), ``"triton"``
  (GPU) or ``"mosaic"`` (TPU). ``emit_param``: the first output is the new
  bfloat16 param instead (``optax.apply_updates(p, update)``, bit for bit),
  written over ``p``: a step that needs no second pass to apply the update.
  """
  shape = tuple(p.shape) or (1,)
  n = shape[-1]
  b = blocks or _blocks(shape, "triton" if backend == "triton" else "mosaic")
  rows, cols = b.rows, b.cols

  def view(x, fill=0):
    x = x.reshape(shape)
    if cols * rows != math.prod(shape):  # the last axis padded to a multiple of 32
      x = jnp.pad(x, [(0, 0)] * (len(shape) - 1) + [(0, -n % GROUP)], constant_values=fill)
    return x.reshape(rows, cols)

  mu_fmt, nu_fmt = moment_format(mu, False), moment_format(nu, True)
  if mu_fmt is None or nu_fmt is None:
    what = f"{type(mu).__name__}/{type(nu).__name__}"
    raise TypeError(f"compact_step: moments {what} of formats the kernel does not take")
  sv = jnp.stack([jnp.asarray(x, jnp.float32) for x in (*sc[:-1], *sc.direction)])  # in _NAMES' order
  scales = lambda s: s.reshape(rows, cols // GROUP)
  # The padding's v is the NaN code, so that it never raises a group's maximum.
  m_ops = [view(mu)] if mu_fmt == "bf16" else [view(mu.codes), scales(mu.scales)]
  v_ops = [view(nu.codes, 255 if nu_fmt == "q8" else _NAN), scales(nu.scales)]
  outs = _call(shape, g.dtype, backend, nesterov, decay, b, emit_param, mu_fmt, nu_fmt)(
    sv, view(p), view(g), view(lo), *m_ops, *v_ops
  )
  u, r, *moments = outs

  def back(x):
    if cols * rows != math.prod(shape):
      x = x.reshape(*shape[:-1], cols)[..., :n]
    return x.reshape(p.shape)

  if mu_fmt == "bf16":
    mu_new, moments = back(moments[0]), moments[1:]
  else:
    mu_new, moments = Q8(back(moments[0]), moments[1].reshape(mu.scales.shape)), moments[2:]
  nu_new = type(nu)(back(moments[0]), moments[1].reshape(nu.scales.shape))
  return back(u), back(r), mu_new, nu_new


# ---------------------------------------------------------------------------
# The choice per lowering platform.
# ---------------------------------------------------------------------------


#: Tests: the kernel in interpret mode in place of the jnp path on CPU (read when a step is traced), so that
#: adamw's plumbing around it runs on this machine.
INTERPRET_ON_CPU = False

#: Whether :func:`takes` hands leaves to the kernel at all (read when a step is traced; benchmarks turn it off
#: to compile today's jnp path for the accelerators).
ENABLED = True


def takes(p: Any, g: Any, fmts: Any) -> bool:
  """Whether a leaf with formats ``fmts`` (a ``_kernel.LeafFormats``) gets the kernel on GPU and TPU.

  A bfloat16 param with ``compact`` params, a ``q8`` or ``bf16`` ``m`` and
  a ``q8`` or ``log16`` ``v`` (the ``compact`` and ``lean`` modes, and
  either with the other's ``m`` or ``v``), with bfloat16 or float32
  gradients, in a process that sees one device (deviceless compiles
  included: they run on the CPU's).
  """
  from collage_optax import formats  # pylint: disable=import-outside-toplevel

  return (
    ENABLED
    # A Pallas kernel is one custom call: XLA's SPMD partitioner cannot split it (Mosaic refuses a sharded
    # operand, "wrap the call in a shard_map"), and adamw does not know the mesh. One device only, for now.
    and jax.device_count() == 1
    and fmts is not None
    and fmts.param is formats.COMPACT
    and (fmts.mu is formats.Q8_M or fmts.mu is formats.BF16)
    and (fmts.nu is formats.Q8_V or fmts.nu is formats.LOG16)
    and hasattr(p, "dtype")
    and hasattr(g, "dtype")
    and supported(p, g)
  )


def platform_step(
  jnp_step, p, g, lo, mu: Any, nu: Any, sc: Scalars, *, nesterov: bool, decay: bool, emit_param: bool = False
):
  """``jnp_step(p, g, lo, mu, nu)`` on CPU (and any platform but these), the kernel on CUDA (Triton) and TPU (Mosaic).

  ``emit_param``: the kernel's first output is the new param (:func:`compact_step`); ``jnp_step`` must then
  return it too.

  The choice is made when the step is lowered (``lax.platform_dependent``),
  so a step compiled deviceless for a GPU or TPU gets the kernel too; on CPU
  only ``jnp_step`` is compiled.
  """

  def kernel(backend):
    return lambda p, g, lo, mu, nu: compact_step(
      p, g, lo, mu, nu, sc, nesterov=nesterov, decay=decay, backend=backend, emit_param=emit_param
    )

  default = kernel("interpret") if INTERPRET_ON_CPU else jnp_step
  return jax.lax.platform_dependent(p, g, lo, mu, nu, default=default, cuda=kernel("triton"), tpu=kernel("mosaic"))
