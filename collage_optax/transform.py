"""COLLAGE gradient transformations: ``compensate`` and ``scale_by_adam``.

Yu et al., "Collage: Light-Weight Low-Precision Strategy for LLM Training",
ICML 2024: keep every low-precision float whose updates rounding would destroy
(parameters, Adam's second moment) as a multi-component float (MCF) and update
it with error-free arithmetic.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu
from optax._src import numerics

from collage_optax import _tree
from collage_optax import mcf
from collage_optax.mcf import MCF

__all__ = [
    "CompensateState",
    "PrecisionMetrics",
    "PrecisionState",
    "ScaleByAdamState",
    "compensate",
    "measure_precision",
    "scale_by_adam",
]


# ---------------------------------------------------------------------------
# Precision metrics: effective descent quality and lost fraction.
# ---------------------------------------------------------------------------


class PrecisionMetrics(NamedTuple):
  """What precision cost in the last step (DESIGN §4).

  ``edq = <Δθ_eff, u> / ||u||²`` (1.0 = nothing lost), ``lost_fraction`` = share
  of elements with ``u != 0`` whose param did not change; globally and per
  top-level subtree of the params.
  """

  edq: chex.Array
  lost_fraction: chex.Array
  edq_by_subtree: dict[str, chex.Array]
  lost_fraction_by_subtree: dict[str, chex.Array]


def _init_metrics(params: Any) -> PrecisionMetrics:
  groups = _tree.top_level_groups(params)
  one, zero = jnp.ones([], jnp.float32), jnp.zeros([], jnp.float32)
  return PrecisionMetrics(one, zero, {k: one for k in groups}, {k: zero for k in groups})


def _leaf_sums(delta: chex.Array, u: chex.Array) -> chex.Array:
  """``[<Δ, u>, ||u||², #(u != 0), #(u != 0 and Δ == 0)]`` of one leaf, float32."""
  delta, u = delta.astype(jnp.float32), u.astype(jnp.float32)
  moved = u != 0
  return jnp.stack([
      jnp.sum(delta * u),
      jnp.sum(u * u),
      jnp.sum(moved, dtype=jnp.float32),
      jnp.sum(moved & (delta == 0), dtype=jnp.float32),
  ])


def _ratios(sums: chex.Array) -> tuple[chex.Array, chex.Array]:
  dot, uu, nz, lost = sums
  edq = jnp.where(uu > 0, dot / jnp.where(uu > 0, uu, 1.0), 1.0)
  lost_fraction = jnp.where(nz > 0, lost / jnp.where(nz > 0, nz, 1.0), 0.0)
  return edq, lost_fraction


def _compute_metrics(params: Any, sums: list[Optional[chex.Array]]) -> PrecisionMetrics:
  """Global and per-subtree metrics from per-leaf sums (``None`` = not measured)."""
  zero = jnp.zeros([4], jnp.float32)
  sums = [zero if s is None else s for s in sums]
  edq, lost = _ratios(sum(sums, zero))
  by_edq, by_lost = {}, {}
  for key, idx in _tree.top_level_groups(params).items():
    by_edq[key], by_lost[key] = _ratios(sum((sums[i] for i in idx), zero))
  return PrecisionMetrics(edq, lost, by_edq, by_lost)


def _landed(p: chex.Array, u: chex.Array) -> chex.Array:
  """``optax.apply_updates``' result ``(p + u).astype(p.dtype)``, in float32.

  The rounding is explicit (``round_to``), so XLA's excess precision cannot
  hide it.
  """
  wide = jnp.promote_types(p.dtype, jnp.float32)
  return mcf.round_to(p.astype(wide) + u.astype(wide), p.dtype)


def _cast(x: chex.Array, dtype: Any) -> chex.Array:
  """``x.astype(dtype)`` with the rounding made explicit (``round_to``).

  XLA may skip the rounding of a narrowing ``convert`` when it fuses it with
  the consumer (excess precision), so a jitted ``apply_updates`` could add the
  unrounded float32 value; ``reduce_precision`` it must honour, so consumers
  see the same value eagerly and under ``jit``.
  """
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < jnp.finfo(x.dtype).bits:
    x = mcf.round_to(x, dtype)
  return x.astype(dtype)


def _saturate(x: chex.Array, dtype: Any, finite: chex.Array) -> chex.Array:
  """``x`` clipped to ``dtype``'s finite range where ``finite``, else ``x``.

  ``finite`` marks the elements whose inputs (the gradient) were finite: there
  a result beyond the format (``g²`` for ``|g| > 1.8e19`` in bfloat16/float32,
  a moment above 65504 in float16) saturates instead of becoming ``inf``, which
  would freeze Adam (``u = m / √inf = 0`` for good) or, through ``inf − inf``
  in the error-free sums, turn the MCF into NaN. Non-finite gradients still
  propagate, as in optax (use ``optax.apply_if_finite`` to skip them).
  """
  big = float(jnp.finfo(dtype).max)
  # Clipping to ±inf where not finite leaves x as it is, and uses x once: XLA
  # then fuses its producer (Adam's sqrt and division) into each consumer
  # instead of writing a float32 temporary.
  return jnp.clip(x, jnp.where(finite, -big, -jnp.inf), jnp.where(finite, big, jnp.inf))


class PrecisionState(NamedTuple):
  """State of :func:`measure_precision`."""

  metrics: PrecisionMetrics


def measure_precision() -> optax.GradientTransformation:
  """Records EDQ and lost fraction of plain ``apply_updates``, changing nothing.

  The last link of a chain *without* compensation (e.g. ``optax.adamw`` on
  bf16 or fp32 params), to see what rounding costs it:
  ``Δθ_eff = round(θ + u) − θ``. Read with :func:`collage_optax.metrics`.
  """

  def init_fn(params):
    return PrecisionState(_init_metrics(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "measure_precision needs `params`: call tx.update(updates, state, params)."
      )
    _tree.check_structure("measure_precision", params, "params", updates, "updates")
    p_flat, treedef = _tree.leaves_with_paths(params)
    u_flat = treedef.flatten_up_to(updates)
    sums = [
        _leaf_sums(_landed(p, u) - p.astype(jnp.float32), u)
        if _tree.is_float(p) and _tree.is_float(u) else None
        for (_, p), u in zip(p_flat, u_flat)
    ]
    return updates, PrecisionState(_compute_metrics(params, sums))

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# compensate: COLLAGE-light for any optimizer.
# ---------------------------------------------------------------------------


class CompensateState(NamedTuple):
  """State of :func:`compensate`.

  ``lo`` mirrors the params: the second MCF component of every bfloat16/float16
  leaf, ``None`` for every other leaf. ``metrics`` is ``None`` unless
  ``track_metrics=True``.
  """

  lo: Any
  metrics: Optional[PrecisionMetrics] = None


def _init_lo(path: str, p: Any) -> Any:
  _tree.check_supported_leaf("compensate", path, p)
  return jnp.zeros_like(p) if _tree.is_low_precision(p) else None


def _check_lo(path: str, p: Any, lo: Any) -> None:
  expected = _tree.is_low_precision(p)
  ok = (lo is None) if not expected else (
      lo is not None and not _tree.is_empty(lo)
      and jnp.shape(lo) == jnp.shape(p) and jnp.dtype(lo.dtype) == jnp.dtype(p.dtype)
  )
  if not ok and not (_tree.is_empty(lo) and _tree.is_empty(p)):
    got = "nothing" if _tree.is_empty(lo) else f"{jnp.dtype(lo.dtype)}{list(jnp.shape(lo))}"
    want = f"{jnp.dtype(p.dtype)}{list(jnp.shape(p))}" if expected else "nothing"
    raise ValueError(
        f"compensate: the state's low component for leaf {path} is {got} but the "
        f"param needs {want}. The state was made for other params: call "
        "tx.init(params) with the params you train."
    )


def compensate_leaf(p: chex.Array, lo: chex.Array, u: chex.Array) -> tuple[chex.Array, chex.Array, chex.Array]:
  """One COLLAGE step on one leaf: ``(θ, lo) ← grow((θ, lo), u)``.

  Returns ``(emitted update, new lo, Δθ_eff)``. The emitted update (dtype of
  ``u``) is what makes ``apply_updates`` land on the new high component; should
  rounding make it land elsewhere (adversarial zero crossings), the landing
  point's miss is moved into ``lo``, so that ``θ + lo`` is still the MCF sum.
  ``Δθ_eff`` is how far ``θ + lo`` moved, in float32.
  """
  wide = jnp.float32
  new = mcf.grow(MCF(p, lo), u)
  theta, hi = p.astype(wide), new.hi.astype(wide)
  emitted = _cast(hi - theta, u.dtype)
  landed = _landed(p, emitted)
  lo_new = mcf.round_to((hi - landed) + new.lo.astype(wide), p.dtype)
  delta = (landed + lo_new) - (theta + lo.astype(wide))
  return emitted, lo_new.astype(p.dtype), delta


def compensate(track_metrics: bool = False) -> optax.GradientTransformation:
  """COLLAGE's compensated parameter update; the last link of any chain.

  Keeps the second component ``lo`` of every bfloat16/float16 param ``θ`` and,
  given the intended update ``u``, computes ``(θ', lo') = grow((θ, lo), u)``
  (Yu et al. 2024, Algorithm 2). It emits ``θ' − θ`` in ``u``'s dtype, so that
  ``optax.apply_updates(params, updates)`` lands exactly on ``θ'``; ``lo'``
  goes into the state. float32 (and other) leaves pass through with no state.
  The emitted update is rounded explicitly to its dtype, so a jitted
  ``apply_updates`` fused with it sees the same value as an eager one. A NaN or
  ±inf update element makes that element of ``θ`` and ``lo`` non-finite (skip
  such steps with ``optax.apply_if_finite``); a finite update that carries
  ``θ`` past its dtype's largest value overflows, as ``apply_updates`` does.

  Example::

    tx = optax.chain(optax.lion(1e-4), collage_optax.compensate())

  Args:
    track_metrics: record EDQ and lost fraction in the state (read them with
      :func:`collage_optax.metrics`).

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.
  """

  def init_fn(params):
    lo = _tree.map_with_path(_init_lo, params)
    return CompensateState(lo, _init_metrics(params) if track_metrics else None)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "compensate needs `params`: call tx.update(updates, state, params) "
          "(as for optax.adamw), with the current bf16 params."
      )
    if not isinstance(state, CompensateState):
      raise TypeError(
          f"compensate: got a state of type {type(state).__name__}, not "
          "CompensateState. It comes from another optimizer: call tx.init(params) "
          "with this transformation."
      )
    _tree.check_structure("compensate", params, "params", updates, "updates")
    p_flat, treedef = _tree.leaves_with_paths(params)
    u_flat = treedef.flatten_up_to(updates)
    lo_flat = treedef.flatten_up_to(state.lo) if len(
        _tree.leaves_with_paths(state.lo)[0]) == len(p_flat) else None
    if lo_flat is None:
      _tree.check_structure("compensate", params, "params", state.lo, "the state's low components")
    out_u, out_lo, sums = [], [], []
    for (path, p), u, lo in zip(p_flat, u_flat, lo_flat):
      _check_lo(path, p, lo)
      if lo is None or u is None:
        out_u.append(u)
        out_lo.append(lo)
        sums.append(_leaf_sums(_landed(p, u) - p.astype(jnp.float32), u)
                    if track_metrics and _tree.is_float(p) and _tree.is_float(u) else None)
        continue
      if not _tree.is_float(u):
        raise TypeError(
            f"compensate: the update for leaf {path} has dtype {getattr(u, 'dtype', type(u))}; "
            "updates of bfloat16/float16 params must be floats."
        )
      emitted, lo_new, delta = compensate_leaf(p, lo, u)
      out_u.append(emitted)
      out_lo.append(lo_new)
      sums.append(_leaf_sums(delta, u) if track_metrics else None)
    metrics = _compute_metrics(params, sums) if track_metrics else None
    return treedef.unflatten(out_u), CompensateState(treedef.unflatten(out_lo), metrics)

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# scale_by_adam with MCF moments.
# ---------------------------------------------------------------------------


class ScaleByAdamState(NamedTuple):
  """State of :func:`scale_by_adam`: step count and the two moments.

  ``mu``/``nu`` mirror the params with arrays of the param's dtype (``None``
  for non-float leaves). Where ``mcf_mu``/``mcf_nu`` asks for an MCF (on
  bfloat16/float16 leaves), the moment is the MCF ``(mu, mu_lo)`` /
  ``(nu, nu_lo)``; ``mu_lo``/``nu_lo`` mirror the params with ``None`` on the
  other leaves, and are ``None`` altogether when not asked for (no placeholder
  arrays). Keeping the components as parallel trees keeps the state a plain
  tree of arrays for ``nnx.Optimizer``, shardings and checkpoints.
  """

  count: chex.Array  # shape=(), dtype=jnp.int32.
  mu: Any
  nu: Any
  mu_lo: Any = None
  nu_lo: Any = None


def _ema(
    old: Any, old_lo: Any, target: chex.Array, decay: Any, finite: chex.Array,
) -> tuple[Any, Any, chex.Array]:
  """``decay·old + (1 − decay)·target``; returns (stored hi, stored lo, float32 value).

  With a low component, the MCF ``m = (old, old_lo)`` is updated in the
  increment form of the same average, ``m ← m + (1 − decay)·(target − m)``
  (COLLAGE-plus, Yu et al. 2024, who write ``grow(mul(m, β), (1 − β)·target)``).
  The increment is computed in float32 from the float32 value of ``m``, so
  ``decay`` never needs a storage-precision form: it is exact to float32,
  where the two-bfloat16 split of the product form, ``β = c + d``, is
  0.99900055 for 0.999 and the weights ``(c + d, 1 − β)`` then over-weight the
  moment by 5.5e-4 and bias every Adam step by −2.7e-4. The increment ``δ`` is
  added as an MCF, ``add(m, from_float(δ))``, not rounded to the storage
  precision first as ``grow`` would (an error of up to 2**-9·δ per step: the
  whole first step's value is ``δ``, and ``m``'s increments are 10% of it). The
  only rounding left is ``add``'s, at MCF precision; the float32 value
  returned (for this step's update) is ``m + δ`` before that rounding. Without
  a low component, the value is computed in float32 and rounded once to
  ``old``'s dtype. Where ``finite``
  (the gradient was), target and result saturate at ``old``'s largest finite
  value (:func:`_saturate`).
  """
  dtype = old.dtype
  wide = jnp.promote_types(dtype, jnp.float32)
  target = _saturate(target, dtype, finite)
  if old_lo is not None:
    m = MCF(old, old_lo)
    m32 = mcf.to_float(m, wide)
    delta = (1 - decay) * (target - m32)
    new = mcf._add_float(m, delta)  # add(m, from_float(delta, dtype)), in one chain.
    # This step uses the value before storage rounding, as without a low
    # component: in float16 a small ``(1 − b2)·g²`` underflows the storage,
    # and a stored 0 would make the step ``m̂ / eps``.
    return new.hi, new.lo, m32 + delta
  value = _saturate(decay * old.astype(wide) + (1 - decay) * target, dtype, finite)
  return value.astype(dtype), None, value


def _check_state_kind(state: ScaleByAdamState, mcf_mu: bool, mcf_nu: bool) -> None:
  """Refuses a state made with other ``mcf_mu``/``mcf_nu`` (another ``adamw`` mode)."""
  has_mu, has_nu = state.mu_lo is not None, state.nu_lo is not None
  if (has_mu, has_nu) != (mcf_mu, mcf_nu):
    mode = lambda mu, nu: {(False, False): "light", (False, True): "plus", (True, True): "full"}.get((mu, nu), "custom")
    raise ValueError(
        f"scale_by_adam: the state was made with mcf_mu={has_mu}, mcf_nu={has_nu} "
        f"(adamw mode={mode(has_mu, has_nu)!r}) but this transformation has "
        f"mcf_mu={mcf_mu}, mcf_nu={mcf_nu} (mode={mode(mcf_mu, mcf_nu)!r}). Call "
        "tx.init(params) with this optimizer, or build it with the state's mode."
    )


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    mcf_mu: bool = False,
    mcf_nu: bool = True,
    nesterov: bool = False,
) -> optax.GradientTransformation:
  """Adam's scaling with moments stored at the params' precision.

  ``m ← b1·m + (1−b1)·g``, ``v ← b2·v + (1−b2)·g²``,
  ``u = m̂ / (√(v̂ + eps_root) + eps)`` with ``m̂ = m/(1−b1ᵗ)``,
  ``v̂ = v/(1−b2ᵗ)`` (Kingma & Ba 2015; Nesterov as in ``optax.scale_by_adam``).
  With ``mcf_nu`` the second moment of every bfloat16/float16 leaf is an MCF
  updated as ``v ← v + (1−β2)·(g² − v)`` (the increment form of Yu et
  al. 2024's ``grow(mul(v, β2), (1−β2)·g²)``, with ``1−β2`` a float32 scalar),
  so ``b2=0.999`` means 0.999 and ``v`` decays as in float64 (COLLAGE-plus);
  ``mcf_mu`` does the same for the first moment. Arithmetic is
  float32; per-parameter state stays at the params' precision. The step count
  and bias corrections are scalars, computed by optax's own
  ``tree_bias_correction``. float32 and float64 leaves keep plain moments of
  their dtype; non-float leaves have no state and their updates pass through.

  Finite gradients keep the state finite: ``g²``, the moments, ``m̂``, ``v̂``
  and the update saturate at their dtype's largest finite value instead of
  overflowing (``|g| > 1.8e19`` for bfloat16/float32; for float16 a second
  moment above 65504, i.e. ``|g|`` sustained above 256). A NaN or ±inf
  gradient element makes that element of the moments and of the update
  non-finite, as in optax; wrap the optimizer in ``optax.apply_if_finite`` to
  skip such steps.

  Returns:
    An ``optax.GradientTransformation``; its updates have the gradients' dtypes.
  """

  def init_moment(path, p):
    _tree.check_supported_leaf("scale_by_adam", path, p)
    return jnp.zeros_like(p) if _tree.is_float(p) else None

  def init_lo(path, p):
    return jnp.zeros_like(p) if _tree.is_low_precision(p) else None

  def init_fn(params):
    lo = lambda use: _tree.map_with_path(init_lo, params) if use else None
    return ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=_tree.map_with_path(init_moment, params),
        nu=_tree.map_with_path(init_moment, params),
        mu_lo=lo(mcf_mu),
        nu_lo=lo(mcf_nu),
    )

  def update_fn(updates, state, params=None):
    del params
    if not isinstance(state, ScaleByAdamState):
      raise TypeError(
          f"collage_optax.scale_by_adam: got a state of type {type(state).__name__}, "
          "not collage_optax ScaleByAdamState. It comes from another optimizer "
          "(e.g. optax.adam): call tx.init(params) with this optimizer."
      )
    _check_state_kind(state, mcf_mu, mcf_nu)
    _tree.check_structure("scale_by_adam", state.mu, "the state's moments", updates, "updates")
    u_flat, treedef = _tree.leaves_with_paths(updates)
    flat = lambda t: treedef.flatten_up_to(t) if t is not None else [None] * len(u_flat)
    mu, nu, mu_lo, nu_lo = flat(state.mu), flat(state.nu), flat(state.mu_lo), flat(state.nu_lo)
    count_inc = numerics.safe_increment(state.count)
    # Bias corrections with optax's own function (``1 − bᵗ`` computed under
    # jit in the default float type, then cast to the moment's), so float32
    # and float64 leaves get optax.adamw's update at its precision.
    unbias = otu.tree_bias_correction
    out = []
    for (path, g), m, v, m_lo, v_lo in zip(u_flat, mu, nu, mu_lo, nu_lo):
      if m is None or g is None:
        out.append((g, m, v, m_lo, v_lo))
        continue
      if not _tree.is_float(g):
        raise TypeError(
            f"scale_by_adam: the gradient for leaf {path} has dtype {g.dtype}; it must be "
            f"a real float like its moments ({m.dtype}). Pass real float gradients (e.g. "
            "jax.grad of a real loss); optimise complex leaves with a plain optax optimizer."
        )
      if jnp.shape(g) != jnp.shape(m):
        raise ValueError(
            f"scale_by_adam: the gradient for leaf {path} has shape {jnp.shape(g)} but "
            f"the state was made for shape {jnp.shape(m)}: call tx.init(params) with the params you train."
        )
      wide = jnp.promote_types(m.dtype, jnp.float32)
      g32 = g.astype(wide)
      finite = jnp.isfinite(g32)
      m, m_lo, m32 = _ema(m, m_lo, g32, b1, finite)
      v, v_lo, v32 = _ema(v, v_lo, _saturate(g32 * g32, wide, finite), b2, finite)
      if nesterov:
        m_hat = (b1 * unbias(m32, b1, numerics.safe_increment(count_inc))
                 + (1 - b1) * unbias(g32, b1, count_inc))
      else:
        m_hat = unbias(m32, b1, count_inc)
      v_hat = unbias(v32, b2, count_inc)
      m_hat, v_hat = _saturate(m_hat, wide, finite), _saturate(v_hat, wide, finite)
      u = _saturate(m_hat / (jnp.sqrt(v_hat + eps_root) + eps), g.dtype, finite)
      out.append((_cast(u, g.dtype), m, v, m_lo, v_lo))
    u, mu, nu, mu_lo, nu_lo = (treedef.unflatten(list(c)) for c in zip(*out)) if out else [treedef.unflatten([])] * 5
    return u, ScaleByAdamState(
        count_inc, mu, nu,
        mu_lo if state.mu_lo is not None else None,
        nu_lo if state.nu_lo is not None else None)

  return optax.GradientTransformation(init_fn, update_fn)
