"""The arithmetic every format shares: exact widening, explicit narrowing, where ``apply_updates`` lands."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from collage_optax import mcf

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


def finite_max(dtype: Any) -> float:
  """The largest finite value of ``dtype``."""
  return float(jnp.finfo(dtype).max)


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
