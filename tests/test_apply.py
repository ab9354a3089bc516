"""``collage_optax.apply_gradients``: ``tx.update`` then ``optax.apply_updates``, bit for bit, for every transformation.

The reference is the two optax calls themselves, jitted as a user writes them.
The kernel path (compact and lean leaves on GPU and TPU, where the kernel
writes the new params) is checked in interpret mode in ``test_pallas.py``
(``test_adamw_plumbing``), and its compiled bytes there too.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import collage_optax as co
from collage_optax import apply

BF16 = jnp.bfloat16


def _params():
  rng = np.random.default_rng(0)
  return {
    "w": jnp.asarray(rng.standard_normal((8, 96)), BF16),
    "odd": jnp.asarray(rng.standard_normal((3, 45)), BF16),
    "gain": jnp.ones((40,), BF16),
    "f32": jnp.asarray(rng.standard_normal(12), jnp.float32),
    "step": jnp.arange(3, dtype=jnp.int32),
    "none": None,
  }


def _grads(p, i, adversarial=False):
  rng = np.random.default_rng(100 + i)
  g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 1e-2, x.dtype), p)
  if "step" in p:
    g["step"] = jnp.zeros(3, jnp.int32)
  if adversarial:
    g["w"] = g["w"].at[0, :4].set(jnp.asarray([np.nan, np.inf, -np.inf, 3e38], BF16))
  return g


@jax.jit(static_argnums=0)
def _two_calls(tx, g, s, p):
  u, s = tx.update(g, s, p)
  return optax.apply_updates(p, u), s


def _assert_bits(got, want):
  got_l, want_l = jax.tree.leaves(got), jax.tree.leaves(want)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for k, w in zip(got_l, want_l):
    k, w = np.asarray(k), np.asarray(w)
    assert k.dtype == w.dtype and k.shape == w.shape
    np.testing.assert_array_equal(k.view(f"u{k.dtype.itemsize}"), w.view(f"u{w.dtype.itemsize}"))


def _run(tx, steps=3, adversarial=False, floats_only=False):
  """``steps`` jitted steps of ``apply_gradients`` and of the two optax calls, from the same params and state."""
  p = _params()
  if floats_only:  # optax.clip_by_global_norm cannot take integer leaves
    p = {k: v for k, v in p.items() if k not in ("step", "none")}
  s = tx.init(p)
  fused = jax.jit(functools.partial(co.apply_gradients, tx))
  for i in range(steps):
    g = _grads(p, i, adversarial and i == 1)
    got = fused(g, s, p)
    _assert_bits(got, _two_calls(tx, g, s, p))
    p, s = got
  return p, s


@pytest.mark.parametrize("mode", co.MODES)
def test_adamw_every_mode(mode):
  """Every mode over a tree of every leaf kind (bf16 matrices and vectors, float32, int32, ``None``), a
  schedule, a weight-decay mask, and a step with NaN, ±inf and a gradient whose square overflows."""
  tx = co.adamw(
    optax.linear_schedule(3e-3, 1e-4, 3), weight_decay=0.1, mask=lambda p: {k: k != "gain" for k in p}, mode=mode
  )
  assert apply.fused_step(tx) is not None  # adamw's own step, not the two calls
  start = np.asarray(_params()["w"], np.float32)
  p, _ = _run(tx, adversarial=True)
  w = np.asarray(p["w"], np.float32)
  assert np.isnan(w[0, :3]).all()  # NaN and ±inf gradients poison their elements only
  assert np.isfinite(w[0, 3]) and w[0, 3] < start[0, 3]  # a gradient whose square overflows still descends
  assert np.isfinite(w[1:]).all() and np.isfinite(w[0, 4:]).all()


@pytest.mark.parametrize(
  "make",
  [
    lambda: co.adamw(1e-3, mode=co.precise_small_leaves("compact"), nesterov=True, track_metrics=True),
    lambda: optax.chain(optax.lion(1e-4), co.compensate()),
    lambda: optax.inject_hyperparams(co.adamw)(learning_rate=1e-3, mode="lean"),
    lambda: optax.apply_if_finite(co.adamw(1e-3, mode="compact"), 3),
    lambda: optax.adamw(1e-3),
  ],
  ids=["per_leaf_modes_metrics", "lion_compensate", "inject_hyperparams", "apply_if_finite", "optax_adamw"],
)
def test_any_transformation(make):
  """adamw with per-leaf modes and metrics, and transformations that wrap or replace it: the two calls."""
  _run(make(), adversarial=True)


def test_chain_ending_in_adamw_is_one_step():
  """``collage_optax.chain``: ``optax.chain``'s state and updates, and ``apply_gradients`` one step (the links
  before adamw, then adamw's own step): the bits of ``optax.chain`` with the two calls."""
  links = lambda: (optax.clip_by_global_norm(1e-2), co.adamw(1e-3, mode="compact"))
  tx, reference = co.chain(*links()), optax.chain(*links())
  assert apply.fused_step(tx) is not None and apply.fused_step(co.chain(optax.sgd(1e-2))) is None
  p = _params()
  assert jax.tree.structure(tx.init(p)) == jax.tree.structure(reference.init(p))
  _run(tx, adversarial=True, floats_only=True)
  _assert_bits(_run(tx, floats_only=True), _run(reference, floats_only=True))


