"""Determinism: same inputs give the same bits.

* One compiled program is bitwise reproducible: across runs, across separate
  compilations of the same step, and with donated buffers
  (``jax.jit(..., donate_argnums=...)``), for every mode, with Nesterov,
  schedules, metrics, and bfloat16/float16/float32 leaves.
* Eager and ``jit`` agree bit for bit wherever the arithmetic is explicitly
  rounded: ``compensate()`` (alone or after ``optax.sgd``), i.e. every MCF
  operation. Where plain float32 arithmetic is involved (Adam's moments without
  a low component, weight decay, Nesterov, float32 leaves) XLA's fusion under
  ``jit`` contracts ``a·b + c`` into a fused multiply-add and evaluates ``pow``
  in the bias corrections with a different kernel, so the last float32 bit can
  differ from the eager op-by-op result — ``optax.adamw`` itself is not
  eager-vs-jit reproducible on float32 params. A moment is optax's float32
  formula stored with one rounding, so at a storage tie that last bit moves
  the stored moment by one storage ulp. There the test bounds the moments'
  difference by one storage rounding per step and the params' by MCF
  precision plus what the moments' difference explains through Adam's formula.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import collage_optax as co
from collage_optax import formats
import reference

pytestmark = pytest.mark.faults

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
STEPS = 12


def _problem(seed: int = 0):
  rng = np.random.default_rng(seed)
  params = {"gain": jnp.ones((16,), BF16), "w": jnp.asarray(rng.normal(0, 0.5, (8, 8)), BF16),
            "h": jnp.asarray(rng.normal(0, 0.5, (8,)), F16), "b": jnp.asarray(rng.normal(0, 0.1, (8,)), F32)}
  grads = [{k: jnp.asarray(0.5 + rng.normal(0, 1, v.shape), v.dtype) for k, v in params.items()}
           for _ in range(STEPS)]
  return params, grads


def _fresh_step(tx, donate: bool):
  """A new function object each call, so ``jax.jit`` compiles it anew."""

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, u

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def _train(tx, step, params, grads):
  params = jax.tree.map(jnp.array, params)  # copies: donated buffers are consumed
  state = tx.init(params)
  out = []
  for g in grads:
    params, state, u = step(params, state, g)
    out.append(u)
  return params, state, out


CONFIGS = {
    "light": dict(mode="light"),
    "plus_nesterov": dict(mode="plus", nesterov=True),
    "full_metrics": dict(mode="full", track_metrics=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_runs_are_bit_identical_across_compilations_and_donation(name, tree_bits):
  params, grads = _problem()
  tx = co.adamw(optax.cosine_decay_schedule(1e-2, STEPS), weight_decay=1e-2, **CONFIGS[name])
  step = _fresh_step(tx, donate=False)
  first = tree_bits(_train(tx, step, params, grads))
  assert tree_bits(_train(tx, step, params, grads)) == first, "rerun of one compiled step differs"
  assert tree_bits(_train(tx, _fresh_step(tx, donate=False), params, grads)) == first, "recompiled step differs"
  assert tree_bits(_train(tx, _fresh_step(tx, donate=True), params, grads)) == first, "donated buffers change bits"


def _adversarial_updates(params, seed: int = 1):
  """Updates far below, near and far above each param's ulp, zero crossings, float32."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(STEPS):
    step = {}
    for k, p in params.items():
      p64 = np.asarray(p, np.float64)
      scale = [1e-6, 1e-3, 0.3, -2.0, 1e2][i % 5]
      u = scale * p64 * rng.uniform(0.5, 1.5, p64.shape) + rng.normal(0, 1e-4, p64.shape)
      step[k] = jnp.asarray(u, F32 if i % 2 else p.dtype)
    out.append(step)
  return out


@pytest.mark.parametrize("name,make", [
    ("compensate", lambda: co.compensate(track_metrics=True)),
    ("sgd_compensate", lambda: optax.chain(optax.sgd(0.5), co.compensate())),
])
def test_compensate_is_bit_identical_eager_and_jit(name, make, tree_bits):
  """Every MCF operation is explicitly rounded (``reduce_precision``), so for
  the bfloat16/float16 leaves the emitted updates, the params after
  ``apply_updates`` (fused into the same jitted step) and ``lo`` are the same
  bits eagerly and compiled. (The float32 leaf and the float32 metric sums are
  plain float32 arithmetic: FMA contraction and summation order. And optax's
  own bfloat16 arithmetic upstream, e.g. ``sgd(momentum=...)``'s ``g + β·t``,
  may skip an intermediate rounding under jit: XLA's excess precision.)"""
  params, _ = _problem()
  tx = make()
  updates = _adversarial_updates(params)
  low = ("gain", "w", "h")

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, u

  def run(step):
    p, s = jax.tree.map(jnp.array, params), tx.init(params)
    bits = []
    for g in updates:
      p, s, u = step(p, s, g)
      lo = s.lo if isinstance(s, co.CompensateState) else s[-1].lo
      bits.append(tree_bits(([p[k] for k in low], [lo[k] for k in low], [u[k] for k in low])))
    return bits, p

  (eager, p_eager), (jitted, p_jit) = run(step), run(jax.jit(step))
  assert jitted == eager
  np.testing.assert_allclose(np.asarray(p_jit["b"]), np.asarray(p_eager["b"]), rtol=1e-5)


