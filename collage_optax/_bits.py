"""Bit-level helpers shared by the number type and the formats: powers of two, the wide type."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

#: The upper 16 bits of a float32: the bfloat16 it starts with.
HIGH_HALF = np.uint32(0xFFFF0000)


def pow2(k: jax.Array) -> jax.Array:
  """``2.0**k`` as a float32 for integer ``k`` in ``[−126, 127]``, built from its exponent bits (exact)."""
  return lax.bitcast_convert_type((k + 127).astype(jnp.uint32) << 23, jnp.float32)


def wide_dtype(dtype: Any) -> jnp.dtype:
  """The type arithmetic on ``dtype`` values is done in: float32, or the dtype itself when wider."""
  return jnp.promote_types(jnp.dtype(dtype), jnp.float32)
