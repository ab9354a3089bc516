"""COLLAGE gradient transformations: ``compensate`` and ``scale_by_adam``.

Yu et al., "Collage: Light-Weight Low-Precision Strategy for LLM Training",
ICML 2024: keep every low-precision float whose updates rounding would destroy
(parameters, Adam's second moment) with a second component, so that no update
is lost. Here every such value is a float32 quantity stored in a format
(:mod:`collage_optax.formats`): a step decodes it, computes in float32 and
encodes it with explicit roundings (the MCF formats give the bits of the
paper's error-free sums, ~16 significant bits for two bfloat16 components).
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
from optax._src import numerics

from collage_optax import _tree, formats, mcf

__all__ = [
  "CompensateState",
  "PrecisionMetrics",
  "PrecisionState",
  "ScaleByAdamState",
  "StochasticRoundingState",
  "compensate",
  "measure_precision",
  "scale_by_adam",
  "stochastic_round",
  "stochastic_rounding",
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
  return jnp.stack(
    [
      jnp.sum(delta * u),
      jnp.sum(u * u),
      jnp.sum(moved, dtype=jnp.float32),
      jnp.sum(moved & (delta == 0), dtype=jnp.float32),
    ]
  )


def _ratios(sums: chex.Array) -> tuple[chex.Array, chex.Array]:
  dot, uu, nz, lost = sums
  edq = jnp.where(uu > 0, dot / jnp.where(uu > 0, uu, 1.0), 1.0)
  lost_fraction = jnp.where(nz > 0, lost / jnp.where(nz > 0, nz, 1.0), 0.0)
  return edq, lost_fraction


def _compute_metrics(params: Any, sums: list[chex.Array | None]) -> PrecisionMetrics:
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

  def init_fn(params):
    return PrecisionState(_init_metrics(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("measure_precision needs `params`: call tx.update(updates, state, params).")
    _tree.check_structure("measure_precision", params, "params", updates, "updates")
    p_flat, treedef = _tree.leaves_with_paths(params)
    u_flat = treedef.flatten_up_to(updates)
    sums = [
      _leaf_sums(formats.landed(p, u) - formats.widen(p), u) if _tree.is_float(p) and _tree.is_float(u) else None
      for (_, p), u in zip(p_flat, u_flat)
    ]
    return updates, PrecisionState(_compute_metrics(params, sums))

  return optax.GradientTransformation(init_fn, update_fn)


def _saturate(x: chex.Array, finite: chex.Array, big: float) -> chex.Array:
  """``x`` clipped to ``[−big, big]`` where ``finite``, else ``x``.

  ``finite`` marks the elements whose gradient was finite: there a result
  beyond the storage (``g²`` for ``|g| > 1.8e19``, a moment above the format's
  largest value) saturates instead of becoming ``inf``, which would freeze Adam
  for good (``u = m / √inf = 0``). Non-finite gradients still propagate, as in
  optax (use ``optax.apply_if_finite`` to skip them).
  """
  # Clipping to ±inf where not finite leaves x as it is and uses x once.
  return jnp.clip(x, jnp.where(finite, -big, -jnp.inf), jnp.where(finite, big, jnp.inf))


# ---------------------------------------------------------------------------
# Leaves: which get a residual, which get optax's arithmetic, which are frozen.
# ---------------------------------------------------------------------------


def leaf_kind(who: str, path: str, p: Any) -> str:
  """``"low"`` (bfloat16/float16: COLLAGE), ``"native"`` (float32/float64), ``"frozen"`` (int, bool), ``"empty"``.

  Complex and 8-bit float leaves are refused with an error naming the leaf.
  """
  if _tree.is_empty(p) or not hasattr(p, "dtype"):
    return "empty"
  _tree.check_supported_leaf(who, path, p)
  if _tree.is_low_precision(p):
    return "low"
  return "native" if _tree.is_float(p) else "frozen"


def wide_dtype(p: Any) -> jnp.dtype:
  """The arithmetic type of a leaf: float32, or float64 for float64 leaves."""
  return jnp.promote_types(p.dtype, jnp.float32)


# ---------------------------------------------------------------------------
# Adam on one leaf, in float32 (optax's own formulas).
# ---------------------------------------------------------------------------


# The moment formats of 8 bits or fewer: the step uses the value before their rounding.
_LOSSY = ("bf16", "q8")


def adam_moments(
  g: chex.Array,
  mu: chex.Array,
  nu: chex.Array,
  b1: Any,
  b2: Any,
  finite: chex.Array,
) -> tuple[chex.Array, chex.Array, chex.Array, chex.Array]:
  """The new stored ``m`` and ``v`` of one leaf, and the values this step uses.

  ``m ← (1 − b1)·g + b1·m``, ``v ← (1 − b2)·g² + b2·v`` (Kingma & Ba 2015,
  ``optax.tree.update_moment``), computed in ``g``'s (wide) type from the
  decoded stored moments and encoded once, saturating at the format's
  largest value where ``g`` is finite. Returns ``(mu, nu, m, v)``: the
  storages and the values for this step's direction. Those are read back
  from the storage (XLA:CPU then reads the moment arrays just written instead
  of recomputing them from the donated old ones, which it would copy first),
  except for an 8-bit ``"bf16"`` moment: there the step uses the value before
  its rounding (2**-9 relative; measured on the trajectory replay, COLLAGE-
  plus's error vs float64 is 6.1e-4 so, 6.7e-4 from the rounded ``m``),
  at the price of XLA:CPU copying that moment's 2 bytes first; likewise for a
  ``"q8"`` moment (as FlashOptim does).
  """
  out = []
  for store, decay, order in ((mu, b1, 1), (nu, b2, 2)):
    fmt = formats.moment_format_of(store)
    old = fmt.decode(store).astype(g.dtype)
    new = (
      otu.tree_update_moment(g, old, decay, 1) if order == 1 else otu.tree_update_moment_per_elem_norm(g, old, decay, 2)
    )
    big = float(jnp.finfo(g.dtype).max)
    if fmt.max < big:
      new = _saturate(new, finite, fmt.max)
    else:  # Only an overflow to ±inf: a clip here would change how XLA fuses optax's formula.
      new = jnp.where(finite & jnp.isinf(new), jnp.copysign(big, new), new)
    stored = fmt.encode(new)
    out.append((stored, new if fmt.name in _LOSSY else fmt.decode(stored).astype(g.dtype)))
  (mu, m), (nu, v) = out
  return mu, nu, m, v


def adam_directions(
  gs: list[Any],
  mus: list[Any],
  m: list[Any],
  v: list[Any],
  b1: Any,
  b2: Any,
  eps: Any,
  eps_root: Any,
  count_inc: chex.Array,
  nesterov: bool,
) -> list[Any]:
  """Adam's ``m̂ / (√(v̂ + eps_root) + eps)`` per leaf.

  ``gs`` are the gradients in their wide type (``None`` for leaves without
  moments), ``mus`` the new first-moment storages, ``m``/``v`` the moment
  values of :func:`adam_moments`. The bias corrections are optax's
  ``tree_bias_correction``, applied to all leaves at once as in
  ``optax.scale_by_adam`` (so that XLA compiles the same division; Nesterov
  as there too). Finite gradients give finite directions (:func:`_saturate`).
  """
  if nesterov:
    m_hat = jax.tree.map(
      lambda m, g: b1 * m + (1 - b1) * g,
      otu.tree_bias_correction(m, b1, numerics.safe_increment(count_inc)),
      otu.tree_bias_correction(gs, b1, count_inc),
    )
  else:
    m_hat = otu.tree_bias_correction(m, b1, count_inc)
  v_hat = otu.tree_bias_correction(v, b2, count_inc)
  out: list[chex.Array | None] = []
  for g, m_store, mv, vv, mh, vh in zip(gs, mus, m, v, m_hat, v_hat):
    if g is None:
      out.append(None)
      continue
    finite, big = jnp.isfinite(g), float(jnp.finfo(g.dtype).max)
    if formats.moment_format_of(m_store).max < big:
      mh, vh = _saturate(mh, finite, big), _saturate(vh, finite, big)
      out.append(_saturate(mh / (jnp.sqrt(vh + eps_root) + eps), finite, big))
      continue
    # A moment of the leaf's own dtype: optax's expression untouched, so that
    # XLA compiles it as in optax (the same bits: a clip on it, or any other
    # arithmetic with its operands, changes how it fuses). Only moments beyond
    # 1e30 can overflow m̂ or v̂ (for 1 − b ≥ 3.4e-9); there the step is
    # sign(m), the size Adam's normalised step has when |g| dominates.
    overflow = finite & ((jnp.abs(mv) > 1e30) | (vv > 1e30))
    out.append(jnp.where(overflow, jnp.sign(mv), mh / (jnp.sqrt(vh + eps_root) + eps)))
  return out


def init_moment(p: Any, fmt: formats.Format | None) -> chex.Array | None:
  """The zero storage of a moment of ``p`` in ``fmt`` (``None``: the param's own dtype)."""
  return (fmt or formats.native_format(p.dtype)).zeros(p)


# ---------------------------------------------------------------------------
# compensate: COLLAGE-light for any optimizer.
# ---------------------------------------------------------------------------


class CompensateState(NamedTuple):
  """State of :func:`compensate`.

  ``lo`` mirrors the params: the residual (second component) of every
  bfloat16/float16 leaf in the chosen param format (for ``"mcf"`` an array of
  the param's dtype), ``None`` for every other leaf. ``metrics`` is ``None``
  unless ``track_metrics=True``.
  """

  lo: Any
  metrics: PrecisionMetrics | None = None


def check_residual(who: str, path: str, p: Any, lo: Any, fmt: formats.ParamFormat) -> None:
  """Raises a clear error when the state's residual of leaf ``path`` is not what ``fmt`` keeps for ``p``."""
  want = jax.eval_shape(lambda q: init_residual(who, path, q, fmt), p) if _tree.is_low_precision(p) else None
  ok = (
    (lo is None or _tree.is_empty(lo))
    if want is None
    else (
      lo is not None and not _tree.is_empty(lo) and jnp.shape(lo) == want.shape and jnp.dtype(lo.dtype) == want.dtype
    )
  )
  if not ok and not (_tree.is_empty(lo) and _tree.is_empty(p)):
    got = "nothing" if lo is None or _tree.is_empty(lo) else f"{jnp.dtype(lo.dtype)}{list(jnp.shape(lo))}"
    need = "nothing" if want is None else f"{want.dtype}{list(want.shape)}"
    raise ValueError(
      f"{who}: the state's residual for leaf {path} is {got} but the param needs "
      f"{need} (param format {fmt.name!r}). The state was made for other params or "
      "another format: call tx.init(params) with this optimizer and the params you train."
    )


def init_residual(who: str, path: str, p: Any, fmt: formats.ParamFormat) -> Any:
  """``fmt.init(p)``, with the leaf named in the error of a format that cannot keep ``p``."""
  try:
    return fmt.init(p)
  except TypeError as e:
    raise TypeError(f"{who}: leaf {path}: {e}") from None


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


def compensated_leaf(
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


def compensate(format: str = "mcf", track_metrics: bool = False) -> optax.GradientTransformation:
  """COLLAGE's compensated parameter update; the last link of any chain.

  Keeps the residual of every bfloat16/float16 param ``θ`` in ``format``
  (``"mcf"``: the second MCF component ``lo``, Yu et al. 2024, Algorithm 2)
  and, given the intended update ``u``, computes the float32 value
  ``x' = (θ + lo) + u`` and stores it again: ``θ' = round(x')``,
  ``lo' = round(x' − θ')``. It emits ``θ' − θ`` in ``u``'s dtype, so that
  ``optax.apply_updates(params, updates)`` lands exactly on ``θ'`` (should it
  land elsewhere, the residual is taken from where it lands); ``lo'`` goes into
  the state. float32 (and other) leaves pass through with no state. Every
  rounding is explicit, so a jitted ``apply_updates`` fused with it sees the
  same value as an eager one. A NaN or ±inf update element makes that element
  of ``θ`` non-finite and sets its ``lo`` to 0 (skip such steps with
  ``optax.apply_if_finite``); a finite update that carries ``θ`` past its
  dtype's largest value overflows, as ``apply_updates`` does.

  Example::

    tx = optax.chain(optax.lion(1e-4), collage_optax.compensate())

  Args:
    format: the param format of :mod:`collage_optax.formats`: ``"mcf"`` (the
      paper's, any bfloat16/float16 param), ``"exact"`` (an int16 residual:
      the float32 bit for bit) or ``"compact"`` (an int8 residual, ~16 bits);
      the last two keep bfloat16 params only.
    track_metrics: record EDQ and lost fraction in the state (read them with
      :func:`collage_optax.metrics`).

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.
  """
  fmt = formats.param_format(format)

  def init_fn(params):
    def init(path, p):
      return init_residual("compensate", path, p, fmt) if leaf_kind("compensate", path, p) == "low" else None

    return CompensateState(_tree.map_with_path(init, params), _init_metrics(params) if track_metrics else None)

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
    _tree.check_structure(
      "compensate",
      params,
      "params",
      state.lo,
      "the state's residuals",
      fix="Call tx.init(params) with the params you train.",
    )
    p_flat, treedef = _tree.leaves_with_paths(params)
    u_flat, lo_flat = treedef.flatten_up_to(updates), treedef.flatten_up_to(state.lo)
    out_u, out_lo, sums = [], [], []
    for (path, p), u, lo in zip(p_flat, u_flat, lo_flat):
      check_residual("compensate", path, p, lo, fmt)
      if lo is None or _tree.is_empty(lo) or u is None or _tree.is_empty(u):
        out_u.append(u)
        out_lo.append(lo)
        sums.append(
          _leaf_sums(formats.landed(p, u) - formats.widen(p), u)
          if track_metrics and _tree.is_float(p) and _tree.is_float(u)
          else None
        )
        continue
      if not _tree.is_float(u):
        raise TypeError(
          f"compensate: the update for leaf {path} has dtype {getattr(u, 'dtype', type(u))}; "
          "updates of bfloat16/float16 params must be floats."
        )
      u32 = formats.widen(u).astype(jnp.float32)
      emitted, lo_new, delta = compensated_leaf(p, lo, fmt.decode(p, lo) + u32, u.dtype, fmt)
      out_u.append(emitted)
      out_lo.append(lo_new)
      sums.append(_leaf_sums(delta, u32) if track_metrics else None)
    metrics = _compute_metrics(params, sums) if track_metrics else None
    return treedef.unflatten(out_u), CompensateState(treedef.unflatten(out_lo), metrics)

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# stochastic_rounding: unbiased rounding of the update into the params.
# ---------------------------------------------------------------------------


class StochasticRoundingState(NamedTuple):
  """State of :func:`stochastic_rounding`: the step count, the counter of its PRNG."""

  count: chex.Array  # shape=(), dtype=jnp.int32.


def stochastic_round(x: chex.Array, dtype: Any, bits: chex.Array) -> chex.Array:
  """``x`` (float32) rounded to ``dtype`` up or down at random, unbiased: ``E[result] = x``.

  With ``r`` the nearest ``dtype`` value and ``n`` its neighbour on ``x``'s
  side, the result is ``n`` with probability ``|x − r| / |n − r|`` (an exact
  ratio: ``n − r`` is a power of two), from ``bits`` (uint32, one per element:
  their top 24 bits are the uniform variate). Exact values, ±inf and NaN are
  kept; a finite ``x`` never rounds to ±inf (it stays at ``dtype``'s largest
  value). Backends that flush float32 subnormals (XLA:CPU, TPU) round
  to nearest where ``|x − r|`` is one (possible only for ``|x| < 2**-103``).
  Connolly, Higham & Mary, "Stochastic rounding and its probabilistic
  backward error analysis", SIAM J. Sci. Comput. 2021.
  """
  dtype = jnp.dtype(dtype)
  big = float(jnp.finfo(dtype).max)
  r = mcf.round_to(x, dtype)
  r = jnp.where(jnp.isinf(r) & jnp.isfinite(x), jnp.copysign(big, x), r)  # finite x stays finite
  d = x - r  # exact where r is x rounded (at ±max, n is ±inf and never taken)
  toward = jnp.where(d > 0, jnp.inf, -jnp.inf).astype(dtype)
  n = formats.widen(lax.nextafter(r.astype(dtype), toward)).astype(jnp.float32)
  u = (bits >> 8).astype(jnp.float32) * 2.0**-24  # uniform in [0, 1)
  up = (u * jnp.abs(n - r) < jnp.abs(d)) & jnp.isfinite(n)
  return jnp.where(up, n, r)


def stochastic_rounding(seed: int = 0) -> optax.GradientTransformation:
  r"""Adds each update to its bfloat16/float16 param with stochastic rounding; the last link of a chain.

  ``θ' = SR(θ + u)`` with ``P(SR(x) = n) = |x − r| / |n − r|`` (``r`` the
  nearest value, ``n`` the other neighbour), so ``E[θ'] = θ + u``: an update
  far below half an ulp of ``θ`` is applied on average instead of lost
  (Gupta et al. 2015; the method torchao and several PyTorch trainers offer
  for bf16 params). No residual: the params and the optimizer's own state
  stay all there is. It emits ``θ' − θ`` in ``u``'s dtype, which
  ``optax.apply_updates`` lands on (a bfloat16 update across zero or a
  binade may land next to ``θ'``: the rounding is then that of the update).
  The randomness is counter-based: element ``i`` of leaf ``k`` at step ``t``
  uses ``jax.random.bits(fold_in(fold_in(key(seed), t), k))[i]``, so a run is
  reproducible and resumes exactly from a checkpointed state. float32 and
  other leaves pass through.

  Example::

    tx = optax.chain(optax.adamw(1e-3), collage_optax.stochastic_rounding())

  Args:
    seed: the PRNG seed.

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.
  """

  def init_fn(params):
    del params
    return StochasticRoundingState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
        "stochastic_rounding needs `params`: call tx.update(updates, state, params) with the current params."
      )
    if not isinstance(state, StochasticRoundingState):
      raise TypeError(
        f"stochastic_rounding: got a state of type {type(state).__name__}, not StochasticRoundingState. "
        "It comes from another optimizer: call tx.init(params) with this transformation."
      )
    _tree.check_structure("stochastic_rounding", params, "params", updates, "updates")
    _tree.check_shapes("stochastic_rounding", params, "params", updates, "updates")
    key = jax.random.fold_in(jax.random.key(seed), state.count)
    p_flat, treedef = _tree.leaves_with_paths(params)
    out = []
    for i, ((path, p), u) in enumerate(zip(p_flat, treedef.flatten_up_to(updates))):
      if leaf_kind("stochastic_rounding", path, p) != "low" or u is None or _tree.is_empty(u):
        out.append(u)
        continue
      if not _tree.is_float(u):
        raise TypeError(
          f"stochastic_rounding: the update for leaf {path} has dtype {getattr(u, 'dtype', type(u))}; "
          "updates of bfloat16/float16 params must be floats."
        )
      x = formats.widen(p) + formats.widen(u).astype(jnp.float32)
      bits = jax.random.bits(jax.random.fold_in(key, i), jnp.shape(p), jnp.uint32)
      target = stochastic_round(x, p.dtype, bits)
      out.append(formats._emit(x, target, p, u.dtype)[0])
    return treedef.unflatten(out), StochasticRoundingState(numerics.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# scale_by_adam with moments in storage formats.
# ---------------------------------------------------------------------------


class ScaleByAdamState(NamedTuple):
  """State of :func:`scale_by_adam`: step count and the two moments.

  ``mu``/``nu`` mirror the params with each moment's storage (``None`` for
  non-float leaves): for bfloat16/float16 leaves a ``"bf16"`` array, or the
  packed uint32 of an ``"mcf"`` moment (two bfloat16 components; read them
  with :func:`collage_optax.formats.mcf_components`); for float32/float64
  leaves an array of the leaf's dtype.
  """

  count: chex.Array  # shape=(), dtype=jnp.int32.
  mu: Any
  nu: Any


def check_moment(who: str, path: str, store: Any, want: Any) -> None:
  """Raises a clear error when a moment's storage is not the one this optimizer keeps."""
  if want is None and (store is None or _tree.is_empty(store)):
    return
  if want is None or store is None or _tree.is_empty(store) or _layout(store) != _layout(want):
    raise ValueError(
      f"{who}: the state's moment for leaf {path} is {_describe(store)} but this optimizer "
      f"keeps {_describe(want)}. The state was made by another mode or format, or for other "
      "params: call tx.init(params) with this optimizer and the params you train."
    )


def _layout(store: Any) -> Any:
  """A moment storage's arrays as ``(structure, [(dtype, shape)])``."""
  leaves, treedef = jax.tree.flatten(store)
  return treedef, [(jnp.dtype(x.dtype), tuple(jnp.shape(x))) for x in leaves]


def _describe(store: Any) -> str:
  """A moment storage for an error message: its format, dtypes and shapes."""
  if store is None or _tree.is_empty(store):
    return "nothing"
  try:
    name = f"a {formats.moment_format_of(store).name!r} moment "
  except (TypeError, AttributeError):
    name = ""
  return name + "(" + " + ".join(f"{d}{list(sh)}" for d, sh in _layout(store)[1]) + ")"


def _expected_moment(store: Any, fmt: formats.Format) -> Any:
  """The storage :func:`scale_by_adam` keeps where ``store`` is: ``fmt`` for a 16-bit leaf's moment."""
  if store is None or _tree.is_empty(store) or not hasattr(store, "dtype"):
    return store
  low = jnp.dtype(store.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.uint32))
  return jax.eval_shape(fmt.zeros, store) if low else jax.ShapeDtypeStruct(store.shape, store.dtype)


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
  """Adam's scaling with 16-bit moments for bfloat16/float16 leaves.

  ``m ← (1−b1)·g + b1·m``, ``v ← (1−b2)·g² + b2·v``,
  ``u = m̂ / (√(v̂ + eps_root) + eps)`` with ``m̂ = m/(1−b1ᵗ)``,
  ``v̂ = v/(1−b2ᵗ)`` (Kingma & Ba 2015; optax's own formulas, Nesterov as in
  ``optax.scale_by_adam``), computed in float32 from the stored moments. For
  bfloat16/float16 leaves a moment is stored as one bfloat16 (``"bf16"``)
  or, with ``mcf_nu``/``mcf_mu``, as a two-bfloat16 MCF (``"mcf"``, ~16
  significant bits), so ``b2=0.999`` means 0.999 and ``v`` decays as in
  float64 (COLLAGE-plus, Yu et al. 2024); float32/float64 leaves keep moments
  of their dtype, non-float leaves none. The step count and bias corrections
  are scalars.

  Finite gradients keep the state finite: ``g²``, the moments, ``m̂``, ``v̂``
  and the update saturate at their largest finite value instead of
  overflowing (``|g| > 1.8e19``). A NaN or ±inf gradient element makes that
  element of the moments and of the update non-finite, as in optax; wrap the
  optimizer in ``optax.apply_if_finite`` to skip such steps.

  Returns:
    An ``optax.GradientTransformation``; its updates have the gradients' dtypes.
  """
  mu_fmt = formats.moment_format("mcf" if mcf_mu else "bf16")
  nu_fmt = formats.moment_format("mcf" if mcf_nu else "bf16")
  who = "collage_optax.scale_by_adam"

  def init_fn(params):
    def init(fmt):
      def leaf(path, p):
        kind = leaf_kind(who, path, p)
        return init_moment(p, fmt if kind == "low" else None) if kind in ("low", "native") else None

      return _tree.map_with_path(leaf, params)

    return ScaleByAdamState(jnp.zeros([], jnp.int32), init(mu_fmt), init(nu_fmt))

  def update_fn(updates, state, params=None):
    del params
    if not isinstance(state, ScaleByAdamState):
      raise TypeError(
        f"{who}: got a state of type {type(state).__name__}, not collage_optax "
        "ScaleByAdamState. It comes from another optimizer (e.g. optax.adam): call "
        "tx.init(params) with this optimizer."
      )
    _tree.check_structure(who, state.mu, "the state's moments", updates, "updates")
    # The formats the state must have: a 16-bit leaf's (bf16 or packed mcf)
    # moments are mu_fmt/nu_fmt whatever the gradients' dtype (params may be
    # bfloat16 with float32 gradients); other leaves keep their own dtype.
    expected = ScaleByAdamState(
      state.count,
      jax.tree.map(lambda s: _expected_moment(s, mu_fmt), state.mu, is_leaf=_tree.is_empty),
      jax.tree.map(lambda s: _expected_moment(s, nu_fmt), state.nu, is_leaf=_tree.is_empty),
    )
    g_flat, treedef = _tree.leaves_with_paths(updates)
    flat = treedef.flatten_up_to
    count_inc = numerics.safe_increment(state.count)
    gs: list[Any] = []  # None where a leaf takes no step
    ms: list[chex.Array | None] = []
    vs: list[chex.Array | None] = []
    out_m: list[Any] = []
    out_v: list[Any] = []
    for (path, g), m, v, want_m, want_v in zip(
      g_flat, flat(state.mu), flat(state.nu), flat(expected.mu), flat(expected.nu)
    ):
      check_moment(who, path, m, want_m)
      check_moment(who, path, v, want_v)
      if m is None or _tree.is_empty(m) or g is None:
        gs.append(None)
        out_m.append(m)
        out_v.append(v)
        ms.append(None)
        vs.append(None)
        continue
      g32 = formats.widen(g).astype(wide_dtype(g))
      m, v, m32, v32 = adam_moments(g32, m, v, b1, b2, jnp.isfinite(g32))
      gs.append(g32)
      out_m.append(m)
      out_v.append(v)
      ms.append(m32)
      vs.append(v32)
    dirs = adam_directions(gs, out_m, ms, vs, b1, b2, eps, eps_root, count_inc, nesterov)
    out_u = [
      g if d is None else formats.narrow(_saturate(d, jnp.isfinite(g32), float(jnp.finfo(g.dtype).max)), g.dtype)
      for (_, g), g32, d in zip(g_flat, gs, dirs)
    ]
    unflat = treedef.unflatten
    return unflat(out_u), ScaleByAdamState(count_inc, unflat(out_m), unflat(out_v))

  return optax.GradientTransformation(init_fn, update_fn)
