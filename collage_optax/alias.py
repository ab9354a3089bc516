"""``collage_optax.adamw``: a drop-in for ``optax.adamw`` on bfloat16 params, as one fused step.

Each leaf's update is one elementwise pass: decode the param and the moments
from their storage formats, AdamW in float32 with optax's own formulas,
encode. A float32-exact format reproduces ``optax.adamw`` on float32 params
bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from collage_optax import _kernel, _pallas, _tree, apply, checks, formats, precision
from collage_optax._bits import wide_dtype

__all__ = ["MODES", "PRESETS", "AdamWState", "adamw", "precise_small_leaves"]

#: The presets of :func:`adamw`'s ``mode``: ``(param_format, mu_format,
#: nu_format)`` for bfloat16/float16 params. light: MCF params (Yu et al.
#: 2024, strategy B); plus: also an MCF ``v`` (strategy C); full: also an MCF
#: ``m`` (C+); exact: float32 masters bit for bit (bf16 + int16) and a float32
#: ``v``, at plus's memory; compact: bf16 + int8 masters and 8-bit moments
#: (FlashOptim's layout, ~7 bytes per param with bf16 gradients); lean:
#: compact's master, a bf16 ``m`` and a ``log16`` ``v`` that decays (~9.1 bytes
#: per param with bf16 gradients, below light's 10). exact, compact and lean
#: keep bfloat16 params only.
PRESETS: dict[str, tuple[str, str, str]] = {
  "light": ("mcf", "bf16", "bf16"),
  "plus": ("mcf", "bf16", "mcf"),
  "full": ("mcf", "mcf", "mcf"),
  "exact": ("exact", "bf16", "f32"),
  "compact": ("compact", "q8", "q8"),
  "lean": ("compact", "bf16", "log16"),
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


def precise_small_leaves(mode: str, precise: str = "exact", *, min_size: int = 4096) -> Callable[[str, Any], str]:
  """A per-leaf ``mode`` for :func:`adamw`: ``precise`` for small leaves, ``mode`` for the rest.

  A leaf is small when it has fewer than ``min_size`` elements or fewer than
  two dimensions (biases, norm gains, scalars): the leaves where low-bit
  state hurts first (bitsandbytes keeps tensors under 4096 elements in
  32-bit; FlashOptim has ``full_precision_layers``) and where it saves
  almost nothing. Example::

    tx = collage_optax.adamw(3e-4, mode=collage_optax.precise_small_leaves("compact"))
  """
  for name in (mode, precise):
    if name not in PRESETS:
      raise ValueError(f"precise_small_leaves: unknown mode {name!r}; use one of {', '.join(map(repr, MODES))}.")

  def policy(path: str, p: Any) -> str:
    del path
    shape = getattr(p, "shape", ())  # None and optax.MaskedNode leaves: no shape
    small = int(math.prod(shape)) < min_size or len(shape) < 2
    return precise if small else mode

  return policy


def _decay_mask(mask: Any, params: Any) -> list[bool]:
  """Per leaf of ``params``: whether weight decay applies (``mask`` as in ``optax.adamw``)."""
  if mask is None:
    return [True] * len(_tree.leaves_with_paths(params)[0])
  tree = mask(params) if callable(mask) else mask
  flat = _tree.per_leaf(tree, params, is_value=lambda x: isinstance(x, bool))
  return [bool(m) if not _tree.is_empty(m) else False for m in flat]


Spec = Any  # a name, a pytree prefix of names, or a callable ``(path, param) -> name``


def _is_name(x: Any) -> bool:
  return x is None or isinstance(x, str)


def _check_names(spec: Spec, table: Any, what: str) -> None:
  """Rejects an unknown name in a name or a prefix tree of names at construction (a callable: per leaf)."""
  if callable(spec) and not _is_name(spec):
    return
  for name in jax.tree.leaves(spec):
    if name not in table:
      raise ValueError(f"collage_optax.adamw: unknown {what}={name!r}; use one of {', '.join(map(repr, table))}.")


def _mu_native(mu_dtype: Any, mu_format: Spec) -> formats.MomentFormat | None:
  """``mu_dtype`` as the first moment's format of every float leaf (``None``: each leaf's own dtype)."""
  if mu_dtype is None:
    return None
  if mu_format is not None:
    raise ValueError("collage_optax.adamw: pass mu_dtype or mu_format, not both.")
  native = formats.native_format(jnp.dtype(mu_dtype))
  if native not in (formats.BF16, formats.F32):
    raise ValueError(f"collage_optax.adamw: mu_dtype={jnp.dtype(mu_dtype)} is not bfloat16 or float32.")
  return native


def _resolver(
  mode: Spec, param_format: Spec, mu_format: Spec, nu_format: Spec, mu_native: formats.MomentFormat | None
) -> Callable[[Any], list[_kernel.LeafFormats | None]]:
  """``params -> [LeafFormats | None per leaf]``: the preset of each leaf's mode, overridden per leaf."""
  _check_names(mode, PRESETS, "mode")
  _check_names(param_format, formats.PARAM_FORMATS, "param_format")
  _check_names(mu_format, formats.MOMENT_FORMATS, "mu_format")
  _check_names(nu_format, formats.MOMENT_FORMATS, "nu_format")
  if not callable(mu_format) or _is_name(mu_format):
    for name in jax.tree.leaves(mu_format):  # a first moment's format ('log16' keeps second moments only)
      checks.moment_format("collage_optax.adamw", name)
  if mu_native is not None:
    mu_format = mu_native.name

  def resolve(params: Any) -> list[_kernel.LeafFormats | None]:
    flat = _tree.leaves_with_paths(params)[0]
    specs = [_tree.per_leaf(s, params, is_value=_is_name) for s in (mode, param_format, mu_format, nu_format)]
    out = []
    for (path, p), m, pf, mf, nf in zip(flat, *specs):
      if m not in PRESETS:
        raise ValueError(
          f"collage_optax.adamw: leaf {path}: unknown mode={m!r}; use one of {', '.join(map(repr, MODES))}."
        )
      preset = PRESETS[m]
      low = _kernel.LeafFormats(
        formats.param_format(pf or preset[0]),
        checks.moment_format("collage_optax.adamw", mf or preset[1], path=path),
        formats.moment_format(nf or preset[2], second=True),
      )
      kind = checks.leaf_kind("collage_optax.adamw", path, p)
      out.append(_kernel.leaf_formats(kind, getattr(p, "dtype", None), low, mu_native))
    return out

  return resolve


def adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  weight_decay: float = 1e-4,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  *,
  mode: Spec = "plus",
  mu_dtype: Any | None = None,
  param_format: Spec = None,
  mu_format: Spec = None,
  nu_format: Spec = None,
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
  ~7 bytes per param with bf16 gradients); ``"lean"`` = (compact, bf16,
  log16): compact's master, a bf16 first moment and a second moment of
  16-bit codes of ``log2 v`` (2**-11 relative, rounded stochastically, so
  that it decays where a bf16 ``v`` stalls; ~9.1 bytes per param with bf16
  gradients). exact, compact and lean keep bfloat16 params only.
  ``param_format``, ``mu_format`` and ``nu_format`` override
  the preset (any names of :mod:`collage_optax.formats`). Params stay plain bfloat16 arrays; apply the updates with
  ``optax.apply_updates``: each update is ``θ' − θ`` in the gradient's
  dtype, so ``apply_updates`` lands on the new first component (a landing
  miss is folded into the residual). ``learning_rate`` may be a schedule, and
  the function works inside ``optax.inject_hyperparams``; the learning rate
  and weight decay multiply in float32 (optax would round them to bfloat16
  on bfloat16 params: ``3e-4`` becomes 2.9948e-4).

  Leaves. bfloat16 and float16 params get the formats above. float32 and
  float64 params get ``optax.adamw``'s update, with moments of their own
  dtype and no residual: bit for bit under ``jit`` on a tree of float32 and
  float64 params (beside bfloat16 leaves XLA may compile a division by a bias
  correction as a multiplication by its reciprocal, as it does for optax's
  own step on another tree: float32 rounding; with ``mu_dtype=jnp.bfloat16``
  the first moment is updated in float32 from its bfloat16 value, where optax
  multiplies in bfloat16).
  Integer and boolean params get no state and a zero update (of the
  gradient's dtype), so they stay bit for bit (``optax.adamw`` instead runs
  Adam on them and ``apply_updates`` truncates the float update into the
  integer). Complex and 8-bit float params are refused with an error.

  Non-finite gradients. A NaN or ±inf gradient element poisons, at that
  element only, ``m``, ``v`` and the param (its residual is set to 0); every
  other element is unaffected (in a ``q8`` or ``log16`` moment the rest of
  its group of 32 is requantised without it) and the step count advances, as in
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
    mode: ``"light"``, ``"plus"``, ``"full"``, ``"exact"``, ``"compact"`` or
      ``"lean"`` (see :data:`PRESETS`); or one per leaf: a pytree prefix of the params
      with a name at each node (as ``optax.masked``'s mask), or a callable
      ``(path, param) -> name`` (``path`` as in the error messages, e.g.
      ``"['enc']['w']"``), such as :func:`precise_small_leaves`.
    mu_dtype: the first moment's dtype for every float leaf, as in
      ``optax.adamw`` (``jnp.bfloat16`` or ``jnp.float32``).
    param_format, mu_format, nu_format: formats overriding the preset for
      bfloat16/float16 leaves; each a name, a prefix tree of names or a
      callable ``(path, param) -> name`` (``None``: the preset's).
      ``"log16"`` keeps second moments only: a ``nu_format``, never a
      ``mu_format`` (a ``ValueError``).
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
  resolve = _resolver(mode, param_format, mu_format, nu_format, _mu_native(mu_dtype, mu_format))
  no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0
  hp = _kernel.Adam(b1, b2, eps, eps_root, nesterov)

  def init_fn(params):
    p_flat, treedef = _tree.leaves_with_paths(params)
    out = [_kernel.init_leaf(who, path, p, f) for (path, p), f in zip(p_flat, resolve(params))]
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

  def step(updates, state, params, emit_params: bool):
    """``(new updates, state)``, or with ``emit_params`` ``(new params, state)``: one step of every leaf."""
    check(updates, state, params)
    p_flat, treedef = _tree.leaves_with_paths(params)
    g_flat = treedef.flatten_up_to(updates)
    fmts = resolve(params)
    count_inc = optax.safe_increment(state.count)
    wides = [wide_dtype(p.dtype) if f is not None else None for (_, p), f in zip(p_flat, fmts)]
    mu, nu = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    lo, decays = treedef.flatten_up_to(state.lo), _decay_mask(mask, params)
    then = lambda i, d: param_step(p_flat[i][1], g_flat[i], lo[i], d, lr, decays[i], fmts[i])

    # compact and lean leaves (compact params, q8/bf16 m, q8/log16 v): one Pallas kernel each on GPU and TPU
    # (the jnp path on CPU); not with metrics, which need the step's intermediate values.
    takes = [
      i
      for i, ((_, p), g, f) in enumerate(zip(p_flat, g_flat, fmts))
      if not track_metrics and not _tree.is_empty(g) and _pallas.takes(p, g, f)
    ]

    def own_step(i, sc):
      """Leaf ``i``'s whole step: :func:`_pallas.platform_step` around its jnp path (``adam`` and ``param_step``).

      With ``emit_params`` its first output is the new param: the kernel writes it in place of the update.
      """

      def jnp_step(p, g, lo_i, m, v):
        (d,), (m_new,), (v_new,) = _kernel.adam([g], [m], [v], [fmts[i]], [wides[i]], hp, count_inc)
        u, lo_new, _ = param_step(p, g, lo_i, d, lr, decays[i], fmts[i])
        return (optax.apply_updates(p, u) if emit_params else u), lo_new, m_new, v_new

      def leaf(g, m):
        decay = decays[i] and not no_decay
        out, lo_new, m_new, v_new = _pallas.platform_step(
          jnp_step, p_flat[i][1], g, lo[i], m, nu[i], sc, nesterov=nesterov, decay=decay, emit_param=emit_params
        )
        return (out, lo_new, None), m_new, v_new

      return leaf

    own = {}
    if takes:
      sc = _pallas.scalars(b1, b2, eps, eps_root, count_inc, lr, weight_decay, nesterov)  # once for all its leaves
      own = {i: own_step(i, sc) for i in takes}
    steps, mus, nus = _kernel.adam_then(g_flat, mu, nu, fmts, wides, hp, count_inc, then, own)
    out = [s[0] for s in steps]
    if emit_params:
      out = [x if i in own else optax.apply_updates(p, x) for i, ((_, p), x) in enumerate(zip(p_flat, out))]
    new_lo = treedef.unflatten([s[1] for s in steps])
    tracked = precision.compute_metrics(params, [s[2] for s in steps], state.metrics) if track_metrics else None
    return treedef.unflatten(out), AdamWState(
      count_inc, treedef.unflatten(mus), treedef.unflatten(nus), new_lo, tracked
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return step(updates, state, params, emit_params=False)

  def apply_fn(grads, state, params=None, **extra_args):
    del extra_args
    return step(grads, state, params, emit_params=True)

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

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  apply.register(tx, apply_fn)
  return tx
