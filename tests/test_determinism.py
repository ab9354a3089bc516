"""Determinism (issue 7): same inputs give the same bits.

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
  eager-vs-jit reproducible on float32 params. There the test bounds the
  difference to MCF precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import collage_optax as co

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


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


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
  return _bits((params, state, out))


CONFIGS = {
    "light": dict(mode="light"),
    "plus_nesterov": dict(mode="plus", nesterov=True),
    "full_metrics": dict(mode="full", track_metrics=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_runs_are_bit_identical_across_compilations_and_donation(name):
  params, grads = _problem()
  tx = co.adamw(optax.cosine_decay_schedule(1e-2, STEPS), weight_decay=1e-2, **CONFIGS[name])
  step = _fresh_step(tx, donate=False)
  first = _train(tx, step, params, grads)
  assert _train(tx, step, params, grads) == first, "rerun of one compiled step differs"
  assert _train(tx, _fresh_step(tx, donate=False), params, grads) == first, "recompiled step differs"
  assert _train(tx, _fresh_step(tx, donate=True), params, grads) == first, "donated buffers change bits"


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
def test_compensate_is_bit_identical_eager_and_jit(name, make):
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
      bits.append(_bits(([p[k] for k in low], [lo[k] for k in low], [u[k] for k in low])))
    return bits, p

  (eager, p_eager), (jitted, p_jit) = run(step), run(jax.jit(step))
  assert jitted == eager
  np.testing.assert_allclose(np.asarray(p_jit["b"]), np.asarray(p_eager["b"]), rtol=1e-5)


@pytest.mark.parametrize("mode", ["light", "plus", "full"])
def test_adamw_eager_and_jit_agree_to_mcf_precision(mode):
  """``hi + lo`` of the eager and the jitted run agree to within a few MCF ulps
  (float32 FMA contraction and ``pow`` kernels differ in the last float32 bit)."""
  params, grads = _problem()
  tx = co.adamw(optax.cosine_decay_schedule(1e-2, STEPS), weight_decay=1e-2, mode=mode, nesterov=True)

  def run(step):
    p, s = jax.tree.map(jnp.array, params), tx.init(params)
    for g in grads:
      u, s = step(g, s, p)
      p = optax.apply_updates(p, u)
    return co.master_params(p, s, jnp.float32)

  eager, jitted = run(tx.update), run(jax.jit(tx.update))
  for k in params:
    a, b = np.asarray(eager[k], np.float64), np.asarray(jitted[k], np.float64)
    moved = np.abs(a - np.asarray(params[k], np.float64)).max()
    assert moved > 1e-2
    tol = 2.0**-14 * np.abs(a).max() if params[k].dtype == BF16 else 2.0**-18 * np.abs(a).max()
    assert np.abs(a - b).max() <= tol, f"{k}: eager vs jit {np.abs(a - b).max():.2e} > {tol:.2e}"
