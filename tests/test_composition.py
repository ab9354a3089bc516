"""COLLAGE inside optax's combinators.

``collage_optax.adamw`` and ``compensate()`` inside ``optax.chain``,
``inject_hyperparams``, ``masked``/``multi_transform``, ``MultiSteps``,
``apply_if_finite``, with ``clip_by_global_norm`` and after ``lion`` and
``sgd(momentum=...)``.

The reference is optax itself: the same combinator around the plain optax
optimizer, run on float32 copies of the params with the same (bfloat16-valued)
gradients. ``master_params`` of the bfloat16 run must track it to within what
bfloat16 MCF arithmetic allows, and the naive run (the same optax chain on the
bfloat16 params) must be far off, so that the check has teeth: the setup (gains
at 1.0, ``lr = 1e-3``) is one where plain bfloat16 rounds most updates away.
``clip_by_global_norm → sgd → compensate`` is checked against the same chain in
float64 (numpy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import collage_optax as co
from collage_optax import alias as co_alias
import reference as R
import strategies as S

BF16 = jnp.bfloat16
STEPS = 120
LR = 1e-3
WD = 1e-4
DTYPES = {"gain": BF16, "w": BF16, "b": jnp.float32}  # a mixed tree: fp32 leaves pass through.


def _stream():
  """Initial params and a fixed gradient stream, every leaf bfloat16-valued, in float64."""
  return S.gradient_stream({"gain": BF16, "w": BF16, "b": BF16}, STEPS)


def _cast(tree, dtypes):
  """``tree`` as jax arrays: ``dtypes`` a dtype, or a dict of dtypes per key."""
  pick = (lambda k: dtypes[k]) if isinstance(dtypes, dict) else (lambda k: dtypes)
  return {k: jnp.asarray(v, pick(k)) for k, v in tree.items()}


def _run(tx, dtypes, grads=None, *, params0=None, on_step=None, check_dtypes=True):
  """Trains with ``tx`` from ``params0`` (the stream's params by default); returns (params, state).

  ``on_step(i, params, state, updates, grads) -> state or None`` may inspect
  every step and replace the state (e.g. to change a hyperparameter).
  ``check_dtypes``: assert that the updates have the gradients' dtypes (plain
  optax under ``inject_hyperparams`` does not: float32 hyperparameters promote).
  """
  p0, stream = _stream()
  params = _cast(p0 if params0 is None else params0, dtypes)
  state = tx.init(params)

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, u

  for i, g in enumerate(stream if grads is None else grads):
    g = _cast(g, dtypes)
    new_params, state, u = step(params, state, g)
    if check_dtypes:
      _assert_dtypes_like(u, g)
    if on_step is not None:
      state = on_step(i, params, new_params, state) or state
    params = new_params
  return params, state


def _assert_dtypes_like(updates, grads):
  got = jax.tree.map(lambda x: jnp.dtype(x.dtype), updates)
  want = jax.tree.map(lambda x: jnp.dtype(x.dtype), grads)
  assert got == want, f"updates have dtypes {got}, the gradients {want}"


def _flat64(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _rel_err(x, ref) -> float:
  """``||x − ref|| / ||ref − p0||``: error relative to how far the reference moved."""
  p0 = {k: v for k, v in _stream()[0].items() if k in ref}
  moved = np.linalg.norm(_flat64(ref) - _flat64(p0))
  assert moved > 0.05, "the reference barely moved: the comparison would be vacuous"
  return float(np.linalg.norm(_flat64(x) - _flat64(ref)) / moved)


def _assert_tracks(ours_params, ours_state, ref_params, naive_params, tol):
  """COLLAGE's ``hi + lo`` within ``tol`` of the fp32 reference; naive bf16 ≥ 20× worse."""
  err = _rel_err(co.master_params(ours_params, ours_state), ref_params)
  naive = _rel_err(naive_params, ref_params)
  assert err < tol, f"COLLAGE off the fp32 reference by {err:.2e} (tol {tol:.0e})"
  assert naive > 20 * err, f"naive bf16 {naive:.2e} vs COLLAGE {err:.2e}: the setup does not discriminate"
  for k in ours_params:
    assert ours_params[k].dtype == DTYPES[k], f"param {k} changed dtype to {ours_params[k].dtype}"
  return err, naive