def test_an_update_that_cannot_be_a_weak_key():
  """A transformation whose ``update`` is an unhashable callable object: the two calls, no error."""

  @dataclasses.dataclass
  class Scale:
    factor: float

    def __call__(self, updates, state, params=None):
      return jax.tree.map(lambda u: self.factor * u, updates), state

  tx = optax.GradientTransformation(lambda p: optax.EmptyState(), Scale(-0.5))
  p = {"w": jnp.ones(3)}
  new, _ = co.apply_gradients(tx, {"w": jnp.ones(3)}, tx.init(p), p)
  np.testing.assert_array_equal(np.asarray(new["w"]), 0.5)


def test_extra_args_reach_update():
  """Keyword arguments go to ``tx.update``, as in ``optax.GradientTransformationExtraArgs``."""
  seen = []

  def update(updates, state, params=None, *, loss):
    seen.append(loss)
    return updates, state

  scaler = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  tx = optax.chain(scaler, co.adamw(1e-3, mode="compact"))
  p = _params()
  new_p, _ = co.apply_gradients(tx, _grads(p, 0), tx.init(p), p, loss=jnp.float32(2.5))
  assert seen == [2.5] and new_p["w"].dtype == BF16


def test_needs_params():
  """adamw's fused step, like its update, names what is missing."""
  tx = co.adamw(1e-3, mode="compact")
  p = _params()
  with pytest.raises(ValueError, match="params"):
    co.apply_gradients(tx, _grads(p, 0), tx.init(p), None)


@pytest.mark.parametrize("mode", ["plus", "compact", "lean"])
def test_donated_step_costs_what_the_two_calls_cost_on_cpu(mode):
  """On CPU (the jnp path) adamw's fused step compiles, params and state donated, to the two calls' program:
  the same copies of donated arrays (none for plus) and the same bytes accessed."""
  tx = co.adamw(1e-3, mode=mode)
  p = {"w": jax.ShapeDtypeStruct((512, 512), BF16)}
  s = jax.eval_shape(tx.init, p)

  def compiled(step):
    c = jax.jit(step, donate_argnums=(0, 1)).lower(p, s, p).compile()
    copies = sum(" copy(" in line and "512,512" in line for line in c.as_text().splitlines())
    return copies, c.cost_analysis()["bytes accessed"]

  fused = compiled(lambda p, s, g: co.apply_gradients(tx, g, s, p))
  assert fused == compiled(lambda p, s, g: _two_calls(tx, g, s, p))
  assert mode != "plus" or fused[0] == 0
