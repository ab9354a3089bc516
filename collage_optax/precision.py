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

import sys
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from collage_optax import _tree, checks, formats

__all__ = [
  "LeafPrecision",
  "PrecisionMetrics",
  "PrecisionReport",
  "PrecisionState",
  "measure_precision",
  "metrics",
  "precision_report",
]

#: The running window of the per-leaf figures: sums decay by this factor per step (~100 steps).
WINDOW_DECAY = 0.99


class PrecisionMetrics(NamedTuple):
  """What precision cost: the last step, and per leaf over a running window.

  ``edq = <Δθ_eff, u> / ||u||²`` (1.0 = nothing lost), ``lost_fraction`` = share
  of elements with ``u != 0`` whose param did not change; of the last step,
  globally and per top-level subtree of the params. ``by_leaf`` mirrors the
  params: per leaf the four sums ``[<Δθ_eff, u>, ||u||², #(u ≠ 0), #(lost)]``
  decayed by ``collage_optax.precision.WINDOW_DECAY`` (0.99) per step (``None`` where nothing is
  measured); :func:`precision_report` reads them.
  """

  edq: chex.Array
  lost_fraction: chex.Array
  edq_by_subtree: dict[str, chex.Array]
  lost_fraction_by_subtree: dict[str, chex.Array]
  by_leaf: Any = None


def init_metrics(params: Any) -> PrecisionMetrics:
  """The metrics before any step: nothing lost."""
  groups = _tree.top_level_groups(params)
  one, zero = jnp.ones([], jnp.float32), jnp.zeros([], jnp.float32)
  flat, treedef = _tree.leaves_with_paths(params)
  by_leaf = treedef.unflatten([jnp.zeros([4], jnp.float32) if _tree.is_float(p) else None for _, p in flat])
  return PrecisionMetrics(one, zero, {k: one for k in groups}, {k: zero for k in groups}, by_leaf)


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


def compute_metrics(params: Any, sums: list[chex.Array | None], previous: PrecisionMetrics) -> PrecisionMetrics:
  """Global and per-subtree metrics from per-leaf sums (``None`` = not measured), and the per-leaf window."""
  zero = jnp.zeros([4], jnp.float32)
  filled = [zero if s is None else s for s in sums]
  edq, lost = _ratios(sum(filled, zero))
  by_edq, by_lost = {}, {}
  for key, idx in _tree.top_level_groups(params).items():
    by_edq[key], by_lost[key] = _ratios(sum((filled[i] for i in idx), zero))
  treedef = _tree.leaves_with_paths(params)[1]
  window = [
    None if old is None else WINDOW_DECAY * old + new
    for old, new in zip(treedef.flatten_up_to(previous.by_leaf), filled)
  ]
  return PrecisionMetrics(edq, lost, by_edq, by_lost, treedef.unflatten(window))


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
    return updates, PrecisionState(compute_metrics(params, sums, state.metrics))

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


class LeafPrecision(NamedTuple):
  """One leaf's figures over the running window: EDQ, lost fraction, and whether it is frozen."""

  edq: float
  lost_fraction: float
  frozen: bool


class PrecisionReport(NamedTuple):
  """:func:`precision_report`'s result: per leaf path its figures, and the frozen leaves."""

  leaves: dict[str, LeafPrecision]
  frozen: list[str]

  def __str__(self) -> str:
    if not self.frozen:
      return f"precision_report: no frozen leaf among {len(self.leaves)}."
    worst = ", ".join(f"{k} (lost {self.leaves[k].lost_fraction:.0%})" for k in self.frozen)
    return (
      f"precision_report: {len(self.frozen)} of {len(self.leaves)} leaves are frozen, most of their updates "
      f"rounded away: {worst}. Keep their residuals (collage_optax.adamw, or optax.chain(..., "
      "collage_optax.compensate())) or train them in float32."
    )


def _unbox(tree: Any) -> Any:
  """Flax ``nnx.Variable`` nodes as their values (a state made for ``nnx.state(model)``)."""
  if "flax" not in sys.modules:
    return tree
  from flax import nnx  # pylint: disable=g-import-not-at-top

  is_var = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(lambda x: x.get_value() if is_var(x) else x, tree, is_leaf=is_var)


def precision_report(opt_state: Any, *, threshold: float = 0.5) -> PrecisionReport:
  """Which leaves lost their updates: per leaf EDQ and lost fraction over the last ~100 steps.

  From any state with tracked metrics: ``track_metrics=True`` on
  :func:`~collage_optax.adamw` / :func:`~collage_optax.compensate`, or
  :func:`measure_precision` chained after any optax optimizer to audit a
  plain bf16 run. The figures are ratios of per-leaf sums decayed by
  ``collage_optax.precision.WINDOW_DECAY`` (0.99) per step (``<Δθ_eff, u> / ||u||²`` and the share of
  elements with ``u ≠ 0`` that did not move); a leaf whose lost fraction is
  at least ``threshold`` is frozen. ``str(report)`` names them. Call it
  outside ``jit``. Example::

    tx = optax.chain(optax.adamw(1e-3), collage_optax.measure_precision())
    ...
    print(collage_optax.precision_report(opt_state))

  Args:
    opt_state: an optimizer state holding one or more tracked metrics
      (with several, each leaf path is prefixed by its index, ``0/``).
    threshold: the lost fraction from which a leaf counts as frozen.

  Returns:
    A :class:`PrecisionReport`.
  """
  found = [(w, m) for w, m in _tree.find(opt_state, PrecisionMetrics) if m.by_leaf is not None]
  if not found:
    raise ValueError(
      "precision_report: no tracked metrics in opt_state. Build the optimizer with track_metrics=True "
      "(collage_optax.adamw, collage_optax.compensate) or chain collage_optax.measure_precision() last."
    )
  leaves: dict[str, LeafPrecision] = {}
  for i, (_, m) in enumerate(found):
    prefix = f"{i}/" if len(found) > 1 else ""
    for path, sums in _tree.leaves_with_paths(_unbox(m.by_leaf))[0]:
      if _tree.is_empty(sums):
        continue
      edq, lost = (float(x) for x in _ratios(jnp.asarray(sums)))
      moved = float(sums[2]) > 0
      leaves[prefix + path] = LeafPrecision(edq, lost, moved and lost >= threshold)
  return PrecisionReport(leaves, [k for k, v in leaves.items() if v.frozen])
