"""The Adam kernel shared by ``adamw`` and ``scale_by_adam``, and the store of a param's new value.

Every leaf's formats are resolved once by the front-end (:class:`LeafFormats`)
and passed in; nothing here reads a format from an array's dtype. Per leaf
the arithmetic is float32 (float64 for float64 leaves), optax's own
formulas (Kingma & Ba 2015; ``optax.tree.update_moment``,
``optax.tree.bias_correction``), between a decode and an encode.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from optax import tree_utils as otu

from collage_optax import _tree, formats

__all__ = ["Adam", "LeafFormats", "adam", "init_leaf", "init_residual", "leaf_formats", "saturate", "store_param"]


class LeafFormats(NamedTuple):
  """The storage of one leaf: its residual's format (``None``: no residual) and its moments'."""

  param: formats.ParamFormat | None
  mu: formats.MomentFormat
  nu: formats.MomentFormat


def saturate(x: chex.Array, finite: chex.Array, big: float) -> chex.Array:
  """``x`` clipped to ``[−big, big]`` where ``finite``, else ``x``.

  ``finite`` marks the elements whose gradient was finite: there a result
  beyond the storage (``g²`` for ``|g| > 1.8e19``, a moment above the format's
  largest value) saturates instead of becoming ``inf``, which would freeze Adam
  for good (``u = m / √inf = 0``). Non-finite gradients still propagate, as in
  optax (use ``optax.apply_if_finite`` to skip them).
  """
  # Clipping to ±inf where not finite leaves x as it is and uses x once.
  return jnp.clip(x, jnp.where(finite, -big, -jnp.inf), jnp.where(finite, big, jnp.inf))


def _moment(g: chex.Array, store: Any, fmt: formats.MomentFormat, decay: Any, order: int) -> tuple[Any, chex.Array]:
  """The new storage of one moment and the value this step uses.

  ``m ← (1 − b1)·g + b1·m`` (``order=1``) or ``v ← (1 − b2)·g² + b2·v``
  (``order=2``), in ``g``'s (wide) type from the decoded stored moment,
  encoded once, saturating at the format's largest value where ``g`` is
  finite. The value used is read back from the storage, so that the stored
  moment is the one intermediate of the step's single pass (XLA:TPU splits
  the pass in two when the unrounded moment feeds the direction and its
  rounding the store; XLA:CPU would copy the donated old moment), except for
  a ``coarse`` (8-bit) format: there the step uses the value before its
  rounding, as FlashOptim does for its 8-bit moments.
  """
  finite = jnp.isfinite(g)
  old = fmt.decode(store).astype(g.dtype)
  new = (
    otu.tree_update_moment(g, old, decay, 1) if order == 1 else otu.tree_update_moment_per_elem_norm(g, old, decay, 2)
  )
  big = float(jnp.finfo(g.dtype).max)
  if fmt.max < big:
    new = saturate(new, finite, fmt.max)
  else:  # Only an overflow to ±inf: a clip here would change how XLA fuses optax's formula.
    new = jnp.where(finite & jnp.isinf(new), jnp.copysign(big, new), new)
  stored = fmt.encode(new)
  return stored, new if fmt.coarse else fmt.decode(stored).astype(g.dtype)


def _direction(g: chex.Array, fmt: formats.MomentFormat, m: Any, v: Any, m_hat: Any, v_hat: Any, eps, eps_root):
  """Adam's ``m̂ / (√(v̂ + eps_root) + eps)`` of one leaf; finite gradients give a finite direction."""
  finite, big = jnp.isfinite(g), float(jnp.finfo(g.dtype).max)
  if fmt.max < big:
    m_hat, v_hat = saturate(m_hat, finite, big), saturate(v_hat, finite, big)
    return saturate(m_hat / (jnp.sqrt(v_hat + eps_root) + eps), finite, big)
  # A moment of the leaf's own dtype: optax's expression untouched, so that
  # XLA compiles it as in optax (the same bits: a clip on it, or any other
  # arithmetic with its operands, changes how it fuses). Only moments beyond
  # 1e30 can overflow m̂ or v̂ (for 1 − b ≥ 3.4e-9); there the step is
  # sign(m), the size Adam's normalised step has when |g| dominates.
  overflow = finite & ((jnp.abs(m) > 1e30) | (v > 1e30))
  return jnp.where(overflow, jnp.sign(m), m_hat / (jnp.sqrt(v_hat + eps_root) + eps))


class Adam(NamedTuple):
  """Adam's hyperparameters (Kingma & Ba 2015; Nesterov as in ``optax.scale_by_adam``)."""

  b1: Any
  b2: Any
  eps: Any
  eps_root: Any
  nesterov: bool


