"""Flax: bf16 models trained with ``collage_optax.adamw`` through NNX and Linen.

NNX: ``nnx.Optimizer(model, collage_optax.adamw(...), wrt=nnx.Param)``; Linen:
``flax.training.train_state.TrainState``. Params are bfloat16, the loss goes
down, params stay bfloat16, the low components live in the optimizer state and
survive ``nnx.Optimizer``'s state handling (``nnx.state`` turns unknown pytree
nodes inside Variables into ``State`` dicts) step after step. In a mixed model
the float32 LayerNorm params have no low component and train exactly like
``optax.adamw``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import collage_optax as co
from collage_optax import formats
from collage_optax.alias import AdamWState

BF16 = jnp.bfloat16
STEPS = 60


def _task(n: int = 128, d: int = 8):
  """A learnable regression: ``y = tanh(x @ w)`` with bf16 inputs."""
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (n, d), jnp.float32)
  y = jnp.tanh(x @ jax.random.normal(kw, (d, 1)) / jnp.sqrt(d))
  return x.astype(BF16), y.astype(BF16)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _unbox(tree):
  return jax.tree.map(lambda v: v.get_value() if _is_var(v) else v, tree, is_leaf=_is_var)


def _adamw_state(opt_state) -> AdamWState:
  """The one ``collage_optax.adamw`` state (count, mu, nu, lo, metrics) in ``opt_state``, unboxed."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, AdamWState))
           if isinstance(s, AdamWState)]
  assert len(found) == 1, f"expected one adamw state, found {len(found)}"
  return _unbox(found[0])


def _dtypes(tree):
  return jax.tree.map(lambda a: jnp.dtype(a.dtype), tree)


def _mcf_lo(tree):
  """The low components of packed ``mcf`` moments (uint32 storage), as bf16 arrays."""
  return jax.tree.map(lambda s: formats.mcf_components(s).lo, tree)


def _nonzero_fraction(tree) -> float:
  leaves = [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]
  return sum(np.count_nonzero(x) for x in leaves) / sum(x.size for x in leaves)


# ---------------------------------------------------------------------------
# NNX
# ---------------------------------------------------------------------------


class _MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, norm_dtype=None):
    self.norm = None if norm_dtype is None else nnx.LayerNorm(8, param_dtype=norm_dtype, dtype=BF16, rngs=rngs)
    self.fc1 = nnx.Linear(8, 32, param_dtype=BF16, dtype=BF16, rngs=rngs)
    self.fc2 = nnx.Linear(32, 1, param_dtype=BF16, dtype=BF16, rngs=rngs)

  def __call__(self, x):
    if self.norm is not None:
      x = self.norm(x)
    return self.fc2(jax.nn.gelu(self.fc1(x)))


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  def loss_fn(m):
    return jnp.mean((m(x).astype(jnp.float32) - y.astype(jnp.float32)) ** 2)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss, grads


def _train_nnx(mode: str):
  """The MLP trained STEPS steps by ``nnx.Optimizer(model, adamw(mode=mode))``: the state keeps its
  structure every step and the loss halves. Returns ``(model, optimizer)``."""
  x, y = _task()
  model = _MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, co.adamw(3e-3, mode=mode, track_metrics=True), wrt=nnx.Param)
  structure0 = jax.tree.structure(optimizer.opt_state)
  losses = []
  for _ in range(STEPS):
    loss, _ = _nnx_step(model, optimizer, x, y)
    losses.append(float(loss))
    assert jax.tree.structure(optimizer.opt_state) == structure0, "the state changed its structure"
  assert losses[-1] < 0.5 * losses[0], losses
  return model, optimizer


