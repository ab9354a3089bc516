"""``init_from_master``: full-precision params and optax's moments into a COLLAGE state, and back.

fp32 → ours → ``master_params`` is the identity bit for bit in the ``exact``
format (normal numbers; a ``−0.0`` lands on ``+0.0`` as under ``apply_updates``,
and XLA:CPU flushes float32 subnormals) and within the format's precision otherwise: ``mcf`` keeps
``hi + lo`` with ``lo = round(x − hi)``, an error of at most half an ulp of
``lo`` (``2**-8·|x − hi| ≤ 2**-16·|x|``); ``compact`` at most ``ulp(hi)/508``
(half a code of ``ulp(hi)/254``). The moments come back within their
format's rounding (checked against ml_dtypes' bfloat16 for ``bf16``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import collage_optax as co
from collage_optax import formats

F32 = jnp.float32


def _master(seed: int = 0):
  rng = np.random.default_rng(seed)
  return {
    "w": jnp.asarray(rng.standard_normal((16, 64)) * np.exp(rng.uniform(-20, 20, (16, 64))), F32),
    "gain": jnp.asarray(1 + 1e-5 * rng.standard_normal(64), F32),
    "bias": jnp.asarray([0.0, -0.0, 1e-30, -3e-39, 65504.0, 3e38, -1.5, 2.0**-126], F32),
  }


def _same_bits(got, want) -> bool:
  """Bit for bit where ``want`` is a normal float32 (or ±inf); within it where subnormal or zero.

  A ``−0.0`` lands on ``+0.0`` (as under ``apply_updates``) and XLA:CPU flushes float32 subnormals.
  """
  got, want = np.asarray(got), np.asarray(want)
  normal = ~(np.abs(want.astype(np.float64)) < 2.0**-126)
  tiny_ok = np.abs(got.astype(np.float64))[~normal] <= np.abs(want.astype(np.float64))[~normal]
  return bool(np.array_equal(got.view(np.uint32)[normal], want.view(np.uint32)[normal]) and np.all(tiny_ok))


def _ulp_bf16(x: np.ndarray) -> np.ndarray:
  hi = np.abs(x.astype(ml_dtypes.bfloat16).astype(np.float64))
  e = np.floor(np.log2(np.maximum(hi, 2.0**-126)))
  return 2.0 ** (e - 7)


@pytest.mark.parametrize("mode", co.MODES)
def test_round_trip_of_the_params(mode):
  master = _master()
  params, state = co.init_from_master(co.adamw(1e-3, mode=mode), master)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  back = co.master_params(params, state)
  for k, x in master.items():
    x64, got = np.asarray(x, np.float64), np.asarray(back[k], np.float64)
    if mode == "exact":
      assert _same_bits(back[k], x), k
      continue
    # The first component is the nearest bfloat16 (ml_dtypes), the rest in the residual.
    hi = x64.astype(ml_dtypes.bfloat16).astype(np.float64)
    finite = np.isfinite(hi) & ~(np.abs(x64) < 2.0**-126)
    assert np.array_equal(np.asarray(params[k], np.float64)[finite], hi[finite]), k
    bound = 2.0**-8 * np.abs(x64 - hi) if co.PRESETS[mode][0] != "compact" else _ulp_bf16(x64) / 508
    # float32 subnormals are flushed by XLA:CPU's arithmetic: there the residual may be lost (< 2**-126).
    assert np.all(np.abs(got - x64)[finite] <= bound[finite] + 2.0**-126), (k, mode)


@pytest.mark.parametrize("mode", co.MODES)
def test_the_moments_and_count_of_an_optax_state(mode):
  master = _master(1)
  rng = np.random.default_rng(2)
  opt = optax.adamw(1e-3)
  ostate = opt.init(master)
  for _ in range(3):
    g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), F32), master)
    _, ostate = opt.update(g, ostate, master)
  adam = ostate[0]
  tx = co.adamw(1e-3, mode=mode)
  params, state = co.init_from_master(tx, master, ostate)
  assert int(state.count) == int(adam.count) == 3
  for name in ("mu", "nu"):
    for k in master:
      store, want = getattr(state, name)[k], np.asarray(getattr(adam, name)[k], np.float64)
      fmt = formats.moment_format_of(store)
      got = np.asarray(fmt.decode(store), np.float64)
      if fmt.name == "bf16":
        assert np.array_equal(got, want.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64))
      elif fmt.name == "f32":
        assert np.array_equal(got, want)
      elif fmt.name == "mcf":
        assert np.all(np.abs(got - want) <= 2.0**-16 * np.abs(want) + 2.0**-133)
      elif fmt.name == "log16":  # v: within log16_bound, relative, above its group's floor
        rel, floor, tiny = formats.log16_bound()
        s = np.max(want.reshape(*want.shape[:-1], -1, min(32, want.shape[-1])), axis=-1, keepdims=True)
        s = np.broadcast_to(s, (*s.shape[:-1], min(32, want.shape[-1]))).reshape(want.shape)
        assert np.all(got >= want - rel * want - tiny), (k, name)
        assert np.all(got <= np.maximum(want + rel * want + tiny, floor * s)), (k, name)
      else:  # q8: within its bound of the group's largest magnitude
        q = np.abs(want) if name == "mu" else np.sqrt(want)
        s = np.max(q.reshape(*q.shape[:-1], -1, min(32, q.shape[-1])), axis=-1, keepdims=True) * (1 + 2.0**-8)
        err = np.abs(got - want) if name == "mu" else np.abs(np.sqrt(got) - q)
        err = err.reshape(s.shape[:-1] + (-1,))
        assert np.all(err <= formats.q8_bound(name == "nu") * s + 1e-30), (k, name)
  # The state trains on: one more step of each, from the same gradients, stays close.
  u, state = tx.update(jax.tree.map(lambda p: jnp.ones_like(p), params), state, params)
  assert int(state.count) == 4 and all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(u))


def test_exact_resumes_optax_bit_for_bit_with_float32_moments():
  """``mode="exact", mu_format="exact"`` from an optax.adamw fp32 run continues it bit for bit
  (float32 gradients: the exact format is float32 AdamW on the master)."""
  master = _master(3)
  master.pop("bias")  # 3e38 makes optax's own step overflow; the rest is ordinary
  rng = np.random.default_rng(4)
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), F32), master) for _ in range(6)]
  opt = optax.adamw(1e-3, weight_decay=0.1)
  ostate, p32 = opt.init(master), master
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(g, s, p)))
  for g in grads[:3]:
    p32, ostate = step(p32, ostate, g)
  tx = co.adamw(1e-3, weight_decay=0.1, mode="exact", mu_format="exact")
  params, state = co.init_from_master(tx, p32, ostate)
  ours = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  for g in grads[3:]:
    p32, ostate = step(p32, ostate, g)
    params, state = ours(params, state, g)
  back = co.master_params(params, state)
  for k in master:
    assert _same_bits(back[k], p32[k]), k


def test_compensate_chain_and_errors():
  master = _master(5)
  tx = optax.chain(optax.sgd(1e-2), co.compensate(param_format="exact"))
  params, state = co.init_from_master(tx, master)
  back = co.master_params(params, state)
  assert all(_same_bits(back[k], master[k]) for k in master)
  with pytest.raises(ValueError, match=r"optax\.ScaleByAdamState.*opt_state=None"):
    co.init_from_master(co.adamw(1e-3), master, optax.sgd(0.1).init(master))


def test_sharded_round_trip():
  from jax.sharding import NamedSharding, PartitionSpec

  mesh = jax.make_mesh((1,), ("x",))
  sharding = NamedSharding(mesh, PartitionSpec("x"))
  master = jax.device_put(_master(6), sharding)
  params, state = co.init_from_master(co.adamw(1e-3, mode="exact"), master)
  assert all(p.sharding.is_equivalent_to(sharding, p.ndim) for p in jax.tree.leaves(params))
  back = co.master_params(params, state)
  assert all(_same_bits(back[k], master[k]) for k in master)


def test_the_example_resumes_an_fp32_orbax_checkpoint(tmp_path):
  """``examples/resume_from_fp32.py``: orbax save of an fp32 optax.adamw run, restore, import, train on."""
  import json

  import multidevice

  out = multidevice.run_example("resume_from_fp32.py", "--dir", str(tmp_path), devices=1)
  assert "exact import: bit for bit" in out, out
  losses = json.loads((tmp_path / "losses.json").read_text())
  assert losses["exact_import_bit_for_bit"] is True
  for mode in ("exact", "plus", "compact", "fp32"):
    assert losses[mode] < losses["fp32_at_save"], (mode, losses)  # the resumed runs train on
