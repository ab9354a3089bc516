"""``scale_by_adam`` with every pair of moment formats, step by step against float64.

Each step is checked on its own, from the state it starts from: the new
stored moments against ``m ← b1·m + (1 − b1)·g``, ``v ← b2·v + (1 − b2)·g²``
computed in float64 from the decoded old moments, within the format's
rounding; the emitted direction against ``m̂ / (√v̂ + eps)`` in float64 from the
moments the step uses (the stored ones; for the 8-bit formats the values
before their rounding), within the bfloat16 rounding of the output. Bounds
come from the formats (one rounding to 8 significant bits for ``bf16``,
``2**-8`` relative; two roundings for the two-bfloat16 ``mcf``, ``2**-16``;
``q8_bound`` of the group's largest value for ``q8``) and from float32
arithmetic (a few ``2**-24`` of the terms).
"""

from __future__ import annotations

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import collage_optax as co
from collage_optax import formats

B1, B2, EPS = 0.9, 0.999, 1e-8
MU = ("bf16", "mcf", "f32", "q8")
NU = ("bf16", "mcf", "f32", "exact", "q8")
F32_ARITH = 2.0**-21  # float32 arithmetic on a few terms, relative to their magnitudes
GROUP = 32


def _decode(store) -> np.ndarray:
  return np.asarray(formats.moment_format_of(store).decode(store), np.float64)


def _group_max(x: np.ndarray) -> np.ndarray:
  """Per element, the largest |x| of its group of 32 along the last axis (bfloat16-rounded up by 2**-8)."""
  n = x.shape[-1]
  pad = -n % GROUP
  g = np.pad(np.abs(x), [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], -1, GROUP)
  s = np.repeat(g.max(axis=-1), GROUP, axis=-1)[..., :n]
  return s * (1 + 2.0**-8)


def _moment_bound(name: str, second: bool, exact: np.ndarray, terms: np.ndarray) -> np.ndarray:
  """How far a stored moment may be from its float64 value ``exact`` (``terms``: |b·old| + |(1 − b)·x|)."""
  arith = F32_ARITH * terms
  if name == "bf16":
    return 2.0**-8 * np.abs(exact) + arith
  if name == "mcf":
    return 2.0**-16 * np.abs(exact) + arith
  if name in ("f32", "exact"):
    return arith
  if not second:
    return formats.q8_bound(False) * _group_max(exact) + arith
  root = np.sqrt(np.maximum(exact, 0))
  r_err = formats.q8_bound(True) * _group_max(root)
  return 2 * root * r_err + r_err**2 + arith


def _direction_interval(m, v, dm, dv, t):
  """The float64 direction over ``m ± dm``, ``v ± dv`` (it is monotone in each): ``(low, high)``."""
  bc1, bc2 = 1 - B1**t, 1 - B2**t
  corners = [(mm / bc1) / (np.sqrt(np.maximum(vv, 0) / bc2) + EPS) for mm in (m - dm, m + dm) for vv in (v - dv, v + dv)]
  return np.minimum.reduce(corners), np.maximum.reduce(corners)


grads_strategy = st.lists(
  st.tuples(st.integers(0, 2**31 - 1), st.floats(-9, 2)),  # (seed, log10 of the gradient scale)
  min_size=1,
  max_size=4,
)


@pytest.mark.parametrize("mu,nu", list(itertools.product(MU, NU)))
@settings(max_examples=5, deadline=None)
@given(steps=grads_strategy)
def test_each_step_against_float64(mu, nu, steps):
  params = {"w": jnp.zeros((3, 40), jnp.bfloat16)}
  tx = co.scale_by_adam(B1, B2, EPS, mu_format=mu, nu_format=nu)
  state = tx.init(params)
  update = jax.jit(tx.update)
  coarse = {"mu": formats.moment_format(mu).coarse, "nu": formats.moment_format(nu, second=True).coarse}
  for t, (seed, log_scale) in enumerate(steps, start=1):
    rng = np.random.default_rng(seed)
    g = jnp.asarray(rng.standard_normal((3, 40)) * 10.0**log_scale, jnp.bfloat16)
    g64 = np.asarray(g, np.float64)
    m_old, v_old = _decode(state.mu["w"]), _decode(state.nu["w"])
    u, state = update({"w": g}, state)
    assert u["w"].dtype == jnp.bfloat16 and int(state.count) == t
    m_want = B1 * m_old + (1 - B1) * g64
    v_want = B2 * v_old + (1 - B2) * g64 * g64
    m_terms = np.abs(B1 * m_old) + np.abs((1 - B1) * g64)
    v_terms = np.abs(B2 * v_old) + np.abs((1 - B2) * g64 * g64)
    m_new, v_new = _decode(state.mu["w"]), _decode(state.nu["w"])
    dm = _moment_bound(mu, False, m_want, m_terms)
    dv = _moment_bound(nu, True, v_want, v_terms)
    assert np.all(np.abs(m_new - m_want) <= dm), (mu, t, np.max(np.abs(m_new - m_want) - dm))
    assert np.all(np.abs(v_new - v_want) <= dv), (nu, t, np.max(np.abs(v_new - v_want) - dv))
    # The moments the step used: the stored ones, or for an 8-bit format the value before its rounding.
    m_used, dm_used = (m_want, F32_ARITH * m_terms) if coarse["mu"] else (m_new, F32_ARITH * np.abs(m_new))
    v_used, dv_used = (v_want, F32_ARITH * v_terms) if coarse["nu"] else (v_new, F32_ARITH * np.abs(v_new))
    low, high = _direction_interval(m_used, v_used, dm_used, dv_used, t)
    got = np.asarray(u["w"], np.float64)
    slack = 2.0**-8 * np.maximum(np.abs(low), np.abs(high)) + 1e-30  # the bfloat16 rounding of the output
    assert np.all((got >= low - slack) & (got <= high + slack)), (mu, nu, t)


