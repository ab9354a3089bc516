"""The Adam kernel shared by ``adamw`` and ``scale_by_adam``, and the store of a param's new value.

Every leaf's formats are resolved once by the front-end (:class:`LeafFormats`)
and passed in; nothing here reads a format from an array's dtype. Per leaf
the arithmetic is float32 (float64 for float64 leaves), optax's own
formulas (Kingma & Ba 2015; ``optax.tree.update_moment``,
``optax.tree.bias_correction``), between a decode and an encode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from optax import tree_utils as otu

from collage_optax import _tree, formats

__all__ = [
  "Adam",
  "LeafFormats",
  "Scaled",
  "adam",
  "adam_then",
  "init_leaf",
  "init_residual",
  "leaf_formats",
  "saturate",
  "scaled",
  "store_param",
]


class LeafFormats(NamedTuple):
  """The storage of one leaf: its residual's format (``None``: no residual) and its moments'."""

  param: formats.ParamFormat | None
  mu: formats.MomentFormat
  nu: formats.MomentFormat


def saturate(x: chex.Array, finite: chex.Array, big: float, clip: Callable[..., Any] = jnp.clip) -> chex.Array:
  """``x`` clipped to ``[−big, big]`` where ``finite``, else ``x``.

  ``finite`` marks the elements whose gradient was finite: there a result
  beyond the storage (``g²`` for ``|g| > 1.8e19``, a moment above the format's
  largest value) saturates instead of becoming ``inf``, which would freeze Adam
  for good (``u = m / √inf = 0``). Non-finite gradients still propagate, as in
  optax (use ``optax.apply_if_finite`` to skip them).
  """
  # Clipping to ±inf where not finite leaves x as it is and uses x once. (``clip``: the Pallas kernel's
  # NaN-keeping one.)
  return clip(x, jnp.where(finite, -big, -jnp.inf), jnp.where(finite, big, jnp.inf))


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


class Scaled(NamedTuple):
  """The scalars of :func:`_scaled_direction`, from the step count (float32, or the leaf's wide type).

  With ``c1 = 1 − b1**t`` and ``c2 = 1 − b2**t`` (optax's bias corrections):
  ``k = c1/√c2``, ``es = eps·√c2``, ``rc = eps_root·c2``, ``vmax = c2·`` the
  type's largest value; for Nesterov ``nb = b1·c1/c1'`` (``c1'`` at
  ``t + 1``) and ``nc = 1 − b1``.
  """

  k: Any
  es: Any
  rc: Any
  vmax: Any
  nb: Any
  nc: Any


def scaled(b1, b2, eps, eps_root, count_inc: chex.Array, nesterov: bool, dtype: Any = jnp.float32) -> Scaled:
  """The :class:`Scaled` scalars of a step at the incremented count ``count_inc`` (in ``dtype``)."""
  f = lambda x: jnp.asarray(x, dtype)
  c1 = f(1 - b1**count_inc)
  # A b2 that rounds to 1 in float32 makes c2 = 0: the smallest normal instead keeps the step finite (v̂ = inf
  # in optax's formula: a zero direction).
  c2 = jnp.maximum(f(1 - b2**count_inc), jnp.finfo(dtype).tiny)
  sc2 = jnp.sqrt(c2)
  nb = f(b1) * c1 / f(1 - b1 ** optax.safe_increment(count_inc)) if nesterov else f(0)
  big = f(jnp.finfo(dtype).max)
  return Scaled(c1 / sc2, f(eps) * sc2, f(eps_root) * c2, big * c2, nb, f(1 - b1))


def _scaled_direction(g: chex.Array, m: chex.Array, v: chex.Array, sc: Scaled, nesterov: bool) -> chex.Array:
  r"""Adam's direction of a leaf whose moments are stored in fewer bits than its arithmetic type's range.

  Optax's ``m̂ / (√(v̂ + eps_root) + eps)`` with ``m̂ = m/c1``, ``v̂ = v/c2``,
  multiplied above and below by ``c1`` (Kingma & Ba 2015, §2: the bias
  corrections fold into the step size):

  .. math::

     d = \frac{m}{(\sqrt{v + eps_{root}\,c_2} + eps\sqrt{c_2})\; c_1/\sqrt{c_2}},

  (Nesterov: ``b1·(c1/c1')·m + (1 − b1)·g`` above), so that a stored moment
  is never multiplied by a bias correction (``1/c2`` is 1000 at the first
  step). ``v`` counts at most ``vmax = c2·max`` (``v̂`` at most the type's
  largest value, as optax's ``v̂`` before it overflows; where ``g²``
  overflows, ``v`` saturates at its format's largest value, and the step is
  no longer normalised but still descends), written ``v − max(v − vmax, 0)``
  so that an infinite ``v`` (an infinite gradient) becomes NaN. For a finite
  gradient the denominator is then finite and at most the quotient
  overflows, which a clip to the type's range saturates (``eps = 0`` with
  ``m = v = 0`` is 0/0, as in optax); a non-finite gradient makes the
  quotient NaN, which the clip keeps. No select on the gradient's
  finiteness here: XLA:TPU v6e then keeps the whole step in one pass (with
  ``m̂`` and ``v̂`` saturated separately where the gradient is finite, it
  splits it in two).
  """
  big = float(jnp.finfo(g.dtype).max)
  num = sc.nb * m + sc.nc * g if nesterov else m
  v = v - jnp.maximum(v - sc.vmax, 0)
  return jnp.clip(num / ((jnp.sqrt(v + sc.rc) + sc.es) * sc.k), -big, big)


def _direction(g: chex.Array, m: Any, v: Any, m_hat: Any, v_hat: Any, eps, eps_root):
  """optax's ``m̂ / (√(v̂ + eps_root) + eps)`` of a leaf whose moments have its own dtype's range."""
  # optax's expression untouched, so that XLA compiles it as in optax (the
  # same bits: a clip on it, or any other arithmetic with its operands,
  # changes how it fuses). Only moments beyond 1e30 can overflow m̂ or v̂ (for
  # 1 − b ≥ 3.4e-9); there the step is sign(m), the size Adam's normalised
  # step has when |g| dominates.
  overflow = jnp.isfinite(g) & ((jnp.abs(m) > 1e30) | (v > 1e30))
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
  ``count_inc`` is the incremented step count. Leaves whose moments hold
  their arithmetic type's range (float32 and float64 leaves) get optax's
  ``tree_bias_correction`` and direction, as in ``optax.scale_by_adam`` (so
  that XLA compiles the same division; Nesterov as there too); the others
  (bfloat16, ``mcf``, ``q8``, ``log16`` moments) :func:`_scaled_direction`.
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
  # Moments of the leaf's own range (float32, float64): optax's bias corrections and direction, as
  # optax.scale_by_adam (Nesterov as there too), the same bits. The others: _scaled_direction.
  own = [j for j, i in enumerate(steps) if _own_range(fmts[i], gs[i])]
  g_own = [gs[steps[j]] for j in own]
  if nesterov:
    m_hat = jax.tree.map(
      lambda m, g: b1 * m + (1 - b1) * g,
      otu.tree_bias_correction([m[j] for j in own], b1, optax.safe_increment(count_inc)),
      otu.tree_bias_correction(g_own, b1, count_inc),
    )
  else:
    m_hat = otu.tree_bias_correction([m[j] for j in own], b1, count_inc)
  v_hat = otu.tree_bias_correction([v[j] for j in own], b2, count_inc)
  dirs: list[chex.Array | None] = [None] * len(gs)
  for j, g, m_h, v_h in zip(own, g_own, m_hat, v_hat):
    dirs[steps[j]] = _direction(g, m[j], v[j], m_h, v_h, eps, eps_root)
  sc: dict[Any, Scaled] = {}  # per arithmetic type
  own_set = set(own)
  for j, i in enumerate(steps):
    if j not in own_set:
      g = gs[i]
      assert g is not None
      if g.dtype not in sc:
        sc[g.dtype] = scaled(b1, b2, eps, eps_root, count_inc, nesterov, g.dtype)
      dirs[i] = _scaled_direction(g, m[j], v[j], sc[g.dtype], nesterov)
  return dirs, new_mus, new_nus


def _own_range(fmt: LeafFormats | None, g: Any) -> bool:
  """Whether a leaf's first moment holds its arithmetic type's whole range (float32 and float64 moments)."""
  assert fmt is not None
  return fmt.mu.max >= float(jnp.finfo(g.dtype).max)


def grouped(mu: Any, nu: Any) -> bool:
  """Whether a leaf keeps a grouped moment (``q8``, ``log16``): codes and per-group scales."""
  return isinstance(mu, formats.GROUPED) or isinstance(nu, formats.GROUPED)


def wait(tree: Any, after: chex.Array) -> Any:
  """``tree``, which on single-device XLA:CPU is read no earlier than ``after`` is computed; elsewhere ``tree``.

  XLA:CPU schedules independent leaves' steps side by side, so that the
  float32 temporaries of every grouped moment (its decoded values, the group
  maxima's operands) are live at once: a compact step's scratch grows with
  the whole model rather than its largest leaf. Each array of ``tree`` is
  selected against a condition on one element of ``after`` that never holds
  (:func:`_never`; an ``optimization_barrier`` does not order XLA:CPU's
  schedule). GPU and TPU fuse each leaf's step into kernels whose scratch
  does not add up; a sharded ``after`` would need a collective to give up
  its element, so several CPU devices skip the wait too.
  """
  if not _waits():
    return tree

  def ordered():
    never = _never(jnp.ravel(after)[0])
    return jax.tree.map(lambda x: jnp.where(never, jnp.zeros_like(x), x), tree)

  return lax.platform_dependent(cpu=ordered, default=lambda: tree)


def _waits() -> bool:
  """Whether :func:`wait` orders anything: in a process with one CPU device."""
  return len(jax.devices("cpu")) == 1


def adam_then(
  grads: list[Any],
  mus: list[Any],
  nus: list[Any],
  fmts: list[LeafFormats | None],
  wides: list[Any],
  hp: Adam,
  count_inc: chex.Array,
  then: Callable[[int, chex.Array | None], Any],
  own: Mapping[int, Callable[[Any, Any], tuple[Any, Any, Any]]] | None = None,
) -> tuple[list[Any], list[Any], list[Any]]:
  """:func:`adam`, and ``then(i, direction)`` of each leaf ``i``: ``(outputs of then, new mus, new nus)``.

  A leaf ``i`` in ``own`` takes its whole step by itself instead:
  ``own[i](grad, mu)`` gives ``(output, new mu, new nu)`` (``adamw``'s
  compact and lean leaves: a Pallas kernel on GPU and TPU). Leaves with grouped
  moments (:func:`grouped`) and those in ``own`` step one after another, each
  one's inputs waiting (:func:`wait`) for the previous one's first output,
  so that on CPU one grouped leaf's temporaries are live at a time; the
  others step together, as in :func:`adam` (whose arithmetic this is, leaf
  by leaf). Where nothing waits (several CPU devices) all leaves not in
  ``own`` step together: XLA:CPU contracts ``a·b + c`` into an FMA inside a
  fusion, so a leaf's step in another fusion could round differently from
  the same step on a mesh.
  """
  n, own, waits = len(grads), own or {}, _waits()
  seq = [i for i in range(n) if i in own or (waits and fmts[i] is not None and grouped(mus[i], nus[i]))]
  rest = [i for i in range(n) if i not in seq]
  pick = lambda xs: [xs[i] for i in rest]
  dirs, new_mus, new_nus = adam(pick(grads), pick(mus), pick(nus), pick(fmts), pick(wides), hp, count_inc)
  outs: list[Any] = [None] * n
  mus_out, nus_out = list(mus), list(nus)
  for j, i in enumerate(rest):
    outs[i], mus_out[i], nus_out[i] = then(i, dirs[j]), new_mus[j], new_nus[j]
  after = None
  for i in reversed(seq):
    g, mu = (grads[i], mus[i]) if after is None else wait((grads[i], mus[i]), after)
    if i in own:
      outs[i], mus_out[i], nus_out[i] = own[i](g, mu)
    else:
      (d,), (mus_out[i],), (nus_out[i],) = adam([g], [mu], [nus[i]], [fmts[i]], [wides[i]], hp, count_inc)
      outs[i] = then(i, d)
    leaves = [x for x in jax.tree.leaves(outs[i]) if jnp.size(x)]
    after = leaves[0] if leaves else after
  return outs, mus_out, nus_out


# ---------------------------------------------------------------------------
# A param's new value, stored.
# ---------------------------------------------------------------------------


def _never(r: chex.Array) -> chex.Array:
  """Elementwise ``False``, computed from ``r`` (XLA cannot see that it never holds).

  A float ``r`` with a signalling-NaN bit pattern (no arithmetic produces
  one), an integer ``r`` whose ``r | 1`` is 0.
  """
  if jnp.issubdtype(r.dtype, jnp.integer):
    return (r | 1) == 0
  uint = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[r.dtype.itemsize]
  pattern = {"bfloat16": 0x7F81, "float16": 0x7C01, "float32": 0x7F800001, "float64": 0x7FF0000000000001}
  return lax.bitcast_convert_type(r, uint) == np.array(pattern[r.dtype.name], uint)


def _after(u: chex.Array, r: chex.Array) -> chex.Array:
  """``u``, made to depend on ``r``: ``−u`` where :func:`_never` of ``r`` holds, which it never does.

  ``optax.apply_updates(p, u)`` overwrites the donated param, which the loop
  computing the residual ``r`` reads too. XLA:CPU copies a donated input
  unless every other reader of it is an ancestor of the loop that overwrites
  it; this dependence makes the residual's loop one (an
  ``optimization_barrier`` does not survive to copy insertion).
  """
  return jnp.where(_never(r), -u, u)


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