def _moment64(store) -> np.ndarray:
  """A stored moment's value in float64: an ``mcf`` moment (packed uint32) from its two components."""
  if np.asarray(store).dtype == np.uint32:
    c = formats.mcf_components(store)
    return np.asarray(c.hi, np.float64) + np.asarray(c.lo, np.float64)
  return np.asarray(store, np.float64)


def _spacing(store):
  """The most one rounding into ``store``'s format can move a value ``x`` (float64, ``x >= 0``)."""
  kind = np.asarray(store).dtype
  if kind == np.uint32:  # mcf: hi + lo, ~16 bits (lo rounded at 2**-17 of the value, twice)
    return lambda x: 2.0**-16 * x + 2.0**-133
  if kind == reference.BF16:
    return lambda x: reference.ulp(x)
  return lambda x: 2.0**-21 * x  # float32: a few last-bit FMA differences


def _nesterov_direction64(m, v, g, t, b1=0.9, b2=0.999, eps=1e-8):
  """Adam's Nesterov direction (optax.scale_by_adam's formula) in float64 from stored moments, step ``t``."""
  m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
  return m_hat / (np.sqrt(v / (1 - b2**t)) + eps)


@pytest.mark.parametrize("mode", ["light", "plus", "full"])
def test_adamw_eager_and_jit_agree_to_mcf_precision(mode):
  """``hi + lo`` of the eager and the jitted run agree to MCF precision, plus
  what their stored moments' differences explain.

  The moments are optax's float32 formula, stored with one explicit rounding;
  jit contracts ``(1−b1)·g + b1·m`` into an FMA, so the float32 values differ
  in the last bit, and where the exact value is a tie of the storage (common:
  ``0.1·g + 0.9·m`` of bfloat16 numbers often is) the stored moments differ
  by one storage ulp (2**-8 relative for a bfloat16 moment). Adam's direction
  uses either the stored new moment or its value before the rounding
  (``b·old + (1−b)·g`` from the stored old one; the library picks per format),
  so a stored difference moves the param by ``lr_t·|Δd_t|``. The bound: MCF
  precision over the run (2**-14 of the largest value for bfloat16, 2**-18
  otherwise; it also covers the float32 last bits of the directions) plus
  ``Σ_t lr_t·|Δd_t|``, with ``Δd_t`` Adam's direction recomputed in float64
  from each run's moments, the larger of the two readings. A jitted step that
  used other moments than these, or any other drift, exceeds it.
  """
  params, grads = _problem()
  schedule = optax.cosine_decay_schedule(1e-2, STEPS)
  tx = co.adamw(schedule, weight_decay=1e-2, mode=mode, nesterov=True)

  def run(step):
    p, s = jax.tree.map(jnp.array, params), tx.init(params)
    moments = []
    for g in grads:
      u, s = step(g, s, p)
      p = optax.apply_updates(p, u)
      moments.append({k: (_moment64(s.mu[k]), _moment64(s.nu[k])) for k in params})
    return co.master_params(p, s, jnp.float32), moments

  (eager, m_eager), (jitted, m_jit) = run(tx.update), run(jax.jit(tx.update))
  state = tx.init(params)
  for k in params:
    # A new moment depends only on g and the old moment: the two runs' stored
    # moments differ by at most one storage rounding per step, decayed.
    for i, (store, decay) in enumerate(((state.mu[k], 0.9), (state.nu[k], 0.999))):
      spacing = _spacing(store)
      allowed = 0.0
      for t, (me, mj) in enumerate(zip(m_eager, m_jit)):
        x_e, x_j = me[k][i], mj[k][i]
        allowed = decay * allowed * (1 + 2.0**-20) + spacing(np.maximum(np.abs(x_e), np.abs(x_j)))
        assert np.all(np.abs(x_e - x_j) <= allowed), f"{k}: moment {i} at step {t} differs by more than its storage"
  for k in params:
    a, b = np.asarray(eager[k], np.float64), np.asarray(jitted[k], np.float64)
    moved = np.abs(a - np.asarray(params[k], np.float64)).max()
    assert moved > 1e-2
    explained = np.zeros_like(a)
    zero = (np.zeros_like(a), np.zeros_like(a))
    for t, (g, me, mj) in enumerate(zip(grads, m_eager, m_jit)):
      g64 = np.asarray(g[k], np.float64)
      before = lambda ms: ((0.9 * ms[0] + 0.1 * g64), (0.999 * ms[1] + 0.001 * g64 * g64))  # unrounded
      old_e, old_j = (zero, zero) if t == 0 else (m_eager[t - 1][k], m_jit[t - 1][k])
      stored = np.abs(_nesterov_direction64(*me[k], g64, t + 1) - _nesterov_direction64(*mj[k], g64, t + 1))
      unrounded = np.abs(_nesterov_direction64(*before(old_e), g64, t + 1)
                         - _nesterov_direction64(*before(old_j), g64, t + 1))
      explained += float(schedule(t)) * np.maximum(stored, unrounded)
    mcf = 2.0**-14 if params[k].dtype == BF16 else 2.0**-18
    bound = mcf * np.abs(a).max() + (1 + 2.0**-10) * explained
    worst = np.argmax(np.abs(a - b) - bound)
    assert np.all(np.abs(a - b) <= bound), (
        f"{k}: eager vs jit {np.abs(a - b).ravel()[worst]:.2e} > bound {bound.ravel()[worst]:.2e} "
        f"(moments explain {explained.ravel()[worst]:.2e})")
