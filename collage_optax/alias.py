"""``collage_optax.adamw``: a drop-in for ``optax.adamw`` on bfloat16 params, as one fused step.

Each leaf's update is one elementwise pass: decode the param and the moments
from their storage formats, AdamW in float32 with optax's own formulas,
encode. A float32-exact format reproduces ``optax.adamw`` on float32 params
bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from collage_optax import _kernel, _tree, checks, formats, precision
from collage_optax._bits import wide_dtype

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
  "exact": ("exact", "bf16", "f32"),
  "compact": ("compact", "q8", "q8"),
}

#: The values of ``mode`` in :func:`adamw`.
MODES = tuple(PRESETS)


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
  metrics: precision.PrecisionMetrics | None = None


def _leaf_formats(
  mode: str,
  param_format: Any,
  mu_format: Any,
  nu_format: Any,
  mu_dtype: Any,
) -> tuple[_kernel.LeafFormats, formats.MomentFormat | None]:
  """The formats of bfloat16/float16 leaves, and the ``mu`` format of the others (``None``: their dtype)."""
  if mode not in PRESETS:
    raise ValueError(f"collage_optax.adamw: unknown mode={mode!r}; use one of {', '.join(map(repr, MODES))}.")
  preset = PRESETS[mode]
  mu_native = None
  if mu_dtype is not None:
    if mu_format is not None:
      raise ValueError("collage_optax.adamw: pass mu_dtype or mu_format, not both.")
    mu_native = formats.native_format(jnp.dtype(mu_dtype))
    if mu_native not in (formats.BF16, formats.F32):
      raise ValueError(f"collage_optax.adamw: mu_dtype={jnp.dtype(mu_dtype)} is not bfloat16 or float32.")
    mu_format = mu_native.name
  low = _kernel.LeafFormats(
    formats.param_format(param_format or preset[0]),
    formats.moment_format(mu_format or preset[1]),
    formats.moment_format(nu_format or preset[2], second=True),
  )
  return low, mu_native


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

  One step rather than ``optax.chain(scale_by_adam(...), add_decayed_weights(...),
  scale_by_learning_rate(...), compensate())``: a chain narrows the updates to
  the gradients' dtype between links, and weight decay must see the decoded
  float32 param, not its bfloat16 first component.

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
  mcf, mcf) (C+); ``"exact"`` = (exact, bf16, f32): the float32 master bit
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
  who = "collage_optax.adamw"
  if not callable(learning_rate):
    checks.check_hyperparam(who, "learning_rate", learning_rate)
  for name, value, upper in (("b1", b1, 1.0), ("b2", b2, 1.0), ("eps", eps, None), ("eps_root", eps_root, None)):
    checks.check_hyperparam(who, name, value, upper=upper)
  checks.check_hyperparam(who, "weight_decay", weight_decay)
  low, mu_native = _leaf_formats(mode, param_format, mu_format, nu_format, mu_dtype)
  no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0

  def fmts_of(path, p):
    return _kernel.leaf_formats(checks.leaf_kind(who, path, p), getattr(p, "dtype", None), low, mu_native)

  def init_fn(params):
    p_flat, treedef = _tree.leaves_with_paths(params)
    out = [_kernel.init_leaf(who, path, p, fmts_of(path, p)) for path, p in p_flat]
    mu, nu, lo = (formats.lift_storage(treedef.unflatten([o[i] for o in out])) for i in range(3))
    return AdamWState(jnp.zeros([], jnp.int32), mu, nu, lo, precision.init_metrics(params) if track_metrics else None)

  def check(updates, state, params):
    checks.require_params(who, params)
    checks.check_state_type(who, state, AdamWState, "optax.adamw, whose state lacks the low components")
    checks.check_structure(who, params, "params", updates, "updates")
    checks.check_shapes(who, params, "params", updates, "updates")
    checks.check_float_updates(who, params, updates, what="gradient")
    want = jax.eval_shape(init_fn, params)
    checks.check_state(who, params, {"moment": (state.mu, want.mu)})
    checks.check_state(who, params, {"moment": (state.nu, want.nu), "residual": (state.lo, want.lo)})

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    check(updates, state, params)
    p_flat, treedef = _tree.leaves_with_paths(params)
    g_flat = treedef.flatten_up_to(updates)
    fmts = [fmts_of(path, p) for path, p in p_flat]
    gs = [
      None if f is None or _tree.is_empty(g) else formats.widen(g).astype(wide_dtype(p.dtype))
      for (_, p), g, f in zip(p_flat, g_flat, fmts)
    ]
    count_inc = optax.safe_increment(state.count)
    dirs, mus, nus = _kernel.adam(
      gs,
      treedef.flatten_up_to(state.mu),
      treedef.flatten_up_to(state.nu),
      fmts,
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      count_inc=count_inc,
      nesterov=nesterov,
    )
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    steps = [
      param_step(p, g, lo, d, lr, decay, f)
      for (_, p), g, lo, d, decay, f in zip(
        p_flat, g_flat, treedef.flatten_up_to(state.lo), dirs, _decay_mask(mask, params), fmts
      )
    ]
    new_u, new_lo = (treedef.unflatten([s[i] for s in steps]) for i in (0, 1))
    tracked = precision.compute_metrics(params, [s[2] for s in steps]) if track_metrics else None
    return new_u, AdamWState(count_inc, treedef.unflatten(mus), treedef.unflatten(nus), new_lo, tracked)

  def param_step(p, g, lo, u, lr, decay, fmts):
    """``(update, residual, metric sums)`` of one leaf, given Adam's direction ``u``."""
    if _tree.is_empty(g):
      return g, lo, None
    if u is None:  # no step: an integer or boolean leaf gets a zero update of the gradient's dtype
      return (jnp.zeros_like(g) if hasattr(p, "dtype") and not _tree.is_float(p) else g), lo, None
    wide = u.dtype
    x = formats.widen(p).astype(wide) if fmts.param is None else fmts.param.decode(p, lo)
    if decay and not no_decay:
      u = u + jnp.asarray(weight_decay, wide) * x  # optax.add_decayed_weights
    # A learning rate below 0 acts as 0: optax.linear_schedule(lr, 0.0, n) ends
    # at -1.5e-10 under jit, and the residuals would keep drifting after it.
    u = -jnp.maximum(jnp.asarray(lr, wide), 0) * u  # optax.scale_by_learning_rate
    if fmts.param is None:
      emitted = formats.narrow(u, g.dtype)
      return emitted, lo, (precision.leaf_sums(formats.landed(p, emitted) - x, u) if track_metrics else None)
    emitted, lo_new, delta = _kernel.store_param(p, lo, x + u, g.dtype, fmts.param)
    return emitted, lo_new, (precision.leaf_sums(delta, u) if track_metrics else None)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