def test_nnx_optimizer_trains_bf16_model_and_keeps_low_components():
  model, optimizer = _train_nnx("plus")
  params = nnx.state(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(BF16)}
  adam = _adamw_state(optimizer.opt_state)
  # The low components: bf16, one per param, and in use.
  lo = adam.lo
  shapes = lambda t: jax.tree.map(lambda a: a.shape, t)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), lo) == jax.tree.map(lambda a: (a.shape, a.dtype), _unbox(params))
  assert _nonzero_fraction(lo) > 0.5
  # "plus": a bf16 m, an MCF v (two bf16 packed in a uint32) whose low halves are in use.
  assert shapes(adam.mu) == shapes(adam.nu) == shapes(lo)
  assert set(jax.tree.leaves(_dtypes(adam.mu))) == {jnp.dtype(BF16)}
  assert set(jax.tree.leaves(_dtypes(adam.nu))) == {jnp.dtype(jnp.uint32)}
  assert _nonzero_fraction(_mcf_lo(adam.nu)) > 0.5
  # master_params reads them: hi + lo, off the bf16 params by at most half a bf16 ulp.
  master = co.master_params(params, optimizer.opt_state)
  for p, m, l in zip(jax.tree.leaves(_unbox(params)), jax.tree.leaves(master), jax.tree.leaves(lo)):
    assert m.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(m), np.asarray(p, np.float32) + np.asarray(l, np.float32))
    assert np.all(np.abs(np.asarray(l, np.float32)) <= np.spacing(np.abs(np.asarray(p, np.float32)), dtype=np.float32) * 2**15 + 1e-38)
  assert abs(co.metrics(optimizer.opt_state)["edq"] - 1.0) < 0.05


def _decode64(mode: str, p: np.ndarray, r: np.ndarray) -> np.ndarray:
  """The documented value of an ``exact``/``compact`` param, in numpy (float64)."""
  if mode == "exact":  # the float32 whose upper half is p's bits, plus the residual
    bits = (p.view(np.uint16).astype(np.int64) << 16) + r.astype(np.int64)
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)
  hi = p.astype(np.float64)
  e = np.maximum(np.frexp(np.where(hi == 0, 1.0, hi))[1] - 1, -126 + 8)  # hi = m·2**e, 1 <= m < 2
  e = np.where(np.abs(hi) < 2.0**-118, -118, e)
  return hi + r.astype(np.float64) * 2.0 ** (e - 8) / 127


@pytest.mark.parametrize("mode", ["exact", "compact"])
def test_nnx_optimizer_trains_with_the_integer_residual_modes(mode):
  """``nnx.Optimizer`` with ``mode="exact"`` (int16 residuals, float32 ``v``) and
  ``mode="compact"`` (int8 residuals, 8-bit moments with bf16 group scales): the state keeps
  its structure, the model trains, the residuals are in use, and ``master_params`` is each
  format's documented value (recomputed here in numpy)."""
  model, optimizer = _train_nnx(mode)
  params = nnx.state(model, nnx.Param)
  adam = _adamw_state(optimizer.opt_state)
  want = {"exact": jnp.int16, "compact": jnp.int8}[mode]
  assert {a.dtype for a in jax.tree.leaves(adam.lo)} == {jnp.dtype(want)}
  assert _nonzero_fraction(adam.lo) > 0.5
  if mode == "compact":
    q8 = [m for m in jax.tree.leaves(adam.mu, is_leaf=lambda n: isinstance(n, formats.Q8))]
    assert q8 and all(isinstance(m, formats.Q8) and m.codes.dtype == jnp.int8 for m in q8)
  master = co.master_params(params, optimizer.opt_state)
  for p, m, r in zip(jax.tree.leaves(_unbox(params)), jax.tree.leaves(master), jax.tree.leaves(adam.lo)):
    got, ref = np.asarray(m, np.float64), _decode64(mode, np.asarray(p), np.asarray(r))
    if mode == "exact":
      np.testing.assert_array_equal(got, ref)
    else:  # float32 arithmetic of the decode: within two float32 roundings
      np.testing.assert_allclose(got, ref, rtol=2.0**-22, atol=1e-37)
  assert abs(co.metrics(optimizer.opt_state)["edq"] - 1.0) < 0.05


