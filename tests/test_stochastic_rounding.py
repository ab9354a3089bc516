"""``collage_optax.stochastic_rounding``: the update added with unbiased random rounding.

References: float64 NumPy (the exact expectation ``x``) and ml_dtypes (the two
neighbours of ``x`` in bfloat16/float16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import collage_optax as co
from collage_optax.transform import stochastic_round

NP = {jnp.dtype(jnp.bfloat16): ml_dtypes.bfloat16, jnp.dtype(jnp.float16): np.float16}


def _neighbours(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
  """The two ``dtype`` values around float32 ``x`` (equal where ``x`` is one), in float64."""
  npdt = NP[jnp.dtype(dtype)]
  r = x.astype(npdt)
  other = np.nextafter(r, np.where(x.astype(np.float64) > r.astype(np.float64), np.inf, -np.inf).astype(npdt))
  exact = r.astype(np.float64) == x.astype(np.float64)
  return r.astype(np.float64), np.where(exact, r.astype(np.float64), other.astype(np.float64))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-60000.0, 60000.0, width=32).filter(lambda v: v == 0 or abs(v) >= 2.0**-100),
                min_size=1, max_size=16),
       st.sampled_from([jnp.bfloat16, jnp.float16]))
def test_the_mean_over_an_even_grid_of_variates_is_x(values, dtype):
  """Over K evenly spaced uniform variates the fraction rounded up is ceil(p·K)/K, so the mean
  is ``x`` within ``|n − r|/K``, exactly: checked in float64 against ml_dtypes' neighbours.
  Every result is one of the two neighbours."""
  x = np.asarray(values, np.float32)
  k = 4096
  bits = (np.arange(k, dtype=np.uint32) << 20)[:, None] * np.ones_like(x, np.uint32)[None]  # u = i/K
  xs = jnp.broadcast_to(jnp.asarray(x), bits.shape)
  got = np.asarray(jax.jit(stochastic_round, static_argnums=1)(xs, dtype, jnp.asarray(bits)), np.float64)
  lo, hi = _neighbours(x, dtype)
  assert np.all((got == lo) | (got == hi)), "a result that is neither neighbour"
  gap = np.abs(hi - lo)
  assert np.all(np.abs(got.mean(axis=0) - x.astype(np.float64)) <= gap / k + 1e-300)


def test_specials_are_kept_and_finite_values_never_overflow():
  x = jnp.asarray([np.inf, -np.inf, np.nan, 0.0, -0.0, 1.0, 3.3895e38, -3.3895e38], jnp.float32)
  bits = jnp.full(x.shape, 0xFFFFFFFF, jnp.uint32)  # u just below 1: round up wherever possible
  got = np.asarray(stochastic_round(x, jnp.bfloat16, bits), np.float64)
  assert got[0] == np.inf and got[1] == -np.inf and np.isnan(got[2])
  assert got[3] == 0 and got[4] == 0 and np.signbit(got[4]) and got[5] == 1.0
  big = float(jnp.finfo(jnp.bfloat16).max)
  assert np.all(np.abs(got[6:]) == big)
  # Beyond the dtype's range (float16: 65504) a finite x stays at the largest value.
  f16 = np.asarray(stochastic_round(jnp.asarray([7e4, -7e4, 65504.0], jnp.float32), jnp.float16,
                                    jnp.zeros(3, jnp.uint32)), np.float64)
  assert np.array_equal(np.abs(f16), [65504.0] * 3)


def _steps(tx):
  return jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_tiny_updates_accumulate_on_average(dtype):
  """1000 steps of +1e-4 (an eightieth of a bf16 ulp at 1.0) on 4096 params at 1.0: the mean
  param is 1 + 1000·u within 5 standard errors of the binomial spread, in float64; with plain
  ``apply_updates`` every param stays at 1.0 (round to nearest loses each step)."""
  n, steps = 4096, 1000
  p0 = jnp.ones(n, dtype)
  g = jnp.full(n, -1e-4, dtype)
  u = float(np.asarray(jnp.asarray(-1.0, dtype) * g, np.float64)[0])
  ours, plain = _steps(optax.chain(optax.sgd(1.0), co.stochastic_rounding())), _steps(optax.sgd(1.0))
  p, s = p0, optax.chain(optax.sgd(1.0), co.stochastic_rounding()).init(p0)
  q, t = p0, optax.sgd(1.0).init(p0)
  for _ in range(steps):
    p, s = ours(p, s, g)
    q, t = plain(q, t, g)
  assert p.dtype == dtype
  got = np.asarray(p, np.float64)
  ulp = float(np.spacing(NP[jnp.dtype(dtype)](1.0)))
  prob = u / ulp
  se = ulp * np.sqrt(steps * prob * (1 - prob) / n)
  assert abs(got.mean() - (1.0 + steps * u)) < 5 * se, (got.mean(), 1.0 + steps * u, se)
  assert np.all(np.asarray(q, np.float64) == 1.0)


def test_reproducible_from_the_seed_and_resumable_from_the_state():
  p0 = {"w": jnp.ones((8, 16), jnp.bfloat16), "b": jnp.zeros(16, jnp.float32)}
  g = {"w": jnp.full((8, 16), 3e-4, jnp.bfloat16), "b": jnp.full(16, 1e-3, jnp.float32)}

  def run(seed, n, p=p0, state=None):
    tx = optax.chain(optax.sgd(1.0), co.stochastic_rounding(seed))
    state = tx.init(p) if state is None else state
    step = _steps(tx)
    for _ in range(n):
      p, state = step(p, state, g)
    return p, state

  a, _ = run(0, 10)
  b, _ = run(0, 10)
  c, _ = run(1, 10)
  mid_p, mid_s = run(0, 4)
  d, _ = run(0, 6, mid_p, mid_s)
  assert np.array_equal(np.asarray(a["w"]), np.asarray(b["w"]))
  assert not np.array_equal(np.asarray(a["w"]), np.asarray(c["w"]))
  assert np.array_equal(np.asarray(a["w"]), np.asarray(d["w"]))
  # float32 leaves pass through: plain SGD.
  assert np.allclose(np.asarray(a["b"]), -10 * 1e-3, rtol=1e-6)


def test_clear_errors():
  tx = co.stochastic_rounding()
  p = {"w": jnp.ones(3, jnp.bfloat16)}
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update(p, tx.init(p))
  with pytest.raises(TypeError, match="StochasticRoundingState"):
    tx.update(p, optax.EmptyState(), p)
  with pytest.raises(ValueError, match="different tree structures"):
    tx.update({"v": jnp.ones(3, jnp.bfloat16)}, tx.init(p), p)
  with pytest.raises(ValueError, match=r"\['w'\]"):  # a (2, 3) update would broadcast into the (3,) param
    tx.update({"w": jnp.ones((2, 3), jnp.bfloat16)}, tx.init(p), p)
