"""Fault suite (issue 7): non-finite gradients, range limits, bad input, leaf dtypes, interplay.

A training run is days of compute; the optimizer must never corrupt it silently.
Every test here is marked ``faults`` (``pytest -m faults`` runs the suite alone,
with ``tests/test_determinism.py`` and ``tests/test_long_horizon.py``).

References are independent of the code under test: float64 AdamW/SGD in numpy
(``tests/reference.py``), ``optax.adamw`` itself for the leaves COLLAGE does
not touch, and bit patterns for "nothing changed".
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import collage_optax as co
from collage_optax import alias, formats
import reference as ref

pytestmark = pytest.mark.faults

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
LR, WD = 1e-3, 1e-2
DTYPES = {"gain": BF16, "w": BF16, "h": F16, "b": F32}
SHAPES = {"gain": (16,), "w": (8, 8), "h": (8,), "b": (8,)}


def _round(x, dtype):
  """``x`` (float64) rounded to ``dtype`` and back to float64: values the dtype holds."""
  npdt = {BF16: ml_dtypes.bfloat16, F16: np.float16, F32: np.float32}[dtype]
  return np.asarray(x, np.float64).astype(npdt).astype(np.float64)


@functools.lru_cache(maxsize=None)
def _stream(steps: int = 40, seed: int = 0):
  """Initial params and gradients (float64 values each leaf's dtype holds)."""
  rng = np.random.default_rng(seed)
  p0 = {"gain": np.ones(16), "w": rng.normal(0.0, 0.5, (8, 8)),
        "h": rng.normal(0.0, 0.5, (8,)), "b": rng.normal(0.0, 0.1, (8,))}
  grads = [{k: 0.5 + rng.normal(0.0, 1.0, v.shape) for k, v in p0.items()} for _ in range(steps)]
  cast = lambda t: {k: _round(v, DTYPES[k]) for k, v in t.items()}
  return cast(p0), [cast(g) for g in grads]


# Modes whose param formats keep bfloat16 params only (float16 ones are refused).
BF16_ONLY = tuple(m for m, (pf, _, _) in co.PRESETS.items() if pf in ("exact", "compact"))
FP16_MODES = tuple(m for m in co.MODES if m not in BF16_ONLY)


def _dtypes(mode):
  """The leaf dtypes for ``mode``: a bfloat16-only mode gets its float16 leaf as bfloat16."""
  return {k: BF16 if mode in BF16_ONLY and d == F16 else d for k, d in DTYPES.items()}


def _tree(values, dtypes=DTYPES):
  return {k: jnp.asarray(v, dtypes[k]) for k, v in values.items()}


def _bits(tree):
  """Every array leaf as raw bytes (``None`` leaves skipped): equal iff bit-identical."""
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _f64(tree):
  return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def _all_finite(tree) -> list[str]:
  """Paths of float leaves holding a NaN or inf (empty: all finite)."""
  bad = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) and not np.all(np.isfinite(np.asarray(x, np.float64))):
      bad.append(jax.tree_util.keystr(path))
  return bad


def _jit_step(tx):
  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return step


_TX_CACHE: dict = {}


def _cached(key, make):
  """One optimizer and its jitted step per key: compilations are the suite's main cost."""
  if key not in _TX_CACHE:
    tx = make()
    _TX_CACHE[key] = (tx, _jit_step(tx))
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
def test_apply_if_finite_skips_nan_and_inf_steps_bit_for_bit(mode):
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
    assert _bits(new_p) == _bits(params), f"{bad}: params changed"
    assert _bits(new_s.inner_state) == _bits(state.inner_state), f"{bad}: state changed"
    assert int(new_s.notfinite_count) == n + 1 and not bool(new_s.last_finite)
    params, state = new_p, new_s
  # Three rejections in a row (max_consecutive_errors=3); the next finite step applies.
  for g in good:
    params, state = step(params, state, g)
  assert not _all_finite((params, state))
  assert int(state.total_notfinite) == 3 and int(state.notfinite_count) == 0
  assert _bits(params) == _bits(clean_p)
  assert _bits(state.inner_state) == _bits(clean_s.inner_state)