def test_nnx_mixed_model_fp32_layernorm_trains_like_optax():
  """bf16 Linear + fp32 LayerNorm: the fp32 leaves have no low part and match optax.adamw."""
  x, y = _task()
  model = _MLP(nnx.Rngs(1), norm_dtype=jnp.float32)
  lr, wd = 3e-3, 1e-4
  optimizer = nnx.Optimizer(model, co.adamw(lr, weight_decay=wd, mode="full"), wrt=nnx.Param)
  structure0 = jax.tree.structure(optimizer.opt_state)
  # The reference: optax.adamw on the same LayerNorm gradients, in float32.
  ref_tx = optax.adamw(lr, weight_decay=wd)
  ref = _unbox(nnx.state(model.norm, nnx.Param))
  ref_state = ref_tx.init(ref)
  ref_step = jax.jit(lambda g, s, p: (lambda u, s: (optax.apply_updates(p, u), s))(*ref_tx.update(g, s, p)))
  losses = []
  for _ in range(STEPS):
    loss, grads = _nnx_step(model, optimizer, x, y)
    losses.append(float(loss))
    ref, ref_state = ref_step(_unbox(grads["norm"]), ref_state, ref)
  assert jax.tree.structure(optimizer.opt_state) == structure0
  assert losses[-1] < 0.5 * losses[0], losses
  dtypes = jax.tree.map(lambda a: a.dtype, _unbox(nnx.state(model, nnx.Param)))
  assert dtypes["norm"] == {"scale": jnp.float32, "bias": jnp.float32}
  assert all(d == BF16 for d in jax.tree.leaves(dtypes["fc1"]) + jax.tree.leaves(dtypes["fc2"]))
  # No low component (nor MCF moment) for the fp32 leaves; present for bf16 ones ("full": m, v MCF).
  adam = _adamw_state(optimizer.opt_state)
  lo = adam.lo
  assert lo["norm"] == {"scale": None, "bias": None}
  assert all(a.dtype == BF16 for a in jax.tree.leaves(lo["fc1"]) + jax.tree.leaves(lo["fc2"]))
  for moment in (adam.mu, adam.nu):
    assert _dtypes(moment["norm"]) == {"scale": jnp.float32, "bias": jnp.float32}
    assert set(jax.tree.leaves(_dtypes({k: moment[k] for k in ("fc1", "fc2")}))) == {jnp.dtype(jnp.uint32)}
    assert _nonzero_fraction(_mcf_lo(moment["fc1"])) > 0.5
  assert _nonzero_fraction(lo["fc1"]) > 0.5
  # The fp32 LayerNorm params went through plain fp32 Adam: as optax.adamw.
  got = _unbox(nnx.state(model.norm, nnx.Param))
  moved = max(float(jnp.max(jnp.abs(ref["scale"] - 1.0))), float(jnp.max(jnp.abs(ref["bias"]))))
  assert moved > 10 * lr  # it trained (LayerNorm starts at scale 1, bias 0)
  for k in ("scale", "bias"):
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ref[k]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Linen
# ---------------------------------------------------------------------------


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(32, param_dtype=BF16, dtype=BF16)(x)
    return nn.Dense(1, param_dtype=BF16, dtype=BF16)(nn.gelu(x))


def test_linen_train_state_trains_bf16_model_and_keeps_low_components():
  x, y = _task()
  model = _LinenMLP()
  params = model.init(jax.random.key(0), x)["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=co.adamw(3e-3, mode="light"))

  @jax.jit
  def step(state):
    def loss_fn(p):
      return jnp.mean((state.apply_fn({"params": p}, x).astype(jnp.float32) - y.astype(jnp.float32)) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  structure0 = jax.tree.structure(state.opt_state)
  losses = []
  for _ in range(STEPS):
    state, loss = step(state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses
  assert jax.tree.structure(state.opt_state) == structure0
  assert {a.dtype for a in jax.tree.leaves(state.params)} == {jnp.dtype(BF16)}
  adam = _adamw_state(state.opt_state)
  lo = adam.lo
  assert jax.tree.map(lambda a: a.dtype, lo) == jax.tree.map(lambda a: a.dtype, state.params)
  assert _nonzero_fraction(lo) > 0.5
  # "light": bf16 moments, no MCF ones, no placeholders: count, then m, v, lo of each param.
  assert _dtypes(adam.mu) == _dtypes(adam.nu) == _dtypes(state.params)
  assert len(jax.tree.leaves(state.opt_state)) == 1 + 3 * len(jax.tree.leaves(state.params))
  master = co.master_params(state.params, state.opt_state)
  np.testing.assert_array_equal(
      np.asarray(master["Dense_0"]["kernel"]),
      np.asarray(state.params["Dense_0"]["kernel"], np.float32) + np.asarray(lo["Dense_0"]["kernel"], np.float32))