_REF_CACHE: dict = {}


def _reference(name: str, make_tx, dtypes=jnp.float32, **kw):
  """The plain-optax run (cached: several tests share a reference)."""
  key = (name, str(dtypes))
  if key not in _REF_CACHE:
    _REF_CACHE[key] = _run(make_tx(), dtypes, check_dtypes=False, **kw)[0]
  return _REF_CACHE[key]


def _optax_adamw():
  return optax.adamw(LR, weight_decay=WD)


# ---------------------------------------------------------------------------
# chain, clip_by_global_norm, lion, sgd(momentum)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode,tol", [("light", 8e-3), ("plus", 5e-3), ("full", 5e-3), ("exact", 4e-3), ("compact", 2e-2)])
def test_chain_with_clip_by_global_norm_tracks_fp32_optax(mode, tol):
  p0, stream = _stream()
  assert all(np.sqrt(sum(np.sum(v**2) for v in g.values())) > 2.0 for g in stream), "clipping must act"
  make_ref = lambda: optax.chain(optax.clip_by_global_norm(1.0), _optax_adamw())
  ours = _run(optax.chain(optax.clip_by_global_norm(1.0), co.adamw(LR, weight_decay=WD, mode=mode)), DTYPES)
  err, _ = _assert_tracks(*ours, _reference("clip+adamw", make_ref), _reference("clip+adamw", make_ref, DTYPES), tol)
  print(f"{mode}: {err:.2e}")


def test_clip_by_global_norm_before_sgd_and_compensate_is_applied_once():
  """``clip_by_global_norm → sgd → compensate`` on bf16 params tracks the same
  chain in float64 (global norms of 20–80 clipped to 1): the scale is applied
  once, nothing is lost. SGD is not scale-invariant, so a doubled or skipped
  clip would show (an error of 50% or more). Measured 8.3e-3, from optax's own
  bfloat16 arithmetic upstream of ``compensate`` (the norm and ``−lr·g/‖g‖``
  rounded to bfloat16, the same way for every element of a step); plain bf16
  params: 0.95."""
  rng = np.random.default_rng(3)
  as_bf16 = lambda x: R.bf16(x).astype(np.float64)
  p0 = {"gain": np.ones(32), "w": as_bf16(rng.normal(0, 0.5, (8, 8)))}
  grads = [{k: as_bf16(rng.normal(0, 5.0, np.shape(v))) for k, v in p0.items()} for _ in range(100)]
  lr, clip = 2e-3, 1.0
  want = {k: v.copy() for k, v in p0.items()}
  for g in grads:
    norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
    assert norm > 2 * clip
    for k in want:
      want[k] = want[k] - lr * g[k] * (clip / norm)
  params, state = _run(optax.chain(optax.clip_by_global_norm(clip), optax.sgd(lr), co.compensate()),
                       BF16, grads, params0=p0)
  naive, _ = _run(optax.chain(optax.clip_by_global_norm(clip), optax.sgd(lr)), BF16, grads, params0=p0,
                  check_dtypes=False)
  moved = np.linalg.norm(_flat64(want) - _flat64(p0))
  assert moved > 1e-3, "the reference barely moved: the comparison would be vacuous"
  err, naive_err = (float(np.linalg.norm(_flat64(x) - _flat64(want)) / moved)
                    for x in (co.master_params(params, state), naive))
  assert err < 2e-2, err
  assert naive_err > 10 * err, (naive_err, err)


@pytest.mark.parametrize(
    "name,make_inner,tol",
    [
        ("lion", lambda: optax.lion(1e-4), 2e-2),
        ("sgd_momentum", lambda: optax.sgd(1e-4, momentum=0.9), 2e-2),
    ],
)
@pytest.mark.parametrize("fmt", ["mcf", "exact", "compact"])
def test_compensate_after_optimizer_tracks_fp32_optax(name, make_inner, tol, fmt):
  ours = _run(optax.chain(make_inner(), co.compensate(param_format=fmt)), DTYPES)
  # compact's residual unit is ulp(θ)/254 (3e-5 at |θ| ~ 1), a third of lion's ±1e-4 steps:
  # its rounding is a random walk of ~15% of a step (measured 3.9e-2; mcf 1.4e-2).
  tol = 3 * tol if fmt == "compact" else tol
  err, _ = _assert_tracks(*ours, _reference(name, make_inner), _reference(name, make_inner, DTYPES), tol)
  print(f"{name} + compensate({fmt!r}): {err:.2e}")


