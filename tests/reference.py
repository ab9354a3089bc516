"""Independent float64 references for the tests and benchmarks (numpy only).

Nothing here imports ``jax``, ``optax`` or ``collage_optax``: these are the
textbook formulas evaluated in float64, the yardstick the library is measured
against. (Fixtures are in ``conftest.py``, inputs in ``strategies.py``.)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


def bf16(x) -> np.ndarray:
  """``x`` rounded to bfloat16 (round to nearest even), as a bfloat16 array."""
  return np.asarray(x, np.float64).astype(BF16)


def ulp(x, dtype=BF16) -> np.ndarray:
  """Unit in the last place of ``x`` in ``dtype`` (float64 result).

  ``ulp(x) = 2**(e - p + 1)`` for ``2**e <= |x| < 2**(e+1)`` and ``p``
  significant bits, never below the smallest subnormal spacing.
  """
  info = ml_dtypes.finfo(dtype) if dtype == BF16 else np.finfo(dtype)
  x = np.abs(np.asarray(x, np.float64))
  tiny = float(info.smallest_normal)
  e = np.floor(np.log2(np.maximum(x, tiny)))
  return np.exp2(e - info.nmant)


def ulp32(x) -> np.ndarray:
  """Unit in the last place of ``x`` in float32 (float64 result)."""
  return ulp(x, np.float32)


class AdamWState(NamedTuple):
  count: int
  mu: np.ndarray
  nu: np.ndarray


def adamw_init(params: np.ndarray) -> AdamWState:
  z = np.zeros_like(np.asarray(params, np.float64))
  return AdamWState(0, z, z.copy())


def adamw_step(
    params: np.ndarray,
    grad: np.ndarray,
    state: AdamWState,
    lr: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_mask: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, AdamWState]:
  """One AdamW step in float64 (Kingma & Ba 2015; Loshchilov & Hutter 2019).

  ``m ← b1·m + (1−b1)·g``, ``v ← b2·v + (1−b2)·g²``, ``t ← t+1``,
  ``θ ← θ − lr·(m/(1−b1ᵗ) / (√(v/(1−b2ᵗ)) + eps) + wd·θ)`` with ``wd·θ`` only
  where ``decay_mask`` is true (everywhere when it is ``None``): the
  convention of ``optax.adamw`` (eps outside the square root, decay added to
  the Adam direction before the learning rate).
  """
  p = np.asarray(params, np.float64)
  g = np.asarray(grad, np.float64)
  t = state.count + 1
  mu = b1 * state.mu + (1 - b1) * g
  nu = b2 * state.nu + (1 - b2) * g * g
  u = (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
  decay = weight_decay * p
  if decay_mask is not None:
    decay = np.where(decay_mask, decay, 0.0)
  return p - lr * (u + decay), AdamWState(t, mu, nu)


def adamw_trajectory(
    params0: np.ndarray,
    grads: np.ndarray,
    lrs: np.ndarray,
    **kwargs,
) -> np.ndarray:
  """Final params of AdamW (float64) over ``grads[t]`` with learning rate ``lrs[t]``."""
  p = np.asarray(params0, np.float64)
  state = adamw_init(p)
  for g, lr in zip(grads, lrs):
    p, state = adamw_step(p, g, state, float(lr), **kwargs)
  return p


def ema_trajectory(targets: np.ndarray, decay: float) -> np.ndarray:
  """``v_t = decay·v_{t−1} + (1−decay)·x_t`` from ``v_0 = 0``, in float64; all ``v_t``."""
  v, out = np.zeros_like(np.asarray(targets[0], np.float64)), []
  for x in targets:
    v = decay * v + (1 - decay) * np.asarray(x, np.float64)
    out.append(v)
  return np.stack(out)


def cosine_schedule(steps: int, peak: float, warmup: int, final_fraction: float) -> np.ndarray:
  """Linear warmup from 0 to ``peak`` over ``warmup`` steps, then cosine decay to
  ``final_fraction·peak`` at ``steps`` (float64, one value per step)."""
  t = np.arange(steps, dtype=np.float64)
  warm = peak * t / max(warmup, 1)
  frac = np.clip((t - warmup) / max(steps - warmup, 1), 0.0, 1.0)
  cos = final_fraction * peak + (1 - final_fraction) * peak * 0.5 * (1 + np.cos(np.pi * frac))
  return np.where(t < warmup, warm, cos)



def grouped(y: np.ndarray, group: int = 32) -> np.ndarray:
  """``y`` as ``(..., groups, group)`` along its last axis, zero-padded (the grouped formats' layout)."""
  y = y.reshape(y.shape or (1,))
  pad = -y.shape[-1] % group
  y = np.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, pad)])
  return y.reshape(*y.shape[:-1], -1, group)


def per_element(s: np.ndarray, shape, group: int = 32) -> np.ndarray:
  """A per-group array (``(..., groups)``) repeated onto the elements of ``shape``."""
  n = shape[-1] if shape else 1
  return np.repeat(s, group, axis=-1)[..., :n].reshape(shape)