def test_q8_m_with_an_exact_v_is_the_float32_adam_of_its_moments():
  """The issue's pair: a ``q8`` first moment and an ``exact`` (float32) second one, over 50 steps,
  compared with optax's float32 ``scale_by_adam`` within the 8-bit first moment's error."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.zeros((4, 64), jnp.bfloat16)}
  ours, ref = co.scale_by_adam(mu_format="q8", nu_format="exact"), optax.scale_by_adam()
  s, r = ours.init(params), ref.init(jax.tree.map(lambda p: p.astype(jnp.float32), params))
  for _ in range(50):
    g = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
    u, s = ours.update({"w": g}, s)
    _, r = ref.update({"w": g.astype(jnp.float32)}, r)
    v_ours, v_ref = _decode(s.nu["w"]), np.asarray(r.nu["w"], np.float64)
    # Only m is 8-bit: v sees the same gradients in float32 arithmetic.
    assert np.allclose(v_ours, v_ref, rtol=2.0**-20, atol=0)
    m_ours, m_ref = _decode(s.mu["w"]), np.asarray(r.mu["w"], np.float64)
    # Each step re-quantises m: the errors add up, at most one q8 bound of the group maximum per step.
    assert np.all(np.abs(m_ours - m_ref) <= 50 * formats.q8_bound(False) * _group_max(m_ref) + 1e-6)


@pytest.mark.parametrize("old,new", [({"mcf_nu": True}, {"nu_format": "mcf"}), ({"mcf_nu": False}, {"nu_format": "bf16"}),
                                     ({"mcf_mu": True}, {"mu_format": "mcf"})])
def test_deprecated_booleans_warn_and_mean_the_formats(old, new):
  params = {"w": jnp.linspace(-1, 1, 64, dtype=jnp.bfloat16).reshape(2, 32)}
  g = {"w": jnp.linspace(0.5, -0.25, 64, dtype=jnp.bfloat16).reshape(2, 32)}
  with pytest.warns(DeprecationWarning, match="deprecated"):
    tx_old = co.scale_by_adam(**old)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx_new = co.scale_by_adam(**new)
  (u1, s1), (u2, s2) = (tx.update(g, tx.init(params)) for tx in (tx_old, tx_new))
  for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
    assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_compensate_format_keyword_is_deprecated():
  with pytest.warns(DeprecationWarning, match="param_format"):
    tx = co.compensate(format="exact")
  params = {"w": jnp.ones((4,), jnp.bfloat16)}
  assert tx.init(params).lo["w"].dtype == jnp.int16


def test_float32_gradients_of_bfloat16_params_without_params():
  """Without ``params``, the state tells which leaves are bfloat16: float32 gradients work."""
  params = {"w": jnp.zeros((2, 32), jnp.bfloat16), "b": jnp.zeros((32,), jnp.float32)}
  for mu, nu in itertools.product(MU, NU):
    tx = co.scale_by_adam(mu_format=mu, nu_format=nu)
    grads = {"w": jnp.ones((2, 32), jnp.float32), "b": jnp.ones((32,), jnp.float32)}
    u, s = tx.update(grads, tx.init(params))
    u_with, _ = tx.update(grads, tx.init(params), params)
    assert u["w"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(u_with["w"]))
    np.testing.assert_array_equal(np.asarray(u["b"]), np.asarray(u_with["b"]))
