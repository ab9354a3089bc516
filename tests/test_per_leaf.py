"""Formats per leaf (a name, a pytree prefix of names, a callable), and the audit of frozen leaves.

A tree trained with a different mode per leaf must give, leaf by leaf, bit
for bit what the single-mode optimizer gives that leaf alone (the step of one
leaf never depends on another's storage, only the bias corrections on the
step count): that is the reference here. ``precision_report`` is checked
against the definition of a lost update: an element with ``u ≠ 0`` whose
param did not move.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import collage_optax as co

BF16 = jnp.bfloat16


def _params(seed: int = 0):
  rng = np.random.default_rng(seed)
  return {
    "enc": {"w": jnp.asarray(rng.standard_normal((64, 96)) * 0.02, BF16), "b": jnp.zeros((96,), BF16)},
    "ln": {"scale": jnp.ones((96,), BF16)},
    "head": jnp.asarray(rng.standard_normal((96, 128)) * 0.02, BF16),
    "f32": jnp.asarray(rng.standard_normal((8,)), jnp.float32),
  }


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def _run(tx, params, steps=5):
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  for t in range(steps):
    params, state = step(params, state, _grads(params, t))
  return params, state


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _leaf_alone(mode, params, path):
  """The final master value of one leaf under a single-mode optimizer."""
  final, state = _run(co.adamw(1e-3, weight_decay=0.1, mode=mode), params)
  master = co.master_params(final, state)
  node = master
  for k in path:
    node = node[k]
  return node


SPECS = {
  "prefix tree": ({"enc": "compact", "ln": "exact", "head": "plus", "f32": "light"},
                  {("enc", "w"): "compact", ("enc", "b"): "compact", ("ln", "scale"): "exact", ("head",): "plus"}),
  "callable": (lambda path, p: "full" if "head" in path else "light",
               {("enc", "w"): "light", ("enc", "b"): "light", ("ln", "scale"): "light", ("head",): "full"}),
  "policy": (co.precise_small_leaves("compact", "exact", min_size=4096),
             {("enc", "w"): "compact", ("enc", "b"): "exact", ("ln", "scale"): "exact", ("head",): "compact"}),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_each_leaf_trains_as_its_own_mode_alone(name):
  spec, want = SPECS[name]
  params = _params()
  final, state = _run(co.adamw(1e-3, weight_decay=0.1, mode=spec), params)
  master = co.master_params(final, state)
  for path, mode in want.items():
    got = master
    for k in path:
      got = got[k]
    assert _bits(got) == _bits(_leaf_alone(mode, params, path)), (name, path, mode)
  # float32 leaves follow optax whatever their mode.
  assert _bits(master["f32"]) == _bits(_leaf_alone("plus", params, ("f32",)))


def test_format_overrides_per_leaf():
  params = _params()
  tx = co.adamw(1e-3, mode="plus", nu_format={"enc": "q8", "ln": "f32", "head": None, "f32": None})
  state = tx.init(params)
  assert isinstance(state.nu["enc"]["w"], co.formats.Q8) and state.nu["ln"]["scale"].dtype == jnp.float32
  assert state.nu["head"].dtype == jnp.uint32  # plus's packed mcf
  tx2 = optax.chain(optax.sgd(1e-2), co.compensate(lambda path, p: "exact" if p.ndim == 2 else "mcf"))
  lo = tx2.init(params)[1].lo
  assert lo["enc"]["w"].dtype == jnp.int16 and lo["enc"]["b"].dtype == BF16 and lo["f32"] is None


def test_per_leaf_state_shards_checkpoints_and_exports():
  from jax.sharding import NamedSharding, PartitionSpec

  params = _params()
  tx = co.adamw(1e-3, mode=co.precise_small_leaves("compact"))
  mesh = jax.make_mesh((1,), ("x",))
  sharded = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  state = co.sharded_init(tx, sharded)
  abstract = co.abstract_state(tx, sharded)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  final, state = _run(tx, params)
  master = co.master_params(final, state)
  assert master["enc"]["w"].dtype == jnp.float32 and master["ln"]["scale"].dtype == jnp.float32


def test_unknown_names_are_refused_naming_the_leaf():
  with pytest.raises(ValueError, match=r"unknown mode='heavy'"):
    co.adamw(1e-3, mode={"enc": "heavy"})
  with pytest.raises(ValueError, match=r"leaf \['head'\]: unknown mode='heavy'"):
    co.adamw(1e-3, mode=lambda path, p: "heavy" if "head" in path else "plus").init(_params())
  with pytest.raises(ValueError, match=r"precise_small_leaves: unknown mode"):
    co.precise_small_leaves("heavy")


# ---------------------------------------------------------------------------
# The audit.
# ---------------------------------------------------------------------------


def _late_cosine(steps=120):
  """A schedule late in its cosine: updates of ~1e-5, far below half an ulp of a 1.0 gain (2**-9)."""
  return lambda count: 2e-5 * (1 + jnp.cos(jnp.pi * (0.8 + 0.2 * count / steps))) / 2 + 1e-6


def test_the_audit_names_the_frozen_gains_of_a_naive_bf16_run_and_none_under_ours():
  params = _params()
  naive = optax.chain(optax.adamw(_late_cosine(), weight_decay=0.0), co.measure_precision())
  _, state = _run(naive, params, steps=30)
  report = co.precision_report(state)
  assert "['ln']['scale']" in report.frozen
  assert report.leaves["['ln']['scale']"].lost_fraction == 1.0 and report.leaves["['ln']['scale']"].edq == 0.0
  assert "['ln']['scale']" in str(report) and "frozen" in str(report)
  for mode in ("plus", "exact"):
    _, state = _run(co.adamw(_late_cosine(), weight_decay=0.0, mode=mode, track_metrics=True), params, steps=30)
    report = co.precision_report(state)
    assert report.frozen == [], (mode, report)
    assert report.leaves["['ln']['scale']"].edq == pytest.approx(1.0, abs=2.0**-7)
    assert "no frozen leaf" in str(report)


def test_the_window_is_the_definition():
  """Per leaf: ``lost = Σ_t d^(T−t)·#lost_t / Σ_t d^(T−t)·#moved_t`` over the steps, recomputed from the params."""
  params = {"a": jnp.ones((4,), BF16), "b": jnp.asarray([1.0, 2.0, 4.0, 8.0], BF16)}
  tx = optax.chain(optax.sgd(1.0), co.measure_precision())
  state = tx.init(params)
  lost = moved = 0.0
  p = params
  for t, size in enumerate([1e-4, 1.0, 1e-4, 1e-4]):
    g = {"a": jnp.full((4,), -size, BF16), "b": jnp.full((4,), -size, BF16)}
    u, state = tx.update(g, state, p)
    new = optax.apply_updates(p, u)
    d = np.asarray(new["a"], np.float64) - np.asarray(p["a"], np.float64)
    uu = np.asarray(u["a"], np.float64)
    lost = co.precision.WINDOW_DECAY * lost + np.sum((uu != 0) & (d == 0))
    moved = co.precision.WINDOW_DECAY * moved + np.sum(uu != 0)
    p = new
  report = co.precision_report(state)
  assert report.leaves["['a']"].lost_fraction == pytest.approx(lost / moved, rel=1e-6)


def test_the_audit_needs_tracked_metrics():
  with pytest.raises(ValueError, match="track_metrics=True"):
    co.precision_report(co.adamw(1e-3).init(_params()))
