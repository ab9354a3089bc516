"""Fault suite: non-finite gradients, range limits (overflow), bad input.

A training run is days of compute; the optimizer must never corrupt it silently.
Every test here is marked ``faults`` (``pytest -m faults`` runs the suite alone,
with ``tests/test_determinism.py`` and ``tests/test_long_horizon.py``).

"Nothing changed" is checked on bit patterns. ``adamw``'s behaviour on valid
input (leaf dtypes, hyperparameters, masks, schedules, MultiSteps) is in
``tests/test_adamw.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import collage_optax as co
from collage_optax import formats
import strategies

pytestmark = pytest.mark.faults

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
LR, WD = 1e-3, 1e-2
DTYPES = {"gain": BF16, "w": BF16, "h": F16, "b": F32}


def _stream():
  """Initial params and 40 gradients (float64 values each leaf's dtype in ``DTYPES`` holds)."""
  return strategies.gradient_stream(DTYPES, 40)


# Modes whose param formats keep bfloat16 params only (float16 ones are refused).
BF16_ONLY = tuple(m for m, (pf, _, _) in co.PRESETS.items() if pf in ("exact", "compact"))
FP16_MODES = tuple(m for m in co.MODES if m not in BF16_ONLY)


def _dtypes(mode):
  """The leaf dtypes for ``mode``: a bfloat16-only mode gets its float16 leaf as bfloat16."""
  return {k: BF16 if mode in BF16_ONLY and d == F16 else d for k, d in DTYPES.items()}


def _tree(values, dtypes=DTYPES):
  return {k: jnp.asarray(v, dtypes[k]) for k, v in values.items()}


def _all_finite(tree) -> list[str]:
  """Paths of float leaves holding a NaN or inf (empty: all finite)."""
  bad = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) and not np.all(np.isfinite(np.asarray(x, np.float64))):
      bad.append(jax.tree_util.keystr(path))
  return bad


_TX_CACHE: dict = {}


def _cached(key, make):
  """One optimizer and its jitted step ``(params, state, grads) -> (params, state)`` per key:
  compilations are the suite's main cost."""
  if key not in _TX_CACHE:
    tx = make()

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    _TX_CACHE[key] = (tx, jax.jit(step))
  return _TX_CACHE[key]


def _decoded(store):
  """A moment's float32 value from its storage (``formats``: bf16 array, packed uint32 MCF, ...)."""
  return np.asarray(formats.moment_format_of(store).decode(store), np.float64)


# ---------------------------------------------------------------------------
# Non-finite gradients.
# ---------------------------------------------------------------------------


def _poison(g, value):
  g = dict(g)
  g["w"] = g["w"].at[2, 3].set(value)
  g["h"] = g["h"].at[1].set(value)
  return g


@pytest.mark.parametrize("mode", co.MODES)
def test_apply_if_finite_skips_nan_and_inf_steps_bit_for_bit(mode, tree_bits):
  """Under ``apply_if_finite`` a NaN/±inf step changes nothing (params, lo, m, v and
  their low parts), and training then continues exactly as if it never happened."""
  tx, step = _cached(("finite", mode), lambda: optax.apply_if_finite(
      co.adamw(LR, weight_decay=WD, mode=mode), max_consecutive_errors=3))
  p0, stream = _stream()
  dt = _dtypes(mode)
  params, state = _tree(p0, dt), tx.init(_tree(p0, dt))
  for g in stream[:3]:
    params, state = step(params, state, _tree(g, dt))
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(state.inner_state.lo)), "lo never moved"
  good = [_tree(g, dt) for g in stream[3:6]]
  clean_p, clean_s = params, state
  for g in good:
    clean_p, clean_s = step(clean_p, clean_s, g)
  for n, bad in enumerate([np.nan, np.inf, -np.inf]):
    new_p, new_s = step(params, state, _poison(good[0], bad))
    assert tree_bits(new_p) == tree_bits(params), f"{bad}: params changed"
    assert tree_bits(new_s.inner_state) == tree_bits(state.inner_state), f"{bad}: state changed"
    assert int(new_s.notfinite_count) == n + 1 and not bool(new_s.last_finite)
    params, state = new_p, new_s
  # Three rejections in a row (max_consecutive_errors=3); the next finite step applies.
  for g in good:
    params, state = step(params, state, g)
  assert not _all_finite((params, state))
  assert int(state.total_notfinite) == 3 and int(state.notfinite_count) == 0
  assert tree_bits(params) == tree_bits(clean_p)
  assert tree_bits(state.inner_state) == tree_bits(clean_s.inner_state)


