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
  log16  :class:`Log16`: uint16     2.13  ``v`` only: ``2**-11`` relative, 32 octaves
         codes of log2 v + an f32         below a group's largest (then a floor)
         scale per 32
  ====== ========================== ===== ==========================================

  ``q8`` has two variants: ``Q8_M`` stores ``m`` as int8 codes of
  ``φ(m/s) = 2y/(1+|y|)``, ``Q8_V`` stores ``v`` as uint8 codes of
  ``√v/s``, ``s`` the largest magnitude in each group of 32 along the last
  axis; :func:`moment_format` picks the one of the moment's role. The
  ``mcf`` moment (``MCF_PACKED``) is the paper's MCF packed in one uint32.
  ``log16`` (``LOG16``) holds a second moment only: uint16 codes counting
  1/2048 octaves of Mitchell's ``log2`` down from ``s``, the largest ``v`` of
  its group of 32, rounded stochastically by a hash of ``v``'s bits (integer
  operations only); see :func:`log16_bound`.

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
from typing import Any

import jax
import jax.numpy as jnp

from collage_optax import _tree
from collage_optax.formats._arith import emit, finite_max, landed, narrow, widen
from collage_optax.formats._log16 import LOG16, Log16, log16_bound
from collage_optax.formats._moments import (
  BF16,
  F32,
  MCF_PACKED,
  Q8,
  Q8_M,
  Q8_V,
  MomentFormat,
  mcf_components,
  q8_bound,
  zeros_of,
)
from collage_optax.formats._params import COMPACT, EXACT, MCF_RESIDUAL, NO_RESIDUAL, ParamFormat

__all__ = [
  "BF16",
  "COMPACT",
  "EXACT",
  "F32",
  "GROUPED",
  "LOG16",
  "MCF_PACKED",
  "MCF_RESIDUAL",
  "MOMENT_FORMATS",
  "NO_RESIDUAL",
  "PARAM_FORMATS",
  "Q8",
  "Q8_M",
  "Q8_V",
  "Log16",
  "MomentFormat",
  "ParamFormat",
  "emit",
  "landed",
  "lift_storage",
  "log16_bound",
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

_BF16 = jnp.dtype(jnp.bfloat16)

#: The moment formats by name (``exact`` is ``f32``: the float32 bits, as the ``exact`` param format keeps them;
#: ``log16`` holds second moments only).
MOMENT_FORMATS: dict[str, MomentFormat] = {
  "bf16": BF16,
  "mcf": MCF_PACKED,
  "f32": F32,
  "exact": F32,
  "q8": Q8_M,
  "log16": LOG16,
}

#: The grouped storages (a NamedTuple of per-element ``codes`` and per-group ``scales``): one leaf per param.
GROUPED = (Q8, Log16)


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
    zeros_of(dtype),
    lambda x: narrow(x, dtype),
    lambda s: s.astype(jnp.promote_types(dtype, jnp.float32)),
    finite_max(dtype),
  )


def moment_format_of(storage: Any) -> MomentFormat:
  """The format of a moment's storage found in a state, from its dtype (a packed uint32 is ``mcf``).

  For reading a state without its optimizer (``moment_format_of(s).decode(s)``)
  and for error messages; the optimizers never guess a format from a dtype.
  """
  if isinstance(storage, Q8):
    return Q8_M if jnp.dtype(storage.codes.dtype) == jnp.int8 else Q8_V
  if isinstance(storage, Log16):
    return LOG16
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
  ``"q8"`` is always ``Q8_M``. ``"log16"`` holds second moments only (a
  ``ValueError`` without ``second``). Every other format holds either sign.
  """
  if isinstance(name, MomentFormat):  # a format object is taken as it is (a first moment's Q8_M promoted for v)
    return Q8_V if second and name is Q8_M else name
  fmt = _named(MOMENT_FORMATS, name, MomentFormat, "moment")
  if fmt is LOG16 and not second:
    raise ValueError(
      "moment format 'log16' stores a second moment (v >= 0: codes of log2 v) and cannot hold a first "
      "moment's sign; use it as nu_format='log16', and 'bf16', 'mcf', 'f32' or 'q8' for mu_format."
    )
  if fmt in (Q8_M, Q8_V):
    return Q8_V if second else Q8_M
  return fmt


def per_param(tree: Any) -> Any:
  """A state tree with each grouped storage (a ``q8``/``log16`` moment's codes and scales) as one leaf: its codes.

  So that a moment tree has the params' tree structure.
  """
  is_leaf = lambda x: isinstance(x, GROUPED) or _tree.is_empty(x)
  return jax.tree.map(lambda x: x.codes if isinstance(x, GROUPED) else x, tree, is_leaf=is_leaf)


def lift_storage(tree: Any) -> Any:
  """A state tree with each flax ``nnx.Variable`` holding a grouped moment (``Q8``, ``Log16``) split into two, under it.

  ``tx.init(nnx.state(model, nnx.Param))`` mirrors the params' Variables;
  a Variable's value must be an array (``nnx.Optimizer`` writes each step's
  state back into it with ``nnx.update``, which would turn a pytree value
  into an ``nnx.State``), so a ``Q8(codes, scales)`` value becomes
  ``Q8(Variable(codes), Variable(scales))`` (a ``Log16`` likewise).
  """
  if "flax" not in sys.modules:
    return tree
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def lift(x):
    if isinstance(x, nnx.Variable) and isinstance(x.get_value(), GROUPED):
      q = x.get_value()
      return type(q)(x.replace(q.codes), x.replace(q.scales))
    return x

  return jax.tree.map(lift, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
