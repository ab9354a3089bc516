"""EDQ (effective descent quality, Yu et al. 2024) and lost fraction, checked against numpy/ml_dtypes.

``edq = <Δθ_eff, u> / ||u||²`` and ``lost_fraction = #(u ≠ 0 and Δθ_eff = 0) /
#(u ≠ 0)``, globally and per top-level subtree. The references here compute
``Δθ_eff`` independently: for plain ``apply_updates`` as ``bf16(θ + u) − θ``
(float64 sum, ml_dtypes rounding), for ``compensate`` as the change of
``θ + lo`` read back from the params and the state, in float64.
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import collage_optax as co
from collage_optax import alias as co_alias
import reference

BF16 = np.dtype(ml_dtypes.bfloat16)
N = 32  # elements per subtree


def _np_metrics(delta: dict, u: dict) -> dict[str, float]:
  """The metrics (edq, lost_fraction) from float64 ``Δθ_eff`` and ``u``, keyed like ``co.metrics``."""

  def ratios(d, v):
    d, v = np.concatenate([np.ravel(x) for x in d]), np.concatenate([np.ravel(x) for x in v])
    uu, moved = float(np.sum(v * v)), v != 0
    edq = float(np.sum(d * v)) / uu if uu > 0 else 1.0
    lost = float(np.sum(moved & (d == 0))) / np.sum(moved) if np.any(moved) else 0.0
    return edq, lost

  out = {}
  out["edq"], out["lost_fraction"] = ratios(list(delta.values()), list(u.values()))
  for k in delta:
    out[f"edq/{k}"], out[f"lost_fraction/{k}"] = ratios([delta[k]], [u[k]])
  return out


def _f64(x) -> np.ndarray:
  return np.asarray(x).astype(np.float64)


def _bf16_landing(theta: dict, u: dict) -> dict:
  """``Δθ_eff`` of plain ``apply_updates`` on bf16 params: ``bf16(θ + u) − θ``."""
  return {k: (_f64(theta[k]) + _f64(u[k])).astype(BF16).astype(np.float64) - _f64(theta[k]) for k in theta}


def _assert_metrics_close(got: dict, want: dict, tol: float = 1e-4):
  assert set(got) == set(want)
  for k in want:
    assert type(got[k]) is float, (k, type(got[k]))
    assert got[k] == pytest.approx(want[k], rel=tol, abs=tol), (k, got[k], want[k])


_measure_step = jax.jit(co.measure_precision().update)
_compensate_tx = co.compensate(track_metrics=True)
_compensate_step = jax.jit(_compensate_tx.update)


# ---------------------------------------------------------------------------
# Updates far below bf16's ulp: params 1.0, updates ~1e-4.
# ---------------------------------------------------------------------------


def _tiny_updates(steps: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  mag = rng.uniform(0.5, 1.5, (steps, 2, N)) * rng.choice([-1.0, 1.0], (steps, 2, N))
  return [{"gain": jnp.asarray(1e-4 * m[0], jnp.bfloat16), "w": jnp.asarray(3e-4 * m[1], jnp.bfloat16)}
          for m in mag]


def test_compensate_keeps_tiny_updates_and_measure_precision_loses_them():
  params0 = {"gain": jnp.ones(N, jnp.bfloat16), "w": jnp.ones(N, jnp.bfloat16)}
  # With compensation.
  params, state = params0, _compensate_tx.init(params0)
  for u in _tiny_updates(30):
    emitted, new_state = _compensate_step(u, state, params)
    new_params = optax.apply_updates(params, emitted)
    delta = {k: (_f64(new_params[k]) + _f64(new_state.lo[k])) - (_f64(params[k]) + _f64(state.lo[k]))
             for k in params}
    u64 = {k: _f64(v) for k, v in u.items()}
    got, want = co.metrics(new_state), _np_metrics(delta, u64)
    _assert_metrics_close(got, want)
    assert abs(got["edq"] - 1.0) < 4e-2 and got["lost_fraction"] == 0.0, got  # MCF floor: ~16 significant bits
    params, state = new_params, new_state
  # Without: the same updates, applied plainly to bf16 params of 1.0, all vanish.
  params, state = params0, co.measure_precision().init(params0)
  for u in _tiny_updates(30):
    out, state = _measure_step(u, state, params)
    assert out is not u and all(np.array_equal(np.asarray(out[k]), np.asarray(u[k])) for k in u)
    want = _np_metrics(_bf16_landing(params, u), {k: _f64(v) for k, v in u.items()})
    got = co.metrics(state)
    _assert_metrics_close(got, want)
    assert got["edq"] == 0.0 and got["lost_fraction"] == 1.0, got
    params = optax.apply_updates(params, out)


def test_adamw_metrics_with_and_without_compensation_on_the_same_steps():
  """co.adamw(track_metrics) vs optax.adamw + measure_precision(), lr 1e-4, params 1.0."""
  params0 = {"gain": jnp.ones(N, jnp.bfloat16), "w": jnp.ones((4, N), jnp.bfloat16)}
  # Each element keeps its sign, so Adam's steps are all about ±lr = ±1e-4.
  rng = np.random.default_rng(1)
  signs = jax.tree.map(lambda p: rng.choice([-1.0, 1.0], p.shape), params0)
  grads = [jax.tree.map(lambda p, s: jnp.asarray(s * rng.uniform(0.5, 2.0, p.shape), jnp.bfloat16), params0, signs)
           for _ in range(20)]
  runs = {}
  for name, tx in [("collage", co.adamw(1e-4, track_metrics=True)),
                   ("plain", optax.chain(optax.adamw(1e-4), co.measure_precision()))]:
    params, state, history = params0, tx.init(params0), []
    step = jax.jit(tx.update)
    for g in grads:
      u, state = step(g, state, params)
      params = optax.apply_updates(params, u)
      history.append(co.metrics(state))
    runs[name] = history
  # MCF floor (~16 significant bits): the low component of θ ∈ [1, 2) is rounded to
  # ≤ 2⁻¹⁷ ≈ 7.6e-6 per step, up to ~8% of a 1e-4 step; over 32+ elements EDQ
  # stays within a few percent of 1. Plain bf16 keeps nothing.
  for ours, plain in zip(runs["collage"], runs["plain"]):
    for key in ("", "/gain", "/w"):
      assert abs(ours["edq" + key] - 1.0) < 4e-2 and ours["lost_fraction" + key] == 0.0, ours
      assert plain["edq" + key] == 0.0 and plain["lost_fraction" + key] == 1.0, plain


@pytest.mark.parametrize("mode,tol", [("light", 4e-2), ("plus", 4e-2), ("full", 4e-2), ("exact", 1e-3), ("compact", 0.15)])
def test_adamw_metrics_of_every_mode(mode, tol):
  """EDQ and lost fraction for every preset, lr 1e-4 at params 1.0, against their residual's
  resolution at |θ| ∈ [1, 2): mcf rounds lo to 2⁻¹⁷ (≤ 8% of a step), exact keeps the float32
  (2⁻²³: 0.1%), compact steps of ulp(θ)/254 = 3.1e-5 (≤ 15% of a step, averaging over elements);
  no step is lost in any of them. Measured with the printout."""
  params0 = {"gain": jnp.ones(N, jnp.bfloat16), "w": jnp.ones((4, N), jnp.bfloat16)}
  rng = np.random.default_rng(1)
  signs = jax.tree.map(lambda p: rng.choice([-1.0, 1.0], p.shape), params0)
  tx = co.adamw(1e-4, mode=mode, track_metrics=True)
  params, state = params0, tx.init(params0)
  step = jax.jit(tx.update)
  worst = 0.0
  for _ in range(20):
    g = jax.tree.map(lambda p, s: jnp.asarray(s * rng.uniform(0.5, 2.0, p.shape), jnp.bfloat16), params0, signs)
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    got = co.metrics(state)
    for key in ("", "/gain", "/w"):
      worst = max(worst, abs(got["edq" + key] - 1.0))
      assert got["lost_fraction" + key] == 0.0, (mode, got)
  print(f"{mode}: max |edq - 1| = {worst:.2e}")
  assert worst < tol, (mode, worst)


# ---------------------------------------------------------------------------
# Property: the recorded numbers equal the numpy computation, for any scale.
# ---------------------------------------------------------------------------

_bf16_values = hnp.arrays(
    np.float32, (2, N),
    elements=st.floats(-4.0, 4.0, width=32).filter(lambda x: abs(x) > 1e-3 or x == 0),
).map(lambda a: a.astype(BF16))


@settings(max_examples=40, deadline=None)
@given(theta=_bf16_values, mantissas=_bf16_values, log_scale=st.integers(-14, 1),
       zero_mask=hnp.arrays(np.bool_, (2, N)))
def test_metrics_match_numpy_at_every_scale(theta, mantissas, log_scale, zero_mask):
  """Plain and compensated EDQ/lost fraction vs numpy, updates from 2⁻¹⁴·|θ| to 2·|θ|."""
  params = {"gain": jnp.asarray(theta[0]), "w": jnp.asarray(theta[1])}
  u_np = np.where(zero_mask, 0.0, _f64(mantissas) * 2.0**log_scale).astype(BF16)
  u = {"gain": jnp.asarray(u_np[0]), "w": jnp.asarray(u_np[1])}
  u64 = {k: _f64(v) for k, v in u.items()}
  # Plain bf16 apply_updates.
  _, state = _measure_step(u, co.measure_precision().init(params), params)
  _assert_metrics_close(co.metrics(state), _np_metrics(_bf16_landing(params, u), u64))
  # Compensated, from a state with a nonzero low component.
  state = _compensate_tx.init(params)
  half_ulp = {k: np.where(theta[i] == 0, 0, 2.0 ** (np.floor(np.log2(np.abs(_f64(theta[i])) + 1e-300)) - 9))
              for i, k in enumerate(params)}
  lo = {k: jnp.asarray((0.37 * half_ulp[k]).astype(BF16)) for k in params}
  state = state._replace(lo=lo)
  emitted, new_state = _compensate_step(u, state, params)
  new_params = optax.apply_updates(params, emitted)
  delta = {k: (_f64(new_params[k]) + _f64(new_state.lo[k])) - (_f64(params[k]) + _f64(lo[k])) for k in params}
  got = co.metrics(new_state)
  _assert_metrics_close(got, _np_metrics(delta, u64))
  # And the numbers say "nothing lost" up to the MCF floor: grow rounds one sum
  # of magnitude ≤ 2⁻⁸·(|θ| + |θ + u|) to bf16, an error ε ≤ 2⁻¹⁵·max(|θ|, |θ + u|).
  v, d = np.concatenate(list(u64.values())), np.concatenate(list(delta.values()))
  th = np.concatenate([_f64(params[k]) for k in params])
  eps = 2.0**-15 * np.maximum(np.abs(th), np.abs(th + v))
  if np.any(v != 0):
    assert abs(got["edq"] - 1.0) <= np.sum(np.abs(v) * eps) / np.sum(v * v) * (1 + 1e-5) + 1e-6
    assert not np.any((np.abs(v) > eps) & (d == 0)), "an update above the MCF floor was lost"


# ---------------------------------------------------------------------------
# metrics() finds the numbers inside any wrapper.
# ---------------------------------------------------------------------------

WRAPPED = {
    "adamw (a chain)": lambda: co.adamw(1e-4, track_metrics=True),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.lion(1e-4), co.compensate(track_metrics=True)),
    "inject_hyperparams": lambda: optax.inject_hyperparams(co.adamw, hyperparam_dtype=jnp.float32)(
        learning_rate=1e-4, track_metrics=True),
    "MultiSteps": lambda: optax.MultiSteps(co.adamw(1e-4, track_metrics=True), every_k_schedule=2),
    "apply_if_finite": lambda: optax.apply_if_finite(co.adamw(1e-4, track_metrics=True), 3),
    "nested": lambda: optax.apply_if_finite(optax.MultiSteps(optax.inject_hyperparams(
        co.adamw, hyperparam_dtype=jnp.float32)(learning_rate=1e-4, track_metrics=True), 2), 3),
}


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_metrics_found_inside_wrappers(name):
  tx = WRAPPED[name]()
  params = {"gain": jnp.ones(N, jnp.bfloat16), "w": jnp.ones(N, jnp.bfloat16), "b": jnp.zeros(N, jnp.float32)}
  grads = {"gain": jnp.full(N, 0.5, jnp.bfloat16), "w": jnp.full(N, -0.5, jnp.bfloat16), "b": jnp.full(N, 0.5)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(2):
    u, state = step(grads, state, params)
    params = optax.apply_updates(params, u)
  got = co.metrics(state)
  keys = {"edq", "lost_fraction"} | {f"{m}/{k}" for m in ("edq", "lost_fraction") for k in ("gain", "w", "b")}
  assert set(got) == keys
  assert all(type(v) is float for v in got.values())
  # ~1e-4 steps on params of 1.0: kept whole by compensation; the fp32 leaf loses nothing either.
  for k in ("", "/gain", "/w", "/b"):
    assert got["edq" + k] == pytest.approx(1.0, abs=2e-2) and got["lost_fraction" + k] == 0.0, got


def test_metrics_of_several_tracked_transforms_are_prefixed():
  labels = {"gain": "collage", "w": "plain"}
  tx = optax.multi_transform(
      {"collage": co.adamw(1e-4, track_metrics=True),
       "plain": optax.chain(optax.adamw(1e-4), co.measure_precision())}, labels)
  params = {"gain": jnp.ones(N, jnp.bfloat16), "w": jnp.ones(N, jnp.bfloat16)}
  grads = {"gain": jnp.full(N, 0.5, jnp.bfloat16), "w": jnp.full(N, -0.5, jnp.bfloat16)}
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  got = co.metrics(state)
  assert {k.split("/")[0] for k in got} == {"0", "1"}
  assert all(type(v) is float for v in got.values())
  by_prefix = {p: {k[2:]: v for k, v in got.items() if k.startswith(p + "/")} for p in ("0", "1")}
  collage = next(p for p in by_prefix if "edq/gain" in by_prefix[p])
  plain = next(p for p in by_prefix if "edq/w" in by_prefix[p])
  assert {collage, plain} == {"0", "1"}
  # The intended update of "gain" (AdamW's first step in float64 from the stored, bfloat16-rounded
  # m = 0.1·g, as the step reads it back) and where θ + lo went, read back from the params and state.
  p0, g0 = _f64(params["gain"]), _f64(grads["gain"])
  m_hat = reference.bf16(0.1 * g0).astype(np.float64) / 0.1
  u = -1e-4 * (m_hat / (np.sqrt(1e-3 * g0 * g0 / 1e-3) + 1e-8) + 1e-4 * p0)
  new = _f64(optax.apply_updates(params, updates)["gain"])
  lo = next(s.lo for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, co_alias.AdamWState))
            if isinstance(s, co_alias.AdamWState))
  edq = _np_metrics({"gain": new + _f64(lo["gain"]) - p0}, {"gain": u})["edq"]
  assert by_prefix[collage]["edq/gain"] == pytest.approx(edq, rel=1e-4)
  # The tracked transform that saw "gain" kept its update to MCF precision:
  # lo' holds it to 8 bits (2**-9 relative) after float32's 2**-24·|θ| ≈ 6e-4·|u|.
  assert abs(edq - 1.0) <= 2.0**-9 + 2.0**-24 / 1e-4 + 1e-6, edq
  # The one that saw "w" (plain optax.adamw) lost it whole: bf16(1 + u) is 1.0.
  w0 = _f64(params["w"])
  u_w = reference.adamw_step(w0, _f64(grads["w"]), reference.adamw_init(w0), 1e-4, weight_decay=1e-4)[0] - w0
  assert np.all(u_w != 0) and np.all(_bf16_landing({"w": w0}, {"w": u_w})["w"] == 0)
  assert by_prefix[plain]["edq/w"] == 0.0 and by_prefix[plain]["lost_fraction/w"] == 1.0
  # Each reports only the subtree it saw: no perfect EDQ for updates it never got.
  assert {k.split("/")[1] for k in by_prefix["0"] if "/" in k} == {"gain"}
  assert {k.split("/")[1] for k in by_prefix["1"] if "/" in k} == {"w"}


def test_metrics_is_empty_without_tracking():
  params = {"w": jnp.ones(N, jnp.bfloat16)}
  assert co.metrics(co.adamw(1e-4).init(params)) == {}
  assert co.metrics(optax.adamw(1e-4).init(params)) == {}
