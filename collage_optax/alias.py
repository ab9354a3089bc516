"""``collage_optax.adamw``: a drop-in for ``optax.adamw`` on bfloat16 params."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics

from collage_optax import _tree
from collage_optax import transform

__all__ = ["MODES", "adamw"]

#: The values of ``mode`` in :func:`adamw`; they keep MCF params (light),
#: also MCF ``v`` (plus), also MCF ``m`` (full).
MODES = ("light", "plus", "full")


def _check_hyperparam(name: str, value: Any, *, upper: Optional[float] = None) -> None:
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


def _keep_dtypes(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner`` with its updates cast back to the dtypes of the updates it got.

  Array hyperparameters (float32 under ``optax.inject_hyperparams``) would
  promote bfloat16 updates to float32, and ``compensate`` emits its input's
  dtype, which ``optax.apply_if_finite`` and ``optax.MultiSteps`` need to match
  the gradients'. ``grow`` rounds the update to the storage precision anyway.
  """

  def update_fn(updates, state, params=None):
    new, state = inner.update(updates, state, params)
    cast = lambda n, u: n if n is None or u is None else n.astype(u.dtype)
    return jax.tree.map(cast, new, updates, is_leaf=lambda x: x is None), state

  return optax.GradientTransformation(inner.init, update_fn)


def _float32_scalar(value: Any) -> Any:
  """A Python-number hyperparameter as a float32 scalar; a schedule returning one.

  optax multiplies bfloat16 updates by a Python float (weakly typed) in
  bfloat16, so ``weight_decay=0.1`` acts as 0.10009766: a systematic error of
  up to ``2**-9`` in every step that no compensation downstream can undo. A
  float32 scalar makes the product float32, which ``_keep_dtypes`` rounds once.
  The scalar is a NumPy float64, which JAX makes float32 unless x64 is on:
  then float64 leaves get the float64 value (a float32 one would perturb their
  update by 1.5e-8 relative). Zero stays a Python 0 (optax then skips the
  link); arrays pass unchanged.
  """
  if callable(value):
    return lambda count: jnp.asarray(value(count), jnp.float32)
  if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0:
    return np.float64(value)
  return value


