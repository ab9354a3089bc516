"""COLLAGE's composable transformations: ``compensate``, ``stochastic_rounding``, ``scale_by_adam``.

Yu et al., "Collage: Light-Weight Low-Precision Strategy for LLM Training",
ICML 2024: keep every low-precision float whose updates rounding would destroy
(parameters, Adam's second moment) with a second component, so that no update
is lost. Here every such value is a float32 quantity stored in a format
(:mod:`collage_optax.formats`): a step decodes it, computes in float32 and
encodes it with explicit roundings.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from collage_optax import _kernel, _tree, checks, formats, mcf, precision
from collage_optax._bits import wide_dtype

__all__ = [
  "CompensateState",
  "ScaleByAdamState",
  "StochasticRoundingState",
  "compensate",
  "scale_by_adam",
  "stochastic_round",
  "stochastic_rounding",
]


def _deprecated(old: str, new: str) -> None:
  warnings.warn(f"{old} is deprecated; use {new}.", DeprecationWarning, stacklevel=3)


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
  metrics: precision.PrecisionMetrics | None = None


def compensate(
  param_format: Any = "mcf", track_metrics: bool = False, *, format: Any = None
) -> optax.GradientTransformation:
  """COLLAGE's compensated parameter update; the last link of any chain.

  Keeps the residual of every bfloat16/float16 param ``θ`` in ``param_format``
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
    param_format: the param format of :mod:`collage_optax.formats`: ``"mcf"``
      (the paper's, any bfloat16/float16 param), ``"exact"`` (an int16
      residual: the float32 bit for bit) or ``"compact"`` (an int8 residual,
      ~16 bits); the last two keep bfloat16 params only. Or one per leaf: a
      pytree prefix of the params with a name at each node, or a callable
      ``(path, param) -> name``.
    track_metrics: record EDQ and lost fraction in the state (read them with
      :func:`collage_optax.metrics`).
    format: deprecated spelling of ``param_format``.

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.
  """
  if format is not None:
    _deprecated("compensate(format=...)", "compensate(param_format=...)")
    param_format = format
  who = "collage_optax.compensate"
  if isinstance(param_format, str):
    formats.param_format(param_format)  # an unknown name fails here

  def resolve(params):
    """Each leaf's param format (``None`` for leaves that keep no residual)."""
    names = _tree.per_leaf(param_format, params, is_value=lambda x: isinstance(x, str))
    return [
      formats.param_format(name) if checks.leaf_kind(who, path, p) == "low" else None
      for (path, p), name in zip(_tree.leaves_with_paths(params)[0], names)
    ]

  def init_fn(params):
    p_flat, treedef = _tree.leaves_with_paths(params)
    lo = treedef.unflatten([_kernel.init_residual(who, path, p, f) for (path, p), f in zip(p_flat, resolve(params))])
    return CompensateState(lo, precision.init_metrics(params) if track_metrics else None)

  def update_fn(updates, state, params=None):
    checks.require_params(who, params)
    checks.check_state_type(who, state, CompensateState, "optax.adamw")
    checks.check_structure(who, params, "params", updates, "updates")
    checks.check_float_updates(who, params, updates)
    checks.check_state(who, params, {"residual": (state.lo, jax.eval_shape(lambda p: init_fn(p).lo, params))})
    p_flat, treedef = _tree.leaves_with_paths(params)
    out_u, out_lo, sums = [], [], []
    for (_, p), u, lo, fmt in zip(
      p_flat, treedef.flatten_up_to(updates), treedef.flatten_up_to(state.lo), resolve(params)
    ):
      if fmt is None or _tree.is_empty(lo) or _tree.is_empty(u):
        out_u.append(u)
        out_lo.append(lo)
        sums.append(precision.landing_sums(p, u) if track_metrics else None)
        continue
      u32 = formats.widen(u).astype(jnp.float32)
      emitted, lo_new, delta = _kernel.store_param(p, lo, fmt.decode(p, lo) + u32, u.dtype, fmt)
      out_u.append(emitted)
      out_lo.append(lo_new)
      sums.append(precision.leaf_sums(delta, u32) if track_metrics else None)
    tracked = precision.compute_metrics(params, sums, state.metrics) if track_metrics else None
    return treedef.unflatten(out_u), CompensateState(treedef.unflatten(out_lo), tracked)

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

  who = "collage_optax.stochastic_rounding"

  def init_fn(params):
    del params
    return StochasticRoundingState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    checks.require_params(who, params)
    checks.check_state_type(who, state, StochasticRoundingState, "optax.adamw")
    checks.check_structure(who, params, "params", updates, "updates")
    checks.check_shapes(who, params, "params", updates, "updates")
    checks.check_float_updates(who, params, updates)
    key = jax.random.fold_in(jax.random.key(seed), state.count)
    p_flat, treedef = _tree.leaves_with_paths(params)
    out = []
    for i, ((path, p), u) in enumerate(zip(p_flat, treedef.flatten_up_to(updates))):
      if checks.leaf_kind(who, path, p) != "low" or _tree.is_empty(u):
        out.append(u)
        continue
      x = formats.widen(p) + formats.widen(u).astype(jnp.float32)
      bits = jax.random.bits(jax.random.fold_in(key, i), jnp.shape(p), jnp.uint32)
      target = stochastic_round(x, p.dtype, bits)
      out.append(formats.emit(x, target, p, u.dtype)[0])
    return treedef.unflatten(out), StochasticRoundingState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# scale_by_adam with moments in storage formats.
