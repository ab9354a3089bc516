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

__all__ = ["apply_gradients", "register"]

#: ``tx.update`` -> its fused ``(grads, state, params, **extra_args) -> (params, state)``.
_FUSED: weakref.WeakKeyDictionary[Callable[..., Any], Callable[..., Any]] = weakref.WeakKeyDictionary()


def register(tx: optax.GradientTransformation, fused: Callable[..., tuple[Any, Any]]) -> None:
  """Makes :func:`apply_gradients` call ``fused(grads, state, params, **extra_args)`` for ``tx``.

  ``fused`` must return ``(new params, new state)`` bit for bit equal to
  ``tx.update`` followed by ``optax.apply_updates``.
  """
  _FUSED[tx.update] = fused


def apply_gradients(
  tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any, **extra_args: Any
) -> tuple[Any, Any]:
  """``(new params, new opt_state)``: ``tx.update`` then ``optax.apply_updates``, in one step where ``tx`` has one.

  Equal, bit for bit, to::

    updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
    params = optax.apply_updates(params, updates)

  for every transformation. A :func:`collage_optax.adamw` (itself, not
  wrapped in a chain or ``optax.inject_hyperparams``) computes it as one
  step: on GPU and TPU its ``"compact"`` and ``"lean"`` leaves' kernels write
  the new params themselves instead of an update that ``apply_updates`` then
  reads back: compact moves 12.25 bytes per param instead of 18.25 (14.25 on
  TPU v5e), lean 16.25 instead of 22.25 (``benchmarks/accelerators.py``).
  Donate ``params`` and ``opt_state`` to the jitted step (``jax.jit(...,
  donate_argnums=...)``), so that the kernel writes them in place. Every
  other transformation, and every other leaf, takes the two calls above.

  Args:
    tx: any optax transformation.
    grads: the gradients (the updates ``tx.update`` receives).
    opt_state: ``tx``'s state.
    params: the params, which ``tx.update`` receives and the step replaces.
    **extra_args: passed to ``tx.update`` (an ``optax.GradientTransformationExtraArgs``).

  Returns:
    ``(new params, new opt_state)``.
  """
  fused = _FUSED.get(tx.update)
  if fused is not None:
    return fused(grads, opt_state, params, **extra_args)
  updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
  return optax.apply_updates(params, updates), opt_state