def _scale_by_learning_rate(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """``optax.scale_by_learning_rate`` with ``−lr·u`` formed in float32.

  optax casts the learning rate to the updates' dtype (a schedule's value
  explicitly, a Python float by weak typing): in bfloat16 ``lr = 3e-4`` is
  2.9948e-4, every step 0.17% short, which no compensation can undo. Here the
  learning rate stays float32 and the product is rounded once to the update's
  dtype; a learning rate below 0 acts as 0. The state is optax's
  (``ScaleByScheduleState`` for a schedule).
  """

  def scale(lr, updates):
    def leaf(u):
      wide = jnp.promote_types(u.dtype, jnp.float32)
      # A learning rate below 0 acts as 0: optax.linear_schedule(lr, 0.0, n)
      # ends at -1.5e-10, not 0, under jit (count/n is computed as count·(1/n)),
      # and the low components would keep drifting after the schedule's end.
      return (u.astype(wide) * -jnp.maximum(jnp.asarray(lr, wide), 0)).astype(u.dtype)
    return jax.tree.map(lambda u: None if u is None else leaf(u), updates, is_leaf=lambda x: x is None)

  if not callable(learning_rate):
    return optax.GradientTransformation(
        optax.init_empty_state,
        lambda updates, state, params=None: (scale(learning_rate, updates), state))

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    lr = jnp.asarray(learning_rate(state.count), jnp.float32)
    return scale(lr, updates), optax.ScaleByScheduleState(count=numerics.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _check_update_args(updates: Any, state: Any, params: Any, n_links: int) -> None:
  """Clear errors, naming the leaf path and the fix, for the inputs of ``adamw``'s update."""
  who = "collage_optax.adamw"
  if params is None:
    raise ValueError(
        f"{who} needs `params`: call tx.update(grads, opt_state, params) with the "
        "current params (as for optax.adamw), so that their low components can be updated."
    )
  if not (isinstance(state, tuple) and len(state) == n_links
          and isinstance(state[0], transform.ScaleByAdamState)
          and isinstance(state[-1], transform.CompensateState)):
    got = (f"({', '.join(type(s).__module__ + '.' + type(s).__name__ for s in state)})"
           if isinstance(state, tuple) else type(state).__name__)
    raise TypeError(
        f"{who}: opt_state {got} is not the state of collage_optax.adamw; it comes "
        "from another optimizer (e.g. optax.adamw, whose state lacks the low "
        "components). Call opt_state = tx.init(params) with this optimizer."
    )
  _tree.check_structure(who, params, "params", updates, "updates")
  _tree.check_shapes(who, params, "params", updates, "updates")
  _tree.check_structure(
      who, params, "params", state[0].mu, "opt_state",
      fix="The state was made for other params: call tx.init(params) with the params you train.")
  for path, u in _tree.leaves_with_paths(updates)[0]:
    if getattr(u, "dtype", None) == jax.dtypes.float0:
      raise TypeError(
          f"{who}: the update for leaf {path} is float0 (jax.grad(..., allow_int=True) "
          "of an integer leaf); optax cannot apply it either. Differentiate only "
          "the float params, or give that leaf a zero float gradient."
      )


def _freeze_non_float(updates: Any, params: Any) -> Any:
  """Zero updates (of the updates' dtypes) for integer and boolean params."""
  frozen = lambda p, u: jnp.zeros_like(u) if (
      u is not None and hasattr(p, "dtype") and not _tree.is_float(p)) else u
  return jax.tree.map(frozen, params, updates, is_leaf=_tree.is_empty)


def _guard(*links: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(*links)`` with its update's inputs checked and non-float leaves frozen."""
  inner, n_links = optax.chain(*links), len(links)

  def update_fn(updates, state, params=None, **extra_args):
    _check_update_args(updates, state, params, n_links)
    new, state = inner.update(updates, state, params, **extra_args)
    return _freeze_non_float(new, params), state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    *,
    mode: str = "plus",
    nesterov: bool = False,
    track_metrics: bool = False,
) -> optax.GradientTransformation:
  """AdamW (Loshchilov & Hutter 2019) with COLLAGE for bfloat16 params.

  ``optax.chain(scale_by_adam(...), optax.add_decayed_weights(weight_decay, mask),
  optax.scale_by_learning_rate(learning_rate), compensate())``, with the
  learning rate and weight decay applied as float32 scalars (optax would round
  them to bfloat16):

  * ``mode="light"``: params are MCFs ``(θ, lo)`` (Yu et al. 2024, strategy B);
  * ``mode="plus"``: also the second moment ``v`` is an MCF and ``b2`` an MCF
    scalar (strategy C, the default);
  * ``mode="full"``: also the first moment ``m`` (beyond the paper).

  Params stay plain bfloat16 arrays; apply the updates with
  ``optax.apply_updates``. ``learning_rate`` may be a schedule, and the
  function works inside ``optax.inject_hyperparams``.

  Leaves. bfloat16 and float16 params get COLLAGE (low components, MCF
  moments per ``mode``). float32 and float64 params get ``optax.adamw``'s
  update, with moments of their own dtype and no low component. Integer and
  boolean params get no state and a zero update (of the gradient's dtype), so
  they stay bit for bit: ``optax.adamw`` instead runs Adam on them and
  ``apply_updates`` truncates the float update into the integer (with weight
  decay an int32 100 drifts down a unit per step), and the dtype of their
  moments changes after the first step. Complex and 8-bit float params are
  refused with an error.

  Non-finite gradients. A NaN or ±inf gradient element poisons, at that
  element only, ``m``, ``v`` (and their low parts), the param and its low
  component; every other element is unaffected and the step count advances,
  as in ``optax.adamw``. To skip such steps instead, one line::

    tx = optax.apply_if_finite(collage_optax.adamw(...), max_consecutive_errors=10)

  A step with a non-finite gradient then leaves params, low components and
  moments bit for bit unchanged, and the next finite step trains on.

  Range. Finite gradients never make the state non-finite: where ``g²`` or a
  moment would overflow (``|g| > 1.8e19`` for bfloat16/float32) it saturates
  at the dtype's largest finite value, and the step is then no longer
  normalised (it grows like ``|g| / 1.8e19``) but still descends. float16
  (largest value 65504, smallest subnormal 6e-8) is narrow for Adam: ``v ≈ g²``
  saturates for gradients sustained above ``|g| ≈ 256``, and ``(1−b2)·g²``
  underflows below ``|g| ≈ 8e-3``, leaving ``eps`` to bound the step (which
  itself saturates at 65504). Keep float16 gradients in about ``[1e-2, 256]``
  (scale the loss: Adam does not depend on its scale but through ``eps``) or
  use bfloat16, whose range is float32's. An update that carries a param past
  the dtype's largest value overflows, as in ``optax.apply_updates``.

  Args:
    learning_rate: a scalar or a schedule; values below 0 act as 0 (so a
      schedule ending at 0 freezes params and low components bit for bit).
    b1, b2, eps, eps_root: Adam's hyperparameters.
    weight_decay: decoupled weight decay.
    mask: where to apply weight decay (as in ``optax.adamw``).
    mode: ``"light"``, ``"plus"`` or ``"full"``.
    nesterov: Nesterov momentum (as in ``optax.adamw``).
    track_metrics: record EDQ and lost fraction (see :func:`collage_optax.metrics`).

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.
  """
  if mode not in MODES:
    raise ValueError(f"collage_optax.adamw: unknown mode={mode!r}; use one of {', '.join(map(repr, MODES))}.")
  if not callable(learning_rate):
    _check_hyperparam("learning_rate", learning_rate)
  _check_hyperparam("b1", b1, upper=1.0)
  _check_hyperparam("b2", b2, upper=1.0)
  _check_hyperparam("eps", eps)
  _check_hyperparam("eps_root", eps_root)
  _check_hyperparam("weight_decay", weight_decay)
  return _guard(
      transform.scale_by_adam(
          b1, b2, eps, eps_root,
          mcf_mu=mode == "full", mcf_nu=mode in ("plus", "full"), nesterov=nesterov),
      _keep_dtypes(optax.add_decayed_weights(_float32_scalar(weight_decay), mask)),
      _scale_by_learning_rate(learning_rate),
      transform.compensate(track_metrics=track_metrics),
  )