# ---------------------------------------------------------------------------
# inject_hyperparams
# ---------------------------------------------------------------------------


def _set_lr(at: int, lr: float):
  def on_step(i, params, new_params, state):
    if i == at:
      hp = dict(state.hyperparams)
      hp["learning_rate"] = jnp.asarray(lr, hp["learning_rate"].dtype)
      return state._replace(hyperparams=hp)
    return None
  return on_step


def test_inject_hyperparams_learning_rate_change_takes_effect():
  half = STEPS // 2
  make_ref = lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=LR, weight_decay=WD)
  ref = _run(make_ref(), jnp.float32, on_step=_set_lr(half, 4 * LR), check_dtypes=False)[0]
  naive = _run(make_ref(), DTYPES, on_step=_set_lr(half, 4 * LR), check_dtypes=False)[0]
  # Mixed tree: inject_hyperparams makes the hyperparameters float32 arrays.
  tx = optax.inject_hyperparams(co.adamw)(learning_rate=LR, weight_decay=WD)
  params, state = _run(tx, DTYPES, on_step=_set_lr(half, 4 * LR))
  assert state.hyperparams["learning_rate"].dtype == jnp.float32
  err, _ = _assert_tracks(params, state, ref, naive, 5e-3)
  # The change took effect: the run that keeps lr is far from the one that changed it.
  unchanged = _reference("adamw", _optax_adamw)
  assert _rel_err(unchanged, ref) > 20 * err


def test_inject_hyperparams_zero_learning_rate_freezes_hi_and_lo():
  """After lr := 0 no step may move ``θ`` or its low component, bit for bit."""
  snapshots = []

  def on_step(i, params, new_params, state):
    if i >= 20:
      snapshots.append((new_params, state.inner_state.lo))
    return _set_lr(10, 0.0)(i, params, new_params, state)

  tx = optax.inject_hyperparams(co.adamw, hyperparam_dtype=jnp.float32)(learning_rate=LR)
  _run(tx, BF16, _stream()[1][:40], on_step=on_step)
  (p_first, lo_first), rest = snapshots[0], snapshots[1:]
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(lo_first)), "lo never moved"
  for p, lo in rest:
    for a, b in zip(jax.tree.leaves((p_first, lo_first)), jax.tree.leaves((p, lo))):
      np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


def test_inject_hyperparams_with_bf16_hyperparameters_is_refused():
  """All-bf16 params make inject_hyperparams cast b2=0.999 to bf16, i.e. 1.0."""
  p0, _ = _stream()
  tx = optax.inject_hyperparams(co.adamw)(learning_rate=LR)
  with pytest.raises(TypeError, match="hyperparam_dtype=jnp.float32"):
    tx.init(_cast(p0, BF16))
  # The fix the message names works, and b2 really is 0.999 (not 1.0) then.
  tx = optax.inject_hyperparams(co.adamw, hyperparam_dtype=jnp.float32)(learning_rate=LR)
  state = tx.init(_cast(p0, BF16))
  assert float(state.hyperparams["b2"]) == pytest.approx(0.999, rel=1e-7)


# ---------------------------------------------------------------------------
# masked / multi_transform
# ---------------------------------------------------------------------------


