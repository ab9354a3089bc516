"""``collage_optax.adamw``: a drop-in for ``optax.adamw`` on bfloat16 params, as one fused step.

Each leaf's update is one elementwise pass (DESIGN §7): decode the param and
the moments from their storage formats, AdamW in float32 with optax's own
formulas, encode. A float32-exact format reproduces ``optax.adamw`` on
float32 params bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from collage_optax import _tree, formats, transform

__all__ = ["MODES", "PRESETS", "AdamWState", "adamw"]

#: The presets of :func:`adamw`'s ``mode``: ``(param_format, mu_format,
#: nu_format)`` for bfloat16/float16 params. light: MCF params (Yu et al.
#: 2024, strategy B); plus: also an MCF ``v`` (strategy C); full: also an MCF
#: ``m`` (C+); exact: float32 masters bit for bit (bf16 + int16) and a float32
#: ``v``, at plus's memory; compact: bf16 + int8 masters and 8-bit moments
#: (FlashOptim's layout, ~7 bytes per param with bf16 gradients). exact and
#: compact keep bfloat16 params only.
PRESETS: dict[str, tuple[str, str, str]] = {
  "light": ("mcf", "bf16", "bf16"),
  "plus": ("mcf", "bf16", "mcf"),
  "full": ("mcf", "mcf", "mcf"),
  "exact": ("exact", "bf16", "exact"),
  "compact": ("compact", "q8", "q8"),
}

#: The values of ``mode`` in :func:`adamw`.
MODES = tuple(PRESETS)


def _check_hyperparam(name: str, value: Any, *, upper: float | None = None) -> None:
  """Rejects negative or non-finite Python numbers and sub-float32 arrays.

  ``optax.inject_hyperparams`` casts hyperparameters to the params' widest
  dtype; with all-bfloat16 params ``b2=0.999`` arrives as ``1.0`` and Adam's
  bias correction ``1 − b2ᵗ`` is 0, so such arrays are refused.
  """
  dtype = getattr(value, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4:
    raise TypeError(
      f"collage_optax.adamw: {name} is a {jnp.dtype(dtype)} array; hyperparameters "
      "must be float32 (0.999 is 1.0 in bfloat16). Under optax.inject_hyperparams "
      "with bfloat16 params pass hyperparam_dtype=jnp.float32."
    )
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return  # arrays and schedules are checked by the user's own code.
  if not math.isfinite(value) or value < 0 or (upper is not None and value >= upper):
    bound = f"in [0, {upper})" if upper is not None else "finite and >= 0"
    raise ValueError(f"collage_optax.adamw: {name}={value!r} must be {bound}.")


class AdamWState(NamedTuple):
  """State of :func:`adamw`.

  ``count`` is the step count (int32, as in ``optax.ScaleByAdamState``; the
  learning-rate schedule is evaluated at it before the increment, as
  ``optax.scale_by_learning_rate`` does). ``mu``, ``nu`` mirror the params
  with each moment's storage (see :class:`collage_optax.ScaleByAdamState`),
  ``lo`` with each param's residual (``None`` for leaves without one), and
  ``metrics`` is ``None`` unless ``track_metrics=True``.
  """

  count: chex.Array
  mu: Any
  nu: Any
  lo: Any
  metrics: transform.PrecisionMetrics | None = None


def _check_update_args(updates: Any, state: Any, params: Any) -> None:
  """Clear errors, naming the leaf path and the fix, for the inputs of ``adamw``'s update."""
  who = "collage_optax.adamw"
  if params is None:
    raise ValueError(
      f"{who} needs `params`: call tx.update(grads, opt_state, params) with the "
      "current params (as for optax.adamw), so that their low components can be updated."
    )
  if not isinstance(state, AdamWState):
    raise TypeError(
      f"{who}: opt_state {type(state).__module__}.{type(state).__name__} is not the state of "
      "collage_optax.adamw; it comes from another optimizer (e.g. optax.adamw, whose state "
      "lacks the low components). Call opt_state = tx.init(params) with this optimizer."
    )
  _tree.check_structure(who, params, "params", updates, "updates")
  _tree.check_shapes(who, params, "params", updates, "updates")
  _tree.check_structure(
    who,
    params,
    "params",
    _tree.per_param(state.mu),
    "opt_state",
    fix="The state was made for other params: call tx.init(params) with the params you train.",
  )
  for path, u in _tree.leaves_with_paths(updates)[0]:
    if getattr(u, "dtype", None) == jax.dtypes.float0:
      raise TypeError(
        f"{who}: the update for leaf {path} is float0 (jax.grad(..., allow_int=True) "
        "of an integer leaf); optax cannot apply it either. Differentiate only "
        "the float params, or give that leaf a zero float gradient."
      )