# ---------------------------------------------------------------------------


def _emitted(d: chex.Array, g: chex.Array) -> chex.Array:
  """Adam's direction ``d`` in the gradient's dtype, saturating where the gradient is finite."""
  return formats.narrow(_kernel.saturate(d, jnp.isfinite(g), float(jnp.finfo(g.dtype).max)), g.dtype)


class ScaleByAdamState(NamedTuple):
  """State of :func:`scale_by_adam`: step count and the two moments.

  ``mu``/``nu`` mirror the params with each moment's storage (``None`` for
  non-float leaves): for bfloat16/float16 leaves the storage of the moment's
  format (e.g. a bfloat16 array for ``"bf16"``, the packed uint32 of an
  ``"mcf"`` moment: read its components with
  :func:`collage_optax.formats.mcf_components`, a :class:`~collage_optax.formats.Q8`
  for ``"q8"``, a :class:`~collage_optax.formats.Log16` for ``"log16"``); for
  float32/float64 leaves an array of the leaf's dtype.
  """

  count: chex.Array  # shape=(), dtype=jnp.int32.
  mu: Any
  nu: Any


def scale_by_adam(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  *,
  mu_format: str = "bf16",
  nu_format: str = "mcf",
  mu_dtype: Any | None = None,
  nesterov: bool = False,
  mcf_mu: bool | None = None,
  mcf_nu: bool | None = None,
) -> optax.GradientTransformation:
  """Adam's scaling with moments in storage formats for bfloat16/float16 leaves.

  ``m ← (1−b1)·g + b1·m``, ``v ← (1−b2)·g² + b2·v``,
  ``u = m̂ / (√(v̂ + eps_root) + eps)`` with ``m̂ = m/(1−b1ᵗ)``,
  ``v̂ = v/(1−b2ᵗ)`` (Kingma & Ba 2015; optax's own formulas, Nesterov as in
  ``optax.scale_by_adam``), computed in float32 from the stored moments: the
  same kernel as :func:`collage_optax.adamw`. For bfloat16/float16 leaves
  each moment is stored in a format of :mod:`collage_optax.formats`
  (``"bf16"``, ``"mcf"``: the paper's two-bfloat16 MCF, ~16 significant
  bits, so ``b2=0.999`` means 0.999 and ``v`` decays as in float64,
  COLLAGE-plus; ``"f32"``/``"exact"``; ``"q8"``; ``"log16"``, for ``v``
  only); float32/float64 leaves keep
  moments of their dtype (the first in ``mu_dtype`` when given, as
  optax), non-float leaves none. The step count and bias corrections are
  scalars. Without ``params`` in ``update``, a leaf counts as
  bfloat16/float16 when its state holds this optimizer's 16-bit moments (so
  float32 gradients of bfloat16 params work).

  Finite gradients keep the state finite: ``g²``, the moments, ``m̂``, ``v̂``
  and the update saturate at their largest finite value instead of
  overflowing (``|g| > 1.8e19``). A NaN or ±inf gradient element makes that
  element of the moments and of the update non-finite, as in optax; wrap the
  optimizer in ``optax.apply_if_finite`` to skip such steps.

  Args:
    b1, b2, eps, eps_root: Adam's hyperparameters.
    mu_format, nu_format: the moments' formats for bfloat16/float16 leaves.
    mu_dtype: the first moment's dtype for float32/float64 leaves (as optax).
    nesterov: Nesterov momentum (as in ``optax.scale_by_adam``).
    mcf_mu, mcf_nu: deprecated booleans: ``True`` is ``"mcf"``, ``False`` ``"bf16"``.

  Returns:
    An ``optax.GradientTransformation``; its updates have the gradients' dtypes.
  """
  if mcf_mu is not None:
    _deprecated("scale_by_adam(mcf_mu=...)", "mu_format='mcf' or 'bf16'")
    mu_format = "mcf" if mcf_mu else "bf16"
  if mcf_nu is not None:
    _deprecated("scale_by_adam(mcf_nu=...)", "nu_format='mcf' or 'bf16'")
    nu_format = "mcf" if mcf_nu else "bf16"
  who = "collage_optax.scale_by_adam"
  low = _kernel.LeafFormats(
    None, checks.moment_format(who, mu_format), checks.moment_format(who, nu_format, second=True)
  )
  mu_native = formats.native_format(mu_dtype) if mu_dtype is not None else None
  hp = _kernel.Adam(b1, b2, eps, eps_root, nesterov)

  def fmts_of(path, p):
    return _kernel.leaf_formats(checks.leaf_kind(who, path, p), getattr(p, "dtype", None), low, mu_native)

  def init_fn(params):
    p_flat, treedef = _tree.leaves_with_paths(params)
    out = [_kernel.init_leaf(who, path, p, fmts_of(path, p)) for path, p in p_flat]
    mu, nu = (formats.lift_storage(treedef.unflatten([o[i] for o in out])) for i in (0, 1))
    return ScaleByAdamState(jnp.zeros([], jnp.int32), mu, nu)

  def like(g, mu, nu):
    """The param of a leaf as its state shows it: bfloat16 when it holds ``low``'s moments, else ``v``'s dtype."""
    if _tree.is_empty(nu) or _tree.is_empty(g):
      return nu
    low_like = jax.ShapeDtypeStruct(jnp.shape(g), jnp.bfloat16)
    layout = lambda x: [(a.dtype, a.shape) for a in jax.tree.leaves(formats.per_param(x))]
    is_low = all(layout(s) == layout(jax.eval_shape(f.zeros, low_like)) for s, f in ((mu, low.mu), (nu, low.nu)))
    return low_like if is_low else jax.ShapeDtypeStruct(jnp.shape(g), formats.per_param(nu).dtype)

  def update_fn(updates, state, params=None):
    checks.check_state_type(who, state, ScaleByAdamState, "optax.adam")
    checks.check_structure(who, formats.per_param(state.mu), "the state's moments", updates, "updates")
    if params is None:
      params = jax.tree.map(
        like, updates, formats.per_param(state.mu), formats.per_param(state.nu), is_leaf=_tree.is_empty
      )
    else:
      checks.check_structure(who, params, "params", updates, "updates")
    checks.check_float_updates(who, params, updates, what="gradient")
    want = jax.eval_shape(init_fn, params)
    checks.check_state(who, params, {"moment": (state.mu, want.mu)})
    checks.check_state(who, params, {"moment": (state.nu, want.nu)})
    p_flat, treedef = _tree.leaves_with_paths(params)
    g_flat = treedef.flatten_up_to(updates)
    fmts = [fmts_of(path, p) for path, p in p_flat]
    count_inc = optax.safe_increment(state.count)
    wides = [None if f is None or _tree.is_empty(g) else wide_dtype(g.dtype) for f, g in zip(fmts, g_flat)]
    mu, nu = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    then = lambda i, d: g_flat[i] if d is None else _emitted(d, g_flat[i])
    out, mus, nus = _kernel.adam_then(g_flat, mu, nu, fmts, wides, hp, count_inc, then)
    return treedef.unflatten(out), ScaleByAdamState(count_inc, treedef.unflatten(mus), treedef.unflatten(nus))

  return optax.GradientTransformation(init_fn, update_fn)