def test_multi_transform_merges_lo_of_several_compensate_states():
  labels = {"gain": "adamw", "w": "lion", "b": "adam"}
  ours_tx = optax.multi_transform(
      {"adamw": co.adamw(LR, weight_decay=WD),
       "lion": optax.chain(optax.lion(1e-4), co.compensate()),
       "adam": optax.adam(LR)},
      labels)
  make_ref = lambda: optax.multi_transform(
      {"adamw": _optax_adamw(), "lion": optax.lion(1e-4), "adam": optax.adam(LR)}, labels)
  params, state = _run(ours_tx, DTYPES)
  ref = _reference("multi", make_ref)
  _assert_tracks(params, state, ref, _reference("multi", make_ref, DTYPES), 2e-2)
  # Two residual-keeping states (adamw's AdamWState, the lion chain's
  # CompensateState), each holding lo for its own bf16 leaf only.
  kinds = (co.CompensateState, co_alias.AdamWState)
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds)) if isinstance(s, kinds)]
  assert sorted(type(s).__name__ for s in found) == ["AdamWState", "CompensateState"]
  owners = {type(s).__name__: sorted(k for k, lo in s.lo.items()
                                     if not isinstance(lo, optax.MaskedNode) and lo is not None)
            for s in found}
  assert owners == {"AdamWState": ["gain"], "CompensateState": ["w"]}
  master = co.master_params(params, state)
  # hi + lo of every bf16 leaf, each from its own state, is much closer than hi
  # alone. The lion leaf's floor is optax's own bf16 momentum, whose sign flips
  # make the run chaotic (measured master/hi ratio 1/4.9 to 1/5.6 across grow
  # variants), so it gets a factor 4; the adamw leaf keeps 5.
  for k, factor in (("gain", 5), ("w", 4)):
    assert _rel_err({k: master[k]}, {k: ref[k]}) < _rel_err({k: params[k]}, {k: ref[k]}) / factor
  # The fp32 leaf went through optax.adam untouched: equal to the reference.
  np.testing.assert_allclose(np.asarray(params["b"]), np.asarray(ref["b"]), rtol=1e-6, atol=1e-7)


def test_masked_chain_bf16_via_collage_fp32_via_optax():
  bf16_mask = {"gain": True, "w": True, "b": False}
  fp32_mask = {k: not v for k, v in bf16_mask.items()}
  ours_tx = optax.chain(optax.masked(co.adamw(LR, weight_decay=WD), bf16_mask),
                        optax.masked(optax.adam(LR), fp32_mask))
  make_ref = lambda: optax.chain(optax.masked(_optax_adamw(), bf16_mask),
                                 optax.masked(optax.adam(LR), fp32_mask))
  params, state = _run(ours_tx, DTYPES)
  ref = _reference("masked", make_ref)
  _assert_tracks(params, state, ref, _reference("masked", make_ref, DTYPES), 5e-3)
  np.testing.assert_allclose(np.asarray(params["b"]), np.asarray(ref["b"]), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# MultiSteps
# ---------------------------------------------------------------------------


def test_multisteps_applies_once_per_k_and_tracks_fp32_optax():
  k = 4
  moved_at = []

  def on_step(i, params, new_params, state):
    moved = any(np.any(np.asarray(a) != np.asarray(b))
                for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)))
    moved_at.append((i, moved, int(state.gradient_step)))

  make_ref = lambda: optax.MultiSteps(_optax_adamw(), every_k_schedule=k)
  params, state = _run(optax.MultiSteps(co.adamw(LR, weight_decay=WD), every_k_schedule=k),
                       DTYPES, on_step=on_step)
  for i, moved, gradient_step in moved_at:
    boundary = (i + 1) % k == 0
    assert gradient_step == (i + 1) // k
    # Adam moves the fp32 leaf on every real step; nothing moves in between.
    assert moved == boundary, f"micro-step {i}: params moved={moved}, every_k={k}"
  _assert_tracks(params, state, _reference("multisteps", make_ref),
                 _reference("multisteps", make_ref, DTYPES), 5e-3)


def test_multisteps_low_component_only_changes_on_boundaries():
  k = 3
  los = []
  tx = optax.MultiSteps(co.adamw(LR), every_k_schedule=k)

  def on_step(i, params, new_params, state):
    los.append(np.asarray(co.master_params(new_params, state)["gain"]))

  _run(tx, DTYPES, _stream()[1][:12], on_step=on_step)
  for i in range(1, 12):
    changed = np.any(los[i] != los[i - 1])
    assert changed == ((i + 1) % k == 0), f"micro-step {i}: hi+lo changed={changed}"


# ---------------------------------------------------------------------------
# apply_if_finite
# ---------------------------------------------------------------------------


