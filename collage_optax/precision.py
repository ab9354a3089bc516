"""What precision costs: effective descent quality and the lost fraction.

``edq = <Δθ_eff, u> / ||u||²``, where ``Δθ_eff`` is how far the params
actually moved and ``u`` the intended update (1.0: nothing lost), and
``lost_fraction``, the share of elements with ``u != 0`` whose param did not
change at all; globally and per top-level subtree of the params. The
transformations record them with ``track_metrics=True``;
:func:`measure_precision` records them for any chain without compensation;
:func:`metrics` reads them out of any state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax.numpy as jnp
import optax

from collage_optax import _tree, checks, formats

__all__ = ["PrecisionMetrics", "PrecisionState", "measure_precision", "metrics"]


class PrecisionMetrics(NamedTuple):
  """What precision cost in the last step.

  ``edq = <Δθ_eff, u> / ||u||²`` (1.0 = nothing lost), ``lost_fraction`` = share
  of elements with ``u != 0`` whose param did not change; globally and per
  top-level subtree of the params.
  """

  edq: chex.Array
  lost_fraction: chex.Array
  edq_by_subtree: dict[str, chex.Array]
  lost_fraction_by_subtree: dict[str, chex.Array]


def init_metrics(params: Any) -> PrecisionMetrics:
  """The metrics before any step: nothing lost."""
  groups = _tree.top_level_groups(params)
  one, zero = jnp.ones([], jnp.float32), jnp.zeros([], jnp.float32)
  return PrecisionMetrics(one, zero, {k: one for k in groups}, {k: zero for k in groups})


def leaf_sums(delta: chex.Array, u: chex.Array) -> chex.Array:
  """``[<Δ, u>, ||u||², #(u != 0), #(u != 0 and Δ == 0)]`` of one leaf, float32."""
  delta, u = delta.astype(jnp.float32), u.astype(jnp.float32)
  moved = u != 0
  return jnp.stack(
    [
      jnp.sum(delta * u),
      jnp.sum(u * u),
      jnp.sum(moved, dtype=jnp.float32),
      jnp.sum(moved & (delta == 0), dtype=jnp.float32),
    ]
  )


def landing_sums(p: Any, u: Any) -> chex.Array | None:
  """:func:`leaf_sums` of plain ``optax.apply_updates`` (``Δθ_eff = round(θ + u) − θ``); ``None`` for non-floats."""
  if not (_tree.is_float(p) and _tree.is_float(u)):
    return None
  return leaf_sums(formats.landed(p, u) - formats.widen(p), u)


def _ratios(sums: chex.Array) -> tuple[chex.Array, chex.Array]:
  dot, uu, nz, lost = sums
  edq = jnp.where(uu > 0, dot / jnp.where(uu > 0, uu, 1.0), 1.0)
  lost_fraction = jnp.where(nz > 0, lost / jnp.where(nz > 0, nz, 1.0), 0.0)
  return edq, lost_fraction


def compute_metrics(params: Any, sums: list[chex.Array | None]) -> PrecisionMetrics:
  """Global and per-subtree metrics from per-leaf sums (``None`` = not measured)."""
  zero = jnp.zeros([4], jnp.float32)
  filled = [zero if s is None else s for s in sums]
  edq, lost = _ratios(sum(filled, zero))
  by_edq, by_lost = {}, {}
  for key, idx in _tree.top_level_groups(params).items():
    by_edq[key], by_lost[key] = _ratios(sum((filled[i] for i in idx), zero))
  return PrecisionMetrics(edq, lost, by_edq, by_lost)


class PrecisionState(NamedTuple):
  """State of :func:`measure_precision`."""

  metrics: PrecisionMetrics


def measure_precision() -> optax.GradientTransformation:
  """Records EDQ and lost fraction of plain ``apply_updates``, changing nothing.

  The last link of a chain *without* compensation (e.g. ``optax.adamw`` on
  bf16 or fp32 params), to see what rounding costs it:
  ``Δθ_eff = round(θ + u) − θ``. Read with :func:`collage_optax.metrics`.
  """
  who = "collage_optax.measure_precision"

  def init_fn(params):
    return PrecisionState(init_metrics(params))

  def update_fn(updates, state, params=None):
    checks.require_params(who, params)
    checks.check_structure(who, params, "params", updates, "updates")
    p_flat, treedef = _tree.leaves_with_paths(params)
    sums = [landing_sums(p, u) for (_, p), u in zip(p_flat, treedef.flatten_up_to(updates))]
    return updates, PrecisionState(compute_metrics(params, sums))

  return optax.GradientTransformation(init_fn, update_fn)


def metrics(opt_state: Any) -> dict[str, float]:
  """EDQ and lost fraction from anywhere in an optimizer state, as Python floats.

  Keys: ``edq``, ``lost_fraction``, and ``edq/<subtree>``,
  ``lost_fraction/<subtree>`` per top-level subtree of the params. With several
  tracked transformations in one state, each key is prefixed by its index
  (``0/edq``). Empty when nothing is tracked. Call it outside ``jit``.
  """
  found = _tree.find(opt_state, PrecisionMetrics)
  out: dict[str, float] = {}
  for i, (_, m) in enumerate(found):
    prefix = f"{i}/" if len(found) > 1 else ""
    out[prefix + "edq"] = float(m.edq)
    out[prefix + "lost_fraction"] = float(m.lost_fraction)
    for k, v in m.edq_by_subtree.items():
      out[f"{prefix}edq/{k}"] = float(v)
    for k, v in m.lost_fraction_by_subtree.items():
      out[f"{prefix}lost_fraction/{k}"] = float(v)
  return out
