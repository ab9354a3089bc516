"""``collage_optax.apply_gradients``: ``tx.update`` and ``optax.apply_updates`` as one step.

A transformation's step ends in two passes over the params when the update
is computed by a kernel XLA cannot fuse with its consumer: the kernel writes
the update, then ``optax.apply_updates`` reads it and the params again and
writes the params (6 more bytes per bfloat16 param). ``adamw``'s compact and
lean leaves are such kernels on GPU and TPU (one Pallas call each); given the
params to overwrite, the kernel writes the new params itself.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import optax

__all__ = ["apply_gradients", "chain"]

#: ``tx.update`` -> its fused ``(grads, state, params, **extra_args) -> (params, state)``.
_FUSED: weakref.WeakKeyDictionary[Callable[..., Any], Callable[..., Any]] = weakref.WeakKeyDictionary()


def register(tx: optax.GradientTransformation, fused: Callable[..., tuple[Any, Any]]) -> None:
  """Makes :func:`apply_gradients` call ``fused(grads, state, params, **extra_args)`` for ``tx``.

  ``fused`` must return ``(new params, new state)`` bit for bit equal to
  ``tx.update`` followed by ``optax.apply_updates``.
  """
  _FUSED[tx.update] = fused


def fused_step(tx: optax.GradientTransformation) -> Callable[..., tuple[Any, Any]] | None:
  """``tx``'s fused step, or ``None`` (an update function that cannot be a weak key has none)."""
  try:
    return _FUSED.get(tx.update)
  except TypeError:  # unhashable, or not weakly referenceable
    return None


def apply_gradients(
  tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any, /, **extra_args: Any
) -> tuple[Any, Any]:
  """``(new params, new opt_state)``: ``tx.update`` then ``optax.apply_updates``, in one step where ``tx`` has one.

  Equal, bit for bit, to::

    updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
    params = optax.apply_updates(params, updates)

  for every transformation. A :func:`collage_optax.adamw`, or a
  :func:`collage_optax.chain` ending in one, computes it as one step: on GPU
  and TPU the kernels of its ``"compact"`` and ``"lean"`` leaves write the
  new params themselves instead of an update that ``apply_updates`` then
  reads back. Compact then moves 12.25 bytes per param instead of 18.25
  (14.25 on TPU v5e), lean 16.25 instead of 22.25 (18.25)
  (``benchmarks/accelerators.py``, ``benchmarks/pallas_compact.py``).
  Donate ``params`` and ``opt_state`` to the jitted step (``jax.jit(...,
  donate_argnums=...)``), so that the kernel writes them in place. Every
  other transformation (``optax.chain``, ``optax.inject_hyperparams``,
  ``optax.MultiSteps``, … around an ``adamw``), and every other leaf, takes
  the two calls above.

  Args:
    tx: any optax transformation.
    grads: the gradients (the updates ``tx.update`` receives).
    opt_state: ``tx``'s state.
    params: the params, which ``tx.update`` receives and the step replaces.
    **extra_args: passed to ``tx.update`` (an ``optax.GradientTransformationExtraArgs``).

  Returns:
    ``(new params, new opt_state)``.
  """
  fused = fused_step(tx)
  if fused is not None:
    return fused(grads, opt_state, params, **extra_args)
  updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
  return optax.apply_updates(params, updates), opt_state


def chain(*transforms: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(*transforms)``, whose :func:`apply_gradients` is one step when the last link has one.

  The same transformation as ``optax.chain`` (its state is the tuple of the
  links' states, its ``update`` is optax's); :func:`apply_gradients` runs the
  links but the last one's ``update`` in order, then the last link's fused
  step. For the usual recipe::

    tx = collage_optax.chain(optax.clip_by_global_norm(1.0), collage_optax.adamw(3e-4, mode="compact"))
  """
  tx = optax.chain(*transforms)
  if not transforms:
    return tx
  head = [optax.with_extra_args_support(t) for t in transforms[:-1]]
  fused_last = fused_step(transforms[-1])
  if fused_last is None:
    return tx

  def fused(grads, state, params=None, **extra_args):
    if len(state) != len(transforms):
      raise ValueError("collage_optax.chain: the state has to have one entry per link; call init first.")
    updates, new_state = grads, []
    for t, s in zip(head, state):
      updates, s = t.update(updates, s, params, **extra_args)
      new_state.append(s)
    params, s = fused_last(updates, state[-1], params, **extra_args)
    return params, (*new_state, s)

  register(tx, fused)
  return tx