def test_apply_if_finite_nan_step_changes_nothing_then_training_continues(tree_bits):
  bad = 7
  _, stream = _stream()
  grads = [dict(g) for g in stream]
  grads[bad]["w"] = grads[bad]["w"].copy()
  grads[bad]["w"][2, 3] = np.nan
  seen = {}

  def on_step(i, params, new_params, state):
    if i in (bad - 1, bad):
      seen[i] = (params, new_params, state)

  tx = optax.apply_if_finite(co.adamw(LR, weight_decay=WD), max_consecutive_errors=3)
  params, state = _run(tx, DTYPES, grads, on_step=on_step)
  before_params, after_params, after_state = seen[bad]
  _, _, before_state = seen[bad - 1]
  assert tree_bits(after_params) == tree_bits(before_params)
  assert tree_bits(after_state.inner_state) == tree_bits(before_state.inner_state)
  assert not bool(after_state.last_finite) and int(after_state.total_notfinite) == 1
  assert int(state.notfinite_count) == 0 and bool(state.last_finite)
  # Training continued as if the bad step had never been: bit for bit.
  skipped = grads[:bad] + grads[bad + 1:]
  params_skip, state_skip = _run(co.adamw(LR, weight_decay=WD), DTYPES, skipped)
  # Every COLLAGE op is explicitly rounded, so the bf16 leaves and their low
  # components are bit-identical; the fp32 leaf is plain fp32 arithmetic, which
  # XLA compiles differently inside apply_if_finite's lax.cond (a last-bit matter).
  master, master_skip = co.master_params(params, state), co.master_params(params_skip, state_skip)
  for k in ("gain", "w"):
    assert tree_bits((params[k], master[k])) == tree_bits((params_skip[k], master_skip[k])), k
  np.testing.assert_allclose(np.asarray(params["b"]), np.asarray(params_skip["b"]), rtol=1e-6, atol=1e-8)
  ref = _run(_optax_adamw(), jnp.float32, skipped, check_dtypes=False)[0]
  naive = _run(_optax_adamw(), DTYPES, skipped, check_dtypes=False)[0]
  _assert_tracks(params, state, ref, naive, 5e-3)


# ---------------------------------------------------------------------------
# dtypes: updates have the gradients' dtypes in every combination. The runs
# above check it on every step; these are the nestings they do not cover.
# ---------------------------------------------------------------------------

COMBOS = {
    "inject_schedule": lambda: optax.inject_hyperparams(co.adamw, hyperparam_dtype=jnp.float32)(
        learning_rate=optax.cosine_decay_schedule(LR, 100), weight_decay=0.1),
    "apply_if_finite_inject": lambda: optax.apply_if_finite(
        optax.inject_hyperparams(co.adamw)(learning_rate=LR, mode="full"), max_consecutive_errors=2),
    "multisteps_inject": lambda: optax.MultiSteps(
        optax.inject_hyperparams(co.adamw)(learning_rate=LR, mode="light"), every_k_schedule=2),
    "multi_transform_masked_decay": lambda: optax.multi_transform(
        {"c": co.adamw(LR, mask={"gain": False, "w": True, "b": False}), "o": optax.adam(LR)},
        {"gain": "c", "w": "c", "b": "o"}),
}


@pytest.mark.parametrize("name", sorted(COMBOS))
def test_update_dtypes_equal_grad_dtypes(name):
  _, stream = _stream()
  params, state = _run(COMBOS[name](), DTYPES, stream[:3])  # _run asserts dtypes every step
  assert jax.tree.map(lambda x: x.dtype, params) == {k: jnp.dtype(v) for k, v in DTYPES.items()}
  assert np.all(np.isfinite(_flat64(co.master_params(params, state))))


def test_scale_by_adam_takes_gradients_wider_than_the_params():
  """bfloat16 params with float32 gradients (cast up before the optimizer), as optax.scale_by_adam
  allows: the moments keep the params' formats and the first step is Adam's g / (|g| + eps), from
  the stored bfloat16 m = 0.1·g (2**-8 relative) and the MCF v (2**-16)."""
  params = {"w": jnp.ones((3,), jnp.bfloat16)}
  grads = {"w": jnp.asarray([0.5, -2.0, 1e-3], jnp.float32)}
  tx = co.scale_by_adam()
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert updates["w"].dtype == jnp.float32
  g = np.asarray(grads["w"], np.float64)
  np.testing.assert_allclose(np.asarray(updates["w"]), g / (np.abs(g) + 1e-8), rtol=2.0**-8 + 2.0**-15)
  assert state.mu["w"].dtype == jnp.bfloat16 and state.nu["w"].dtype == jnp.uint32
