"""``collage_optax.adamw``: a drop-in for ``optax.adamw`` on bfloat16 params."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics

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
  Zero stays a Python 0 (optax then skips the link); arrays pass unchanged.
  """
  if callable(value):
    return lambda count: jnp.asarray(value(count), jnp.float32)
  if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0:
    return np.float32(value)
  return value


def _scale_by_learning_rate(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """``optax.scale_by_learning_rate`` with ``−lr·u`` formed in float32.

  optax casts the learning rate to the updates' dtype (a schedule's value
  explicitly, a Python float by weak typing): in bfloat16 ``lr = 3e-4`` is
  2.9948e-4, every step 0.17% short, which no compensation can undo. Here the
  learning rate stays float32 and the product is rounded once to the update's
  dtype. The state is optax's (``ScaleByScheduleState`` for a schedule).
  """

  def scale(lr, updates):
    def leaf(u):
      wide = jnp.promote_types(u.dtype, jnp.float32)
      return (u.astype(wide) * -jnp.asarray(lr, wide)).astype(u.dtype)
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

  Args:
    learning_rate: a scalar or a schedule.
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
  return optax.chain(
      transform.scale_by_adam(
          b1, b2, eps, eps_root,
          mcf_mu=mode == "full", mcf_nu=mode in ("plus", "full"), nesterov=nesterov),
      _keep_dtypes(optax.add_decayed_weights(_float32_scalar(weight_decay), mask)),
      _scale_by_learning_rate(learning_rate),
      transform.compensate(track_metrics=track_metrics),
  )