def adam(
  grads: list[Any],
  mus: list[Any],
  nus: list[Any],
  fmts: list[LeafFormats | None],
  wides: list[Any],
  hp: Adam,
  count_inc: chex.Array,
) -> tuple[list[chex.Array | None], list[Any], list[Any]]:
  """Adam over a list of leaves: ``(directions, new mu storages, new nu storages)``.

  Each gradient is widened exactly to its leaf's arithmetic type in
  ``wides``; a leaf without formats (``None``) or without a gradient takes
  no step: its storages come back unchanged and its direction is ``None``.
  ``count_inc`` is the incremented step count. The bias corrections are
  optax's ``tree_bias_correction`` over all leaves at once, as in
  ``optax.scale_by_adam`` (so that XLA compiles the same division; Nesterov
  as there too).
  """
  b1, b2, eps, eps_root, nesterov = hp
  gs = [None if f is None or _tree.is_empty(g) else formats.widen(g).astype(w) for g, f, w in zip(grads, fmts, wides)]
  steps = [i for i, g in enumerate(gs) if g is not None]
  new_mus, new_nus = list(mus), list(nus)
  m: list[chex.Array] = []
  v: list[chex.Array] = []
  for i in steps:
    g, fmt = gs[i], fmts[i]
    assert g is not None and fmt is not None
    new_mus[i], m_i = _moment(g, mus[i], fmt.mu, b1, 1)
    new_nus[i], v_i = _moment(g, nus[i], fmt.nu, b2, 2)
    m.append(m_i)
    v.append(v_i)
  g_steps = [gs[i] for i in steps]
  if nesterov:
    m_hat = jax.tree.map(
      lambda m, g: b1 * m + (1 - b1) * g,
      otu.tree_bias_correction(m, b1, optax.safe_increment(count_inc)),
      otu.tree_bias_correction(g_steps, b1, count_inc),
    )
  else:
    m_hat = otu.tree_bias_correction(m, b1, count_inc)
  v_hat = otu.tree_bias_correction(v, b2, count_inc)
  dirs: list[chex.Array | None] = [None] * len(gs)
  for j, i in enumerate(steps):
    fmt = fmts[i]
    assert fmt is not None
    dirs[i] = _direction(g_steps[j], fmt.mu, m[j], v[j], m_hat[j], v_hat[j], eps, eps_root)
  return dirs, new_mus, new_nus


# ---------------------------------------------------------------------------
# A param's new value, stored.
# ---------------------------------------------------------------------------


def _after(u: chex.Array, r: chex.Array) -> chex.Array:
  """``u``, made to depend on ``r`` (XLA cannot see that it does not).

  ``optax.apply_updates(p, u)`` overwrites the donated param, which the loop
  computing the residual ``r`` reads too. XLA:CPU copies a donated input
  unless every other reader of it is an ancestor of the loop that overwrites
  it; this dependence makes the residual's loop one (an
  ``optimization_barrier`` does not survive to copy insertion). ``u`` is
  replaced by ``−u`` where the select's condition holds, which it never does:
  a float residual with a signalling-NaN bit pattern (no arithmetic produces
  one), an integer residual whose ``r | 1`` is 0.
  """
  if jnp.issubdtype(r.dtype, jnp.integer):
    never = (r | 1) == 0
  else:
    bits = lax.bitcast_convert_type(r, jnp.uint16 if r.dtype.itemsize == 2 else jnp.uint32)
    pattern = 0x7F81 if r.dtype == jnp.bfloat16 else 0x7C01 if r.dtype.itemsize == 2 else 0x7F800001
    never = bits == np.array(pattern, bits.dtype)
  return jnp.where(never, -u, u)


def store_param(
  p: chex.Array,
  lo: Any,
  x: chex.Array,
  u_dtype: Any,
  fmt: formats.ParamFormat,
) -> tuple[chex.Array, Any, chex.Array]:
  """Stores the new float32 value ``x`` of a bfloat16/float16 param: ``(update, new residual, Δθ_eff)``.

  The update carries ``p`` to the format's first component under
  ``optax.apply_updates``; ``Δθ_eff`` is how far the decoded value moved.
  """
  u, lo_new = fmt.encode(x, p, u_dtype)
  if lo_new is not None:
    u = _after(u, lo_new)
  delta = fmt.decode(formats.narrow(formats.landed(p, u), p.dtype), lo_new) - fmt.decode(p, lo)
  return u, lo_new, delta


# ---------------------------------------------------------------------------
# Formats per leaf, resolved once.
# ---------------------------------------------------------------------------


def leaf_formats(
  kind: str,
  dtype: Any,
  low: LeafFormats,
  mu_native: formats.MomentFormat | None = None,
) -> LeafFormats | None:
  """The formats of a leaf of ``kind`` (:func:`collage_optax.checks.leaf_kind`) and ``dtype``.

  bfloat16/float16 leaves (``"low"``) get ``low``; float32/float64 leaves
  keep moments of their own dtype (the first in ``mu_native`` when given,
  as ``optax.adamw``'s ``mu_dtype``) and no residual; other leaves nothing.
  """
  if kind == "low":
    return low
  if kind == "native":
    native = formats.native_format(dtype)
    return LeafFormats(None, mu_native or native, native)
  return None


def init_residual(who: str, path: str, p: Any, fmt: formats.ParamFormat | None) -> Any:
  """``fmt.init(p)`` (``None`` without a format), naming the leaf in the error of a format that cannot keep ``p``."""
  if fmt is None:
    return None
  try:
    return fmt.init(p)
  except TypeError as e:
    raise TypeError(f"{who}: leaf {path}: {e}") from None


def init_leaf(who: str, path: str, p: Any, fmts: LeafFormats | None) -> tuple[Any, Any, Any]:
  """The zero storages ``(mu, nu, residual)`` of one leaf (``None`` for what it does not keep)."""
  if fmts is None:
    return None, None, None
  return fmts.mu.zeros(p), fmts.nu.zeros(p), init_residual(who, path, p, fmts.param)