def _formats(
  mode: str,
  param_format: Any,
  mu_format: Any,
  nu_format: Any,
  mu_dtype: Any,
) -> tuple[formats.ParamFormat, formats.Format, formats.Format, formats.Format | None]:
  """The formats of bfloat16/float16 leaves, and the ``mu`` format of the others (``None``: their dtype)."""
  if mode not in PRESETS:
    raise ValueError(f"collage_optax.adamw: unknown mode={mode!r}; use one of {', '.join(map(repr, MODES))}.")
  preset = PRESETS[mode]
  if mu_dtype is not None:
    if mu_format is not None:
      raise ValueError("collage_optax.adamw: pass mu_dtype or mu_format, not both.")
    mu_native = formats.native_format(jnp.dtype(mu_dtype))
    if mu_native.name not in formats.MOMENT_FORMATS:
      raise ValueError(f"collage_optax.adamw: mu_dtype={jnp.dtype(mu_dtype)} is not bfloat16 or float32.")
    mu_format = mu_native.name
  else:
    mu_native = None
  mu = formats.moment_format(mu_format or preset[1])
  return (
    formats.param_format(param_format or preset[0]),
    # m takes either sign: q8's int8 codes, never its unsigned √v ones.
    formats.MOMENT_FORMATS["q8"] if mu.name == "q8" else mu,
    formats.moment_format(nu_format or preset[2], second=True),
    mu_native,
  )


def _decay_mask(mask: Any, params: Any) -> list[bool]:
  """Per leaf of ``params``: whether weight decay applies (``mask`` as in ``optax.adamw``)."""
  n = len(_tree.leaves_with_paths(params)[0])
  if mask is None:
    return [True] * n
  tree = mask(params) if callable(mask) else mask
  params_def = jax.tree.structure(params, is_leaf=_tree.is_empty)
  # A mask may be a prefix of the params (optax.masked): broadcast each entry.
  full = jax.tree.map(
    lambda m, sub: jax.tree.map(lambda _: m, sub, is_leaf=_tree.is_empty),
    tree,
    params,
    is_leaf=lambda x: isinstance(x, bool) or _tree.is_empty(x),
  )
  # PyTreeDef.flatten_up_to exists at runtime, but jaxlib ships no stubs for PyTreeDef.
  flat = params_def.flatten_up_to(full)  # type: ignore[attr-defined]
  return [bool(m) if not _tree.is_empty(m) else False for m in flat]


def adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  weight_decay: float = 1e-4,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  *,
  mode: str = "plus",
  mu_dtype: Any | None = None,
  param_format: str | None = None,
  mu_format: str | None = None,
  nu_format: str | None = None,
  nesterov: bool = False,
  track_metrics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW (Loshchilov & Hutter 2019) with COLLAGE for bfloat16 params, in one fused step.

  For every leaf, one elementwise pass: decode the param and the moments
  from their storage formats (:mod:`collage_optax.formats`), then in float32
  optax's own AdamW (``optax.tree.update_moment``, bias correction,
  ``m̂ / (√(v̂ + eps_root) + eps)``, decoupled weight decay, the learning
  rate), and encode the new values:

  .. math::

     m ← (1−β_1) g + β_1 m,\quad v ← (1−β_2) g^2 + β_2 v,\quad
     x' = x − η \left(\frac{\hat m}{\sqrt{\hat v + ε_{root}} + ε} + λ x\right).

  Presets (``mode``) for bfloat16/float16 params, as ``(param, m, v)``
  formats: ``"light"`` = (mcf, bf16, bf16): MCF params (Yu et al. 2024,
  strategy B); ``"plus"`` = (mcf, bf16, mcf): also an MCF second moment, so
  ``b2=0.999`` means 0.999 (strategy C, the default); ``"full"`` = (mcf,
  mcf, mcf) (C+); ``"exact"`` = (exact, bf16, exact): the float32 master bit
  for bit in bf16 + int16, at plus's memory (with ``mu_format="exact"`` it is
  ``optax.adamw`` on float32 params, bit for bit, given float32 gradients;
  bfloat16 gradients make bfloat16 updates, which miss a param's new value by
  at most an ulp of the update where it crosses zero or a binade);
  ``"compact"`` = (compact, q8, q8): a bf16 + int8 master and 8-bit moments
  with a bf16 scale per 32 values (FlashOptim's layout, Ortiz et al. 2026:
  ~7 bytes per param with bf16 gradients). exact and compact keep bfloat16
  params only. ``param_format``, ``mu_format`` and ``nu_format`` override
  the preset (any names of :mod:`collage_optax.formats`). Params stay plain bfloat16 arrays; apply the updates with
  ``optax.apply_updates``: each update is ``θ' − θ`` in the gradient's
  dtype, so ``apply_updates`` lands on the new first component (a landing
  miss is folded into the residual). ``learning_rate`` may be a schedule, and
  the function works inside ``optax.inject_hyperparams``; the learning rate
  and weight decay multiply in float32 (optax would round them to bfloat16
  on bfloat16 params: ``3e-4`` becomes 2.9948e-4).

  Leaves. bfloat16 and float16 params get the formats above. float32 and
  float64 params get ``optax.adamw``'s update, with moments of their own
  dtype and no residual: bit for bit under ``jit`` on the same tree (with
  ``mu_dtype=jnp.bfloat16`` the first moment is updated in float32 from its
  bfloat16 value, where optax multiplies in bfloat16).
  Integer and boolean params get no state and a zero update (of the
  gradient's dtype), so they stay bit for bit (``optax.adamw`` instead runs
  Adam on them and ``apply_updates`` truncates the float update into the
  integer). Complex and 8-bit float params are refused with an error.

  Non-finite gradients. A NaN or ±inf gradient element poisons, at that
  element only, ``m``, ``v`` and the param (its residual is set to 0); every
  other element is unaffected (in a ``q8`` moment the rest of its group of
  32 is requantised without it) and the step count advances, as in
  ``optax.adamw``. To skip
  such steps instead, one line::

    tx = optax.apply_if_finite(collage_optax.adamw(...), max_consecutive_errors=10)

  A step with a non-finite gradient then leaves params, residuals and moments
  bit for bit unchanged, and the next finite step trains on.

  Range. Finite gradients never make the state non-finite: where ``g²`` or a
  moment would overflow (``|g| > 1.8e19``) it saturates at the format's
  largest finite value, and the step is then no longer normalised but still
  descends. The 16-bit moment formats are bfloat16-based, so float16 params
  get moments of float32's range. An update that carries a param past its
  dtype's largest value overflows, as in ``optax.apply_updates``.

  Args:
    learning_rate: a scalar (>= 0) or a schedule; a schedule's values below 0
      act as 0 (so a schedule ending at 0 freezes params and residuals bit
      for bit).
    b1, b2, eps, eps_root: Adam's hyperparameters.
    weight_decay: decoupled weight decay.
    mask: where to apply weight decay (as in ``optax.adamw``).
    mode: ``"light"``, ``"plus"``, ``"full"``, ``"exact"`` or ``"compact"``
      (see :data:`PRESETS`).
    mu_dtype: the first moment's dtype for every float leaf, as in
      ``optax.adamw`` (``jnp.bfloat16`` or ``jnp.float32``).
    param_format, mu_format, nu_format: formats overriding the preset for
      bfloat16/float16 leaves.
    nesterov: Nesterov momentum (as in ``optax.adamw``).
    track_metrics: record EDQ and lost fraction (see :func:`collage_optax.metrics`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
  """
  if not callable(learning_rate):
    _check_hyperparam("learning_rate", learning_rate)
  _check_hyperparam("b1", b1, upper=1.0)
  _check_hyperparam("b2", b2, upper=1.0)
  _check_hyperparam("eps", eps)
  _check_hyperparam("eps_root", eps_root)
  _check_hyperparam("weight_decay", weight_decay)
  p_fmt, mu_fmt, nu_fmt, mu_other = _formats(mode, param_format, mu_format, nu_format, mu_dtype)
  who = "collage_optax.adamw"

  def init_fn(params):
    def leaf(path, p):  # (mu, nu, lo) of one leaf, by its kind.
      kind = transform.leaf_kind(who, path, p)
      if kind == "low":
        return (
          transform.init_moment(p, mu_fmt),
          transform.init_moment(p, nu_fmt),
          transform.init_residual(who, path, p, p_fmt),
        )
      if kind == "native":
        return transform.init_moment(p, mu_other), transform.init_moment(p, None), None
      return None, None, None

    flat, treedef = _tree.leaves_with_paths(params)
    out = [leaf(path, p) for path, p in flat]
    mu, nu, lo = (_tree.lift_storage(treedef.unflatten([o[i] for o in out])) for i in range(3))
    return AdamWState(jnp.zeros([], jnp.int32), mu, nu, lo, transform._init_metrics(params) if track_metrics else None)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _check_update_args(updates, state, params)
    expected = jax.eval_shape(init_fn, params)
    p_flat, treedef = _tree.leaves_with_paths(params)
    flat = treedef.flatten_up_to
    decay_mask = _decay_mask(mask, params)
    count_inc = numerics.safe_increment(state.count)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    # Phase 1, the moments: per leaf (p, g, kind, mu, nu, lo, decay), its wide gradient and (m, v).
    leaves, gs, values = [], [], []
    for (path, p), g, m, v, lo, want_m, want_v, decay in zip(
      p_flat,
      flat(updates),
      flat(state.mu),
      flat(state.nu),
      flat(state.lo),
      flat(expected.mu),
      flat(expected.nu),
      decay_mask,
    ):
      transform.check_moment(who, path, m, want_m)
      transform.check_moment(who, path, v, want_v)
      transform.check_residual(who, path, p, lo, p_fmt)
      kind = transform.leaf_kind(who, path, p)
      g32 = m32 = v32 = None
      if kind in ("low", "native") and g is not None and not _tree.is_empty(g):
        if not _tree.is_float(g):
          raise TypeError(
            f"{who}: the gradient for leaf {path} has dtype {g.dtype}; it must be a real float "
            "like the param. Pass real float gradients (e.g. jax.grad of a real loss); optimise "
            "complex leaves with a plain optax optimizer."
          )
        g32 = formats.widen(g).astype(transform.wide_dtype(p))
        m, v, m32, v32 = transform.adam_moments(g32, m, v, b1, b2, jnp.isfinite(g32))
      leaves.append((p, g, kind, m, v, lo, decay))
      gs.append(g32)
      values.append((m32, v32))
    # Phase 2: Adam's directions, bias-corrected over all leaves at once (as optax).
    dirs = transform.adam_directions(
      gs,
      [leaf[3] for leaf in leaves],
      [mv[0] for mv in values],
      [mv[1] for mv in values],
      b1,
      b2,
      eps,
      eps_root,
      count_inc,
      nesterov,
    )
    # Phase 3: weight decay, learning rate, and the params' encode.
    out = [_param_step(*leaf, d, lr) for leaf, d in zip(leaves, dirs)]
    cols: list[Sequence[Any]] = list(zip(*out)) if out else [[]] * 5
    new_u, new_m, new_v, new_lo = (treedef.unflatten(list(c)) for c in cols[:4])
    metrics = transform._compute_metrics(params, list(cols[4])) if track_metrics else None
    return new_u, AdamWState(count_inc, new_m, new_v, new_lo, metrics)

  def _param_step(p, g, kind, m, v, lo, decay, u, lr):
    """``(update, mu, nu, lo, metric sums)`` of one leaf, given Adam's direction ``u``."""
    if kind == "frozen" and g is not None and not _tree.is_empty(g):
      return jnp.zeros_like(g), m, v, lo, None
    if u is None:
      return g, m, v, lo, None
    wide = u.dtype
    x = formats.widen(p).astype(wide) if kind == "native" else p_fmt.decode(p, lo)
    if decay and not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
      u = u + jnp.asarray(weight_decay, wide) * x  # optax.add_decayed_weights
    # A learning rate below 0 acts as 0: optax.linear_schedule(lr, 0.0, n) ends
    # at -1.5e-10 under jit, and the residuals would keep drifting after it.
    u = -jnp.maximum(jnp.asarray(lr, wide), 0) * u  # optax.scale_by_learning_rate
    if kind == "native":
      emitted = formats.narrow(u, g.dtype)
      sums = transform._leaf_sums(formats.landed(p, emitted) - x, u) if track_metrics else None
      return emitted, m, v, lo, sums
    emitted, lo_new, delta = transform.compensated_leaf(p, lo, x + u, g.dtype, p_fmt)
    return emitted, m, v, lo_new, (transform._leaf_sums(delta, u) if track_metrics else None)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