@pytest.mark.parametrize("mode", co.MODES)
def test_non_finite_gradient_without_wrapper_poisons_only_its_elements(mode, tree_bits):
  """Documented behaviour without ``apply_if_finite``: the elements with a non-finite
  gradient get a non-finite ``θ``, ``m`` and ``v`` (each moment's decoded value, in
  whatever storage format it has); nothing else changes, bit for bit. The residual
  ``lo`` there is non-finite or 0 (the pair ``θ + lo`` is non-finite either way):
  every other element of ``lo`` is unchanged."""
  tx, step = _cached(("plain", mode), lambda: co.adamw(LR, weight_decay=WD, mode=mode))
  p0, stream = _stream()
  dt = _dtypes(mode)
  params, state = _tree(p0, dt), tx.init(_tree(p0, dt))
  for g in stream[:2]:
    params, state = step(params, state, _tree(g, dt))
  clean_p, clean_s = step(params, state, _tree(stream[2], dt))
  for bad in (np.nan, np.inf):
    new_p, new_s = step(params, state, _poison(_tree(stream[2], dt), bad))
    new_master = co.master_params(new_p, new_s)
    for k, idx in (("w", (2, 3)), ("h", (1,))):
      mask = np.ones(np.shape(new_p[k]), bool)
      mask[idx] = False
      # Every stored array (param, residual, moment storages) is unchanged off idx, bit for bit.
      for name, new, clean in (("param", new_p, clean_p), ("lo", new_s.lo, clean_s.lo),
                               ("mu", new_s.mu, clean_s.mu), ("nu", new_s.nu, clean_s.nu)):
        x, y = new[k], clean[k]
        if isinstance(x, formats.Log16):
          # log16: the element is left out of its group's scale (the largest v); the rest of its group
          # is coded against the others' largest: finite, each within twice log16's relative bound
          # of the clean step's value (both encode the same float32 v). Other groups: bit for bit.
          group = np.zeros(mask.shape, bool)
          group[idx[:-1]][..., (idx[-1] // 32) * 32:(idx[-1] // 32 + 1) * 32] = True
          got, want = _decoded(x), _decoded(y)
          rel, _, tiny = formats.log16_bound()
          assert np.all(np.isfinite(got[group & mask])), f"{bad}: {name}[{k}] group poisoned"
          assert np.all(np.abs(got - want)[group & mask] <= 2 * rel * want[group & mask] + 2 * tiny), name
          keep = ~group
          assert np.asarray(x.codes)[keep].tobytes() == np.asarray(y.codes)[keep].tobytes(), name
          continue
        if isinstance(x, formats.Q8):
          # q8: the element is left out of its group's scale, so the rest of its group
          # (32 along the last axis) is quantized against the others' largest value:
          # finite and within the format's bound of the clean step. Other groups: bit for bit.
          group = np.zeros(mask.shape, bool)
          group[idx[:-1]][..., (idx[-1] // 32) * 32:(idx[-1] // 32 + 1) * 32] = True
          got, want = _decoded(x), _decoded(y)
          assert np.all(np.isfinite(got[group & mask])), f"{bad}: {name}[{k}] group poisoned"
          scale = np.max(np.abs(want[group])) if name == "mu" else np.max(np.sqrt(want[group]))
          tol = 2 * formats.q8_bound(name == "nu") * scale
          off = (got - want) if name == "mu" else (np.sqrt(got) - np.sqrt(want))
          assert np.all(np.abs(off[group & mask]) <= tol), f"{bad}: {name}[{k}] group off by more than q8's bound"
          keep = ~group
          assert np.asarray(x.codes)[keep].tobytes() == np.asarray(y.codes)[keep].tobytes(), name
          continue
        x, y = np.asarray(x), np.asarray(y)
        assert x[mask].tobytes() == y[mask].tobytes(), f"{bad}: other elements of {name}[{k}] changed"
      # At idx the values are non-finite: param, the pair θ + lo, and both moments.
      for name, value in (("param", np.asarray(new_p[k], np.float64)),
                          ("θ + lo", np.asarray(new_master[k], np.float64)),
                          ("mu", _decoded(new_s.mu[k])), ("nu", _decoded(new_s.nu[k]))):
        assert not np.isfinite(value[idx]), f"{bad}: {name}[{k}]{idx} = {value[idx]} is finite"
      lo = np.asarray(new_s.lo[k], np.float64)[idx]
      assert not np.isfinite(lo) or lo == 0, f"{bad}: lo[{k}]{idx} = {lo}"
    assert tree_bits((new_p["gain"], new_p["b"])) == tree_bits((clean_p["gain"], clean_p["b"]))
    assert tree_bits((new_s.mu["gain"], new_s.nu["gain"], new_s.lo["gain"])) == tree_bits(
        (clean_s.mu["gain"], clean_s.nu["gain"], clean_s.lo["gain"]))
    assert int(new_s.count) == 3


# ---------------------------------------------------------------------------
# Range: finite inputs never give a non-finite state.
# ---------------------------------------------------------------------------

RANGE_CASES = {
    # dtype, params, gradients (constant sign per element, every step)
    "bf16_huge": (BF16, [3e38, -3e38, 1.0, 0.0], [1e38, -3e38, 2e19, 1e30]),
    "f32_max": (F32, [3e38, -3e38, 1.0, 0.0], [3.4e38, -1e38, 2e19, 3.4e38]),
    # float16 params: g² beyond float16's 65504 (|g| > 256) and (1−β2)·g² below
    # float16's smallest subnormal: fine for their bfloat16-based moments.
    "f16_max": (F16, [6e4, -6e4, 1.0, 0.0], [6e4, -6e4, 300.0, 6e4]),
    "f16_tiny_grads": (F16, [1.0, -1.0, 0.5, 0.0], [1e-4, -3e-5, 1e-6, -2e-6]),
}


@pytest.mark.parametrize("mode", co.MODES)
@pytest.mark.parametrize("case", sorted(RANGE_CASES))
def test_finite_extreme_inputs_keep_params_and_state_finite(mode, case):
  """``g²`` overflows float32 (the step's arithmetic) for ``|g| > 1.8e19``, and
  bfloat16 storage past 3.39e38. The state must stay finite and every step must
  still descend: the param's stored value (``θ + lo``) moves against the gradient.
  Every update here is far above the float32 floor of a step (``2**-24`` of the
  param): Adam's normalised step is ~``lr`` and weight decay ``lr·wd·|θ|``."""
  dtype, p, g = RANGE_CASES[case]
  if dtype == F16 and mode in BF16_ONLY:
    with pytest.raises(TypeError, match=r"leaf \['x'\].*keeps bfloat16 params"):
      co.adamw(LR, mode=mode).init({"x": jnp.asarray(p, dtype)})
    pytest.skip(f"mode={mode!r} keeps bfloat16 params only (float16 refused, checked)")
  tx, step = _cached(("range", mode, jnp.dtype(dtype).name),
                     lambda: co.adamw(LR, weight_decay=WD, mode=mode))
  params = {"x": jnp.asarray(p, dtype)}
  grads = {"x": jnp.asarray(g, dtype)}
  start = np.asarray(params["x"], np.float64)
  state = tx.init(params)
  small = np.abs(start) <= 1.0  # where an Adam step of ~lr is visible next to weight decay
  for t in range(1, 5):
    new, state = step(params, state, grads)
    assert not _all_finite((new, state)), f"non-finite after finite inputs: {_all_finite((new, state))}"
    # The update opposes the gradient (weight decay only adds to it here: sign(θ) = sign(g)).
    delta = np.asarray(new["x"], np.float64) - np.asarray(params["x"], np.float64)
    master = np.asarray(co.master_params(new, state)["x"], np.float64)
    moved = (master - start) * np.sign(g)
    assert np.all((delta * np.sign(g) <= 0)), f"ascent: {delta}"
    assert np.all(moved < 0), f"no descent at MCF precision: {moved}"
    # Saturated or not, Adam's own step is at least ~lr (|m̂|/√v̂ >= 1 for a constant g).
    assert np.all(moved[small] <= -0.5 * LR * t), f"step {t}: Adam's step lost: {moved}"
    params = new


@pytest.mark.parametrize("mode", co.MODES)
def test_b2_that_rounds_to_one_in_float32(mode):
  """``b2 = 0.99999999`` is below 1 but 1.0 in float32: ``1 − b2**t`` is 0 and optax's ``v̂`` is infinite,
  a zero direction. The step stays finite and is weight decay alone (``x·(1 − lr·wd)``, to the master's
  precision), as ``optax.adamw``'s."""
  lr, wd = 1e-2, 0.1  # a step of 1e-3·|x|, above every master's precision
  x = jnp.asarray(np.linspace(-2.0, 2.0, 64).reshape(2, 32), jnp.bfloat16)
  g = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32)), jnp.bfloat16)
  tx = co.adamw(lr, b2=0.99999999, weight_decay=wd, mode=mode)
  state = tx.init({"x": x})
  u, state = jax.jit(tx.update)({"x": g}, state, {"x": x})
  new = optax.apply_updates({"x": x}, u)
  assert not _all_finite((new, state)), _all_finite((new, state))
  master = np.asarray(co.master_params(new, state)["x"], np.float64)
  want = np.asarray(x, np.float64) * (1 - lr * wd)
  # The stored master: mcf ~2**-16 relative, exact 2**-24, compact's int8 residual half of 2**-8/127: all far
  # below the step (1e-3), which a master left unchanged would miss by.
  np.testing.assert_allclose(master, want, rtol=2.0**-13, atol=0)


def test_float16_params_get_moments_of_float32_range():
  """float16 params keep bfloat16-based moments: one step's ``m = (1−β1)·g`` and
  ``v = (1−β2)·g²`` match float64 to the moment format's precision both far above
  float16's 65504 (``|g| = 6e4``: ``v = 3.6e6``) and far below its smallest
  subnormal (``|g| = 6e-8``: ``v = 3.6e-18``), where float16 moments would
  saturate or flush to zero."""
  g = np.asarray([6e4, -300.0, 1e-4, 6e-8, -6e-8])
  grads = {"x": jnp.asarray(g, F16)}
  g = np.asarray(grads["x"], np.float64)  # the float16 values themselves
  params = {"x": jnp.ones(g.shape, F16)}
  for mode in FP16_MODES:
    tx = co.adamw(LR, weight_decay=WD, mode=mode)
    _, state = tx.update(grads, tx.init(params), params)
    # Relative precision of one float32 expression stored in the format: bf16
    # rounds to 8 significant bits (2**-8 relative at most), the two-bfloat16 MCF
    # to 16 (2**-16), after float32 arithmetic (a few 2**-24).
    tol = {"bf16": 2.0**-8, "mcf": 2.0**-16}
    for store, want in ((state.mu["x"], 0.1 * g), (state.nu["x"], 1e-3 * g * g)):
      fmt = formats.moment_format_of(store).name
      got = _decoded(store)
      assert np.all(np.abs(got - want) <= (tol[fmt] + 2.0**-21) * np.abs(want)), (mode, fmt, got, want)
  assert _decoded(state.nu["x"])[0] > 65504 and _decoded(state.nu["x"])[3] > 0


# ---------------------------------------------------------------------------
# Bad input: clear errors naming the leaf path and the fix.
# ---------------------------------------------------------------------------


def _bad_input_cases():
  p = {"w": jnp.ones((3,), BF16), "b": {"x": jnp.ones((2,), BF16)}}
  g = jax.tree.map(jnp.ones_like, p)
  tx = co.adamw(LR)
  st = tx.init(p)
  p_y = {"w": p["w"], "b": {"y": p["b"]["x"]}}
  g_y = {"w": g["w"], "b": {"y": g["b"]["x"]}}
  as_f32 = lambda t: jax.tree.map(lambda x: x.astype(F32), t)
  ints = {"w": p["w"], "i": jnp.arange(3)}
  return {
      "update_without_params": (lambda: tx.update(g, st), ValueError,
                                r"needs `params`.*tx\.update\(grads, opt_state, params\)"),
      "compensate_without_params": (lambda: co.compensate().update(g, co.compensate().init(p)),
                                    ValueError, r"compensate needs `params`"),
      "updates_other_tree": (lambda: tx.update(g_y, st, p), ValueError,
                             r"updates lacks leaf \['b'\]\['x'\].*extra leaf \['b'\]\['y'\].*Pass the same tree"),
      "params_other_tree": (lambda: tx.update(g, st, p_y), ValueError,
                            r"lacks leaf \['b'\]\['y'\].*Pass the same tree"),
      "params_other_shape": (lambda: tx.update(g, st, {"w": jnp.ones((4,), BF16), "b": p["b"]}),
                             ValueError, r"leaf \['w'\] has shape \(4,\) in params but \(3,\) in updates"),
      "complex_param": (lambda: tx.init({"w": jnp.ones((3,), jnp.complex64)}), TypeError,
                        r"leaf \['w'\] is complex.*plain optax optimizer"),
      "complex_grad": (lambda: tx.update({"w": g["w"].astype(jnp.complex64), "b": g["b"]}, st, p),
                       TypeError, r"gradient for leaf \['w'\] has dtype complex64.*real float"),
      "float8_param": (lambda: tx.init({"w": jnp.ones((3,), jnp.float8_e4m3fn)}), TypeError,
                       r"leaf \['w'\] is float8_e4m3fn.*Cast 8-bit params to bfloat16"),
      "float0_grad": (lambda: tx.update({"w": g["w"], "i": np.zeros((3,), jax.dtypes.float0)},
                                        tx.init(ints), ints),
                      TypeError, r"leaf \['i'\] is float0.*Differentiate only the float params"),
      "optax_adamw_state": (lambda: tx.update(g, optax.adamw(LR).init(p), p), TypeError,
                            r"not the state of collage_optax\.adamw.*optax\.adamw.*tx\.init\(params\)"),
      "optax_adam_state_in_scale_by_adam": (
          lambda: co.scale_by_adam().update(g, optax.scale_by_adam().init(p)), TypeError,
          r"not collage_optax ScaleByAdamState.*call tx\.init\(params\)"),
      "state_of_other_tree": (lambda: tx.update(g, tx.init({"w": p["w"]}), p), ValueError,
                              r"opt_state lacks leaf \['b'\]\['x'\].*made for other params.*tx\.init\(params\)"),
      "state_of_other_dtypes": (lambda: tx.update(g, tx.init(as_f32(p)), p), ValueError,
                                r"moment for leaf \['b'\]\['x'\] is a 'f32' moment \(float32\[2\]\) but this "
                                r"optimizer keeps a 'bf16' moment \(bfloat16\[2\]\).*for other params.*tx\.init\(params\)"),
      # plus keeps an MCF second moment (packed uint32), light a bfloat16 one.
      "state_of_other_mode": (lambda: tx.update(g, co.adamw(LR, mode="light").init(p), p), ValueError,
                              r"moment for leaf \['b'\]\['x'\] is a 'bf16' moment \(bfloat16\[2\]\) but this "
                              r"optimizer keeps a 'mcf' moment \(uint32\[2\]\)\. The state was made by another "
                              r"mode.*tx\.init\(params\)"),
      "compensate_foreign_state": (lambda: co.compensate().update(g, optax.EmptyState(), p), TypeError,
                                   r"not collage_optax CompensateState.*tx\.init\(params\)"),
      "unknown_mode": (lambda: co.adamw(LR, mode="heavy"), ValueError,
                       r"unknown mode='heavy'; use one of 'light', 'plus', 'full'"),
  }


BAD_INPUT = _bad_input_cases()


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_raises_a_clear_error(case):
  fn, exc, pattern = BAD_INPUT[case]
  with pytest.raises(exc, match=pattern):
    fn()