@pytest.mark.parametrize("mode", co.MODES)
def test_non_finite_gradient_without_wrapper_poisons_only_its_elements(mode):
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
  doc = " ".join(co.adamw.__doc__.split())
  assert "optax.apply_if_finite(collage_optax.adamw(" in doc and "poisons" in doc
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
    assert _bits((new_p["gain"], new_p["b"])) == _bits((clean_p["gain"], clean_p["b"]))
    assert _bits((new_s.mu["gain"], new_s.nu["gain"], new_s.lo["gain"])) == _bits(
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


def test_range_limits_are_documented():
  """The statements of ``adamw``'s docstring that the range tests above check."""
  doc = " ".join(co.adamw.__doc__.split())
  for needle in ("1.8e19", "saturates at the format's largest finite value", "still descends",
                 "float16 params get moments of float32's range"):
    assert needle in doc, needle


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


@pytest.mark.parametrize("name,upper", [("learning_rate", None), ("b1", 1.0), ("b2", 1.0),
                                        ("eps", None), ("eps_root", None), ("weight_decay", None)])
@pytest.mark.parametrize("value", [-1e-3, float("nan"), float("inf"), float("-inf")])
def test_negative_or_non_finite_hyperparameters_are_refused(name, upper, value):
  kwargs = {"learning_rate": LR, name: value}
  bound = re.escape(f"in [0, {upper})") if upper else "finite and >= 0"
  with pytest.raises(ValueError, match=rf"collage_optax\.adamw: {name}={re.escape(repr(value))} must be {bound}"):
    co.adamw(**kwargs)


def test_beta_of_one_is_refused():
  for name in ("b1", "b2"):
    with pytest.raises(ValueError, match=rf"{name}=1\.0 must be in \[0, 1\.0\)"):
      co.adamw(LR, **{name: 1.0})


# ---------------------------------------------------------------------------
# Leaf dtypes: integer, boolean, float32, float64, float16.
# ---------------------------------------------------------------------------


def test_integer_and_boolean_leaves_have_no_state_and_stay_bit_for_bit():
  """optax.adamw runs Adam on integer leaves and apply_updates truncates the
  float update into them (an int32 100 drifts, and its moment state changes
  dtype after the first step). collage_optax.adamw keeps no state for them and
  emits zero updates of the gradient's dtype: they stay bit for bit."""
  params = {"w": jnp.ones((4,), BF16), "i": jnp.asarray([0, 5, 100, -7], jnp.int32),
            "m": jnp.asarray([True, False, True, False])}
  grads_int = {"w": jnp.full((4,), 0.5, BF16), "i": jnp.asarray([1, -2, 300, 4], jnp.int32),
               "m": jnp.asarray([True, True, False, False])}
  grads_f32 = {"w": grads_int["w"], "i": jnp.asarray([0.5, -2.0, 3.0, 4.0], F32), "m": jnp.ones((4,), F32)}
  # What optax does (the reason for the decision above).
  otx = optax.adamw(0.1, weight_decay=WD)
  ostate = otx.init(params)
  ou, ostate2 = otx.update(grads_int, ostate, params)
  assert np.any(np.asarray(optax.apply_updates(params, ou)["i"]) != np.asarray(params["i"]))
  assert ostate2[0].mu["i"].dtype != ostate[0].mu["i"].dtype
  for mode in co.MODES:
    tx = co.adamw(0.1, weight_decay=WD, mode=mode)
    state = tx.init(params)
    for tree in (state.mu, state.nu, state.lo):
      assert tree["i"] is None and tree["m"] is None
    p = params
    for grads in (grads_int, grads_f32, grads_int):
      u, state = tx.update(grads, state, p)
      assert {k: u[k].dtype for k in u} == {k: grads[k].dtype for k in grads}
      assert not np.any(np.asarray(u["i"])) and not np.any(np.asarray(u["m"]))
      p = optax.apply_updates(p, u)
    assert _bits((p["i"], p["m"])) == _bits((params["i"], params["m"]))
    assert np.all(np.asarray(p["w"], np.float64) < 1.0), "the float leaf must still train"
  doc = " ".join(co.adamw.__doc__.split())
  assert "Integer and boolean params get no state and a zero update" in doc


def _run_plain(tx, params, grads):
  state = tx.init(params)
  step = _jit_step(tx)
  for g in grads:
    params, state = step(params, state, g)
  return params, state


@pytest.mark.parametrize("nesterov", [False, True], ids=["adam", "nesterov"])
def test_float32_leaves_follow_optax_adamw(nesterov):
  """float32 leaves get optax.adamw's update bit for bit (no low component,
  float32 moments): jitted on the same tree (a bf16/fp16/f32 mix; optax's own
  float32 leaf does not depend on the others), params and moments are identical
  after 40 steps with a schedule and weight decay. Jitted on a different tree
  XLA may fuse the float32 arithmetic differently: then they agree to float32
  rounding."""
  p0, stream = _stream()
  lr = optax.cosine_decay_schedule(1e-2, len(stream))
  mixed, gs = _tree(p0), [_tree(g) for g in stream]
  ours, state = _run_plain(co.adamw(lr, weight_decay=0.1, nesterov=nesterov), mixed, gs)
  theirs, tstate = _run_plain(optax.adamw(lr, weight_decay=0.1, nesterov=nesterov), mixed, gs)
  assert state.lo["b"] is None and state.mu["b"].dtype == F32 and state.nu["b"].dtype == F32
  moved = np.abs(np.asarray(theirs["b"], np.float64) - p0["b"]).max()
  assert moved > 0.1
  assert _bits((ours["b"], state.mu["b"], state.nu["b"])) == _bits(
      (theirs["b"], tstate[0].mu["b"], tstate[0].nu["b"]))
  alone, _ = _run_plain(optax.adamw(lr, weight_decay=0.1, nesterov=nesterov), {"b": mixed["b"]},
                        [{"b": g["b"]} for g in gs])
  np.testing.assert_allclose(np.asarray(ours["b"]), np.asarray(alone["b"]), rtol=0, atol=1e-6 * moved)


def test_float64_leaves_follow_optax_adamw_in_float64():
  """With x64 on, float64 leaves keep float64 moments, no low component, and
  equal optax.adamw bit for bit on the same tree; both match an independent
  numpy float64 AdamW to float64 rounding (bias corrections included)."""
  p0, stream = _stream()
  with jax.enable_x64(True):
    params = {"d": jnp.asarray(p0["w"], jnp.float64), "w": jnp.asarray(p0["w"], BF16)}
    grads = [{"d": jnp.asarray(g["w"], jnp.float64), "w": jnp.asarray(g["w"], BF16)} for g in stream]
    ours, state = _run_plain(co.adamw(1e-2, weight_decay=0.1), params, grads)
    theirs, tstate = _run_plain(optax.adamw(1e-2, weight_decay=0.1), params, grads)
    assert ours["d"].dtype == jnp.float64 and state.mu["d"].dtype == jnp.float64
    assert state.nu["d"].dtype == jnp.float64 and state.lo["d"] is None
    assert _bits((ours["d"], state.mu["d"], state.nu["d"])) == _bits(
        (theirs["d"], tstate[0].mu["d"], tstate[0].nu["d"]))
    ref64 = ref.adamw_trajectory(p0["w"], np.stack([g["w"] for g in stream]), np.full(len(stream), 1e-2),
                                 weight_decay=0.1)
    moved = np.abs(ref64 - p0["w"]).max()
    assert moved > 0.1
    np.testing.assert_allclose(np.asarray(ours["d"]), ref64, rtol=0, atol=1e-12 * moved)


def _rounded_moments_adamw(p0, grads, lrs, wd, mu_fmt, nu_fmt):
  """float64 AdamW whose ``m`` and ``v`` are stored in a format after every step
  (numpy/ml_dtypes): ``"bf16"`` one bfloat16, ``"mcf"`` ``hi + lo`` with
  ``hi = bf16(x)``, ``lo = bf16(x − hi)``. As ``collage_optax.adamw`` documents,
  a step uses an MCF moment's stored value and a bf16 moment's value before its
  rounding. The error this alone causes is the floor of a run whose moments are
  kept that way."""
  bf16 = lambda x: np.asarray(x, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)
  store = {"bf16": bf16, "mcf": lambda x: bf16(x) + bf16(x - bf16(x))}
  used = {"bf16": lambda x: x, "mcf": store["mcf"]}
  p, m, v = np.asarray(p0, np.float64), 0.0, 0.0
  for t, (g, lr) in enumerate(zip(grads, lrs), 1):
    m_new, v_new = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    m_t, v_t = used[mu_fmt](m_new), used[nu_fmt](v_new)
    m, v = store[mu_fmt](m_new), store[nu_fmt](v_new)
    p = p - lr * ((m_t / (1 - 0.9**t)) / (np.sqrt(v_t / (1 - 0.999**t)) + 1e-8) + wd * p)
  return p


def test_float16_params_train_close_to_float64():
  """A short run on float16 params tracks float64 AdamW to the precision of its
  storage; the same Adam without low components is far off.

  float16 params get bfloat16-based moments (float32's range, 8 significant bits
  for a ``bf16`` moment, ~16 for ``mcf``), and an MCF param of two float16s (~22
  bits). Both floors are derived independently: the moments' from float64 AdamW
  with its moments stored the same way every step (``_rounded_moments_adamw``:
  2.5e-3 / 1.2e-3 / 5.6e-6 for light / plus / full), the param's from a random
  walk of one float16-MCF rounding, at most 2**-22·max(|θ|, 1) (subnormal ``lo``
  included), per step: 9.7e-5. Measured 2.6e-3 / 1.3e-3 / 1.6e-5; no-lo baseline
  0.21. (With float16 moments, before they were bfloat16-based: 3.9e-4 / 1.6e-4 /
  4.4e-5.)"""
  rng = np.random.default_rng(1)
  steps, n = 300, 64
  p0 = _round(np.concatenate([np.ones(n // 2), rng.normal(0, 0.5, n // 2)]), F16)
  grads = _round(0.3 + rng.normal(0, 1.0, (steps, n)), F16)
  lrs = np.asarray([float(optax.cosine_decay_schedule(1e-3, steps)(t)) for t in range(steps)])
  want = ref.adamw_trajectory(p0, grads, lrs, weight_decay=WD)
  moved = np.linalg.norm(want - p0)
  sched = optax.cosine_decay_schedule(1e-3, steps)
  gs = [{"x": jnp.asarray(g, F16)} for g in grads]
  # The naive baseline: the same float32-arithmetic Adam, float16 params without
  # low components. (optax.adamw itself turns float16 params into NaN here: its
  # eps=1e-8 is 0 in float16 and (1-b2)·g² underflows for small g.)
  naive_tx = optax.chain(co.scale_by_adam(nu_format="bf16"), optax.add_decayed_weights(WD),
                         optax.scale_by_learning_rate(sched))
  naive, _ = _run_plain(naive_tx, {"x": jnp.asarray(p0, F16)}, gs)
  naive_err = np.linalg.norm(np.asarray(naive["x"], np.float64) - want) / moved
  param_floor = np.sqrt(steps) * 2.0**-22 * np.linalg.norm(np.maximum(np.abs(p0), 1.0)) / moved
  for mode in FP16_MODES:
    _, mu_fmt, nu_fmt = alias.PRESETS[mode]
    moment_floor = np.linalg.norm(_rounded_moments_adamw(p0, grads, lrs, WD, mu_fmt, nu_fmt) - want) / moved
    params, state = _run_plain(co.adamw(sched, weight_decay=WD, mode=mode), {"x": jnp.asarray(p0, F16)}, gs)
    assert params["x"].dtype == F16
    err = np.linalg.norm(np.asarray(co.master_params(params, state, jnp.float32)["x"], np.float64) - want) / moved
    # Another rounding pattern of the same storage: within 1.5x of the floors.
    assert err <= 1.5 * (moment_floor + param_floor), (
        f"{mode}: float16 COLLAGE off float64 by {err:.2e}; storage floors {moment_floor:.2e} + {param_floor:.2e}")
    assert naive_err > 20 * err, f"{mode}: naive fp16 {naive_err:.2e} vs COLLAGE {err:.2e}"


# ---------------------------------------------------------------------------
# Interplay: schedules reaching 0, weight-decay masks, clipping, MultiSteps.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", co.MODES)
def test_schedule_reaching_zero_freezes_params_and_lo_bit_for_bit(mode):
  """Once the learning rate is 0, no step may move θ or lo (weight decay included),
  while the moments keep averaging as in optax."""
  lr = optax.linear_schedule(1e-2, 0.0, transition_steps=10)
  tx = co.adamw(lr, weight_decay=0.1, mode=mode)
  step = _jit_step(tx)
  p0, stream = _stream()
  dt = _dtypes(mode)
  params, state = _tree(p0, dt), tx.init(_tree(p0, dt))
  snapshot = None
  for i, g in enumerate(stream[:18]):
    params, state = step(params, state, _tree(g, dt))
    if i == 10:  # steps 0..9 have lr > 0; step 10 is the first with lr == 0.
      snapshot = (params, state.lo, state.mu)
      assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(snapshot[1]))
  assert _bits(params) == _bits(snapshot[0])
  assert _bits(state.lo) == _bits(snapshot[1])
  assert _bits(state.mu) != _bits(snapshot[2])


def _float64_adamw(p0, grads, lr, wd, mask=None):
  keys = sorted(p0)
  flat = np.concatenate([np.ravel(p0[k]) for k in keys])
  gflat = np.stack([np.concatenate([np.ravel(g[k]) for k in keys]) for g in grads])
  m = None if mask is None else np.concatenate([np.full(np.size(p0[k]), mask[k]) for k in keys])
  out = ref.adamw_trajectory(flat, gflat, np.full(len(grads), lr), weight_decay=wd, decay_mask=m)
  res, i = {}, 0
  for k in keys:
    res[k] = out[i:i + np.size(p0[k])].reshape(np.shape(p0[k]))
    i += np.size(p0[k])
  return res


def _rel_err(x, want, p0):
  keys = sorted(want)
  cat = lambda t: np.concatenate([np.ravel(np.asarray(t[k], np.float64)) for k in keys])
  moved = np.linalg.norm(cat(want) - cat(p0))
  assert moved > 1e-3, "the reference barely moved: the comparison would be vacuous"
  return float(np.linalg.norm(cat(x) - cat(want)) / moved)


@pytest.mark.parametrize("mode", co.MODES)
def test_weight_decay_mask_is_applied_exactly_where_asked(mode):
  """Masked-out gains at 1.0 with zero gradient stay exactly 1.0 (lo 0); the
  decayed matrix tracks float64 AdamW with the same mask; naive bf16 does not."""
  rng = np.random.default_rng(2)
  p0 = {"gain": np.ones(16), "keep": np.ones(16), "w": _round(rng.normal(0, 0.5, (8, 8)), BF16)}
  grads = [{"gain": _round(0.5 + rng.normal(0, 1, 16), BF16), "keep": np.zeros(16),
            "w": _round(rng.normal(0, 1, (8, 8)), BF16)} for _ in range(150)]
  mask = {"gain": True, "keep": False, "w": True}
  dt = {k: BF16 for k in p0}
  tx = co.adamw(LR, weight_decay=0.5, mask=mask, mode=mode)
  params, state = _run_plain(tx, _tree(p0, dt), [_tree(g, dt) for g in grads])
  assert _bits((params["keep"], state.lo["keep"])) == _bits(
      (jnp.ones(16, BF16), jnp.zeros(16, state.lo["keep"].dtype)))
  want = _float64_adamw(p0, grads, LR, 0.5, mask)
  naive, _ = _run_plain(optax.adamw(LR, weight_decay=0.5, mask=mask), _tree(p0, dt), [_tree(g, dt) for g in grads])
  err = _rel_err(co.master_params(params, state), want, p0)
  naive_err = _rel_err(naive, want, p0)
  # Measured 1.3e-3 / 7.8e-4 / 2.4e-4 (light / plus / full); optax.adamw on bf16: 0.99.
  assert err < 5e-3, f"{mode}: {err:.2e}"
  assert naive_err > 10 * err, f"naive {naive_err:.2e} vs COLLAGE {err:.2e}"


def test_clip_by_global_norm_is_applied_once():
  """``clip_by_global_norm → sgd → compensate`` on bf16 params tracks the same
  chain in float64 (global norms of 20–80 clipped to 1): the scale is applied
  once, nothing is lost. SGD is not scale-invariant, so a doubled or skipped
  clip would show (an error of 50% or more). Measured 8.3e-3, from optax's own
  bfloat16 arithmetic upstream of ``compensate`` (the norm and ``−lr·g/‖g‖``
  rounded to bfloat16, the same way for every element of a step); plain bf16
  params: 0.95."""
  rng = np.random.default_rng(3)
  p0 = {"gain": np.ones(32), "w": _round(rng.normal(0, 0.5, (8, 8)), BF16)}
  grads = [{k: _round(rng.normal(0, 5.0, np.shape(v)), BF16) for k, v in p0.items()} for _ in range(100)]
  lr, clip = 2e-3, 1.0
  want = {k: v.copy() for k, v in p0.items()}
  for g in grads:
    norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
    assert norm > 2 * clip
    for k in want:
      want[k] = want[k] - lr * g[k] * (clip / norm)
  dt = {k: BF16 for k in p0}
  gs = [_tree(g, dt) for g in grads]
  params, state = _run_plain(optax.chain(optax.clip_by_global_norm(clip), optax.sgd(lr), co.compensate()),
                             _tree(p0, dt), gs)
  naive, _ = _run_plain(optax.chain(optax.clip_by_global_norm(clip), optax.sgd(lr)), _tree(p0, dt), gs)
  err, naive_err = _rel_err(co.master_params(params, state), want, p0), _rel_err(naive, want, p0)
  assert err < 2e-2, err
  assert naive_err > 10 * err, (naive_err, err)


@pytest.mark.parametrize("mode", co.MODES)
def test_multisteps_accumulation_nothing_lost_or_double_applied(mode):
  """``MultiSteps(adamw, k=4)`` on bf16 params equals float64 AdamW on the mean
  of every 4 gradients: one Adam step per 4 micro-steps, each applied once."""
  k, micro = 4, 96
  rng = np.random.default_rng(4)
  p0 = {"gain": np.ones(16), "w": _round(rng.normal(0, 0.5, (8, 8)), BF16)}
  grads = [{key: _round(0.5 + rng.normal(0, 1, np.shape(v)), BF16) for key, v in p0.items()} for _ in range(micro)]
  means = [{key: np.mean([g[key] for g in grads[i:i + k]], axis=0) for key in p0} for i in range(0, micro, k)]
  want = _float64_adamw(p0, means, LR, WD)
  dt = {key: BF16 for key in p0}
  tx = optax.MultiSteps(co.adamw(LR, weight_decay=WD, mode=mode), every_k_schedule=k)
  params, state = _run_plain(tx, _tree(p0, dt), [_tree(g, dt) for g in grads])
  assert int(state.gradient_step) == micro // k
  assert int(state.inner_opt_state.count) == micro // k
  err = _rel_err(co.master_params(params, state), want, p0)
  # Measured 1.7e-3 / 1.4e-3 / 5.1e-4 (light / plus / full); optax.adamw on bf16: 0.81.
  assert err < 5e-3, f"{mode}: MultiSteps COLLAGE off float64 by {err:.2e}"
