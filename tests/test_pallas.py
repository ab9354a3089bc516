"""The compact step's Pallas kernel, in interpret mode on CPU: bit for bit the jnp path of ``adamw``.

For each pair of moment formats the kernel takes (``FMTS``: ``compact``'s
q8/q8, ``lean``'s bf16/log16, compact with ``nu_format="log16"``, and
bf16/q8), every output is compared exactly: the update, the int8 residual,
``m`` (q8 codes and scales, or the bfloat16 array) and ``v`` (q8 or log16
codes and scales). Inputs: random states (hypothesis, small shapes) and
adversarial ones: NaN/±inf/zero/huge/tiny gradients, NaN-coded, zero-coded
and saturated moments, huge and tiny (subnormal) scales, all-zero groups,
rows not a multiple of 32 (a group cut by the row's end), scalars and 1-D
leaves, and the state ``init`` gives. Both block policies (the TPU's and
Triton's) run in interpret mode.
"""

from __future__ import annotations

import functools
import os
import types

# Before jax initialises its backends: the CUDA plugin then registers (compile-only) without a driver.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import collage_optax
from collage_optax import _pallas
from collage_optax.alias import AdamWState
from collage_optax.formats._log16 import Log16
from collage_optax.formats._moments import Q8

BF16 = jnp.bfloat16


def _state(rng: np.random.Generator, shape, *, scale_exp=(-30, 30), nan_codes=False, fmts=("q8", "q8")):
  """A random compact state for a leaf of ``shape``: ``(p, lo, mu, nu)``, ``m`` and ``v`` in ``fmts``.

  ``bf16`` ``m``: values over many octaves (``nan_codes``: NaN, ±inf, 0,
  bfloat16's largest and subnormals among them); ``log16`` ``v``: random
  codes (``nan_codes``: the NaN, zero and floor codes too) under random
  float32 group maxima (some 0).
  """
  shape = tuple(shape)
  n = shape[-1] if shape else 1
  sshape = (shape[:-1] if shape else ()) + (-(-n // 32),)
  if not shape:
    sshape = (1,)
  p = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, shape)).astype(np.float32)
  lo = rng.integers(-127, 128, shape).astype(np.int8)
  mc = rng.integers(-127 if not nan_codes else -128, 128, shape).astype(np.int8)
  vc = rng.integers(0, 255 if not nan_codes else 256, shape).astype(np.uint8)
  sc = lambda: (rng.uniform(0.5, 1.0, sshape) * 2.0 ** rng.integers(*scale_exp, sshape)).astype(np.float32)
  ms, vs = sc(), sc()
  if shape:
    mc[..., : min(n, 3)] = 0  # zero codes (v: decoded at half a step)
  mu = Q8(jnp.asarray(mc), jnp.asarray(ms, BF16))
  nu = Q8(jnp.asarray(vc), jnp.asarray(vs, BF16))
  if fmts[0] == "bf16":
    lo_e, hi_e = scale_exp
    m = rng.standard_normal(shape) * 2.0 ** rng.integers(lo_e, hi_e, shape).astype(np.float64)
    m = m.astype(np.float32).reshape(-1)
    if nan_codes and m.size:
      k = rng.integers(0, m.size, 8)
      m[k] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 3.3895e38, 1e-40, -9e-41]
    mu = jnp.asarray(m.reshape(shape), BF16)
  if fmts[1] == "log16":
    codes = rng.integers(0, 65536 if nan_codes else 65533, shape).astype(np.uint16)
    codes = np.where(rng.random(shape) < 0.5, codes % 4096, codes).astype(np.uint16)  # most within 2 octaves
    if nan_codes and codes.size:
      flat = codes.reshape(-1)
      k = rng.integers(0, flat.size, 6)
      flat[k] = [0xFFFF, 0xFFFF, 0xFFFE, 0xFFFE, 0xFFFD, 0]
    top = (rng.uniform(0.5, 1.0, sshape) * 2.0 ** rng.integers(*scale_exp, sshape)).astype(np.float32)
    top[rng.random(sshape) < 0.1] = 0.0  # all-zero groups
    nu = Log16(jnp.asarray(codes), jnp.asarray(top))
  return jnp.asarray(p, BF16), jnp.asarray(lo), mu, nu


def _grads(rng: np.random.Generator, shape, dtype=BF16, adversarial=False):
  g = (rng.standard_normal(shape) * 10.0 ** rng.integers(-8, 2, shape)).astype(np.float32)
  if adversarial and g.size:
    flat = g.reshape(-1)
    k = rng.integers(0, flat.size, 12)
    flat[k[:2]] = np.nan
    flat[k[2:4]] = np.inf
    flat[k[4]] = -np.inf
    flat[k[5:7]] = 0.0
    flat[k[7]] = 3e38
    flat[k[8]] = -1e25
    flat[k[9]] = 1e-30
    flat[k[10]] = -1e-38
  return jnp.asarray(g, dtype)


def _reference(p, g, lo, mu, nu, count, hp, fmts=("q8", "q8")):
  tx = collage_optax.adamw(mode="compact", mu_format=fmts[0], nu_format=fmts[1], **hp)
  state = AdamWState(jnp.asarray(count, jnp.int32), {"w": mu}, {"w": nu}, {"w": lo}, None)
  u, s = jax.jit(tx.update)({"w": g}, state, {"w": p})
  return u["w"], s.lo["w"], s.mu["w"], s.nu["w"]


def _kernel(p, g, lo, mu, nu, count, hp, policy, emit_param=False):
  def step(p, g, lo, mu, nu, count):
    sc = _pallas.scalars(
      hp["b1"], hp["b2"], hp["eps"], hp["eps_root"], optax.safe_increment(count),
      lr(count) if callable(lr := hp["learning_rate"]) else lr, hp["weight_decay"], hp["nesterov"],
    )  # fmt: skip
    blocks = policy if isinstance(policy, _pallas._Blocks) else _pallas._blocks(tuple(p.shape) or (1,), policy)
    return _pallas.compact_step(
      p, g, lo, mu, nu, sc, nesterov=hp["nesterov"], decay=hp["weight_decay"] != 0, blocks=blocks,
      emit_param=emit_param,
    )  # fmt: skip

  return jax.jit(step)(p, g, lo, mu, nu, jnp.asarray(count, jnp.int32))


#: (m format, v format) pairs: compact's, lean's, compact with log16 v, and lean's m with compact's v.
FMTS = [("q8", "q8"), ("bf16", "log16"), ("q8", "log16"), ("bf16", "q8")]
FMT_IDS = ["compact", "lean", "compact_log16", "bf16_q8"]

HP = dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=1e-4, nesterov=False)


def _bits_equal(k, w, name):
  """Bit for bit (NaNs compared as positions: a NaN's payload is not part of the contract)."""
  w, k = np.asarray(w), np.asarray(k)
  assert w.dtype == k.dtype and w.shape == k.shape, name
  if np.issubdtype(w.dtype, np.integer):
    np.testing.assert_array_equal(k, w, err_msg=name)
  else:
    np.testing.assert_array_equal(np.isnan(k), np.isnan(w), err_msg=name)
    bits = lambda a: a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)[~np.isnan(a)]
    np.testing.assert_array_equal(bits(k), bits(w), err_msg=name)


def _check(
  shape, seed, *, dtype=BF16, adversarial=False, count=0, policy="mosaic", hp=None, emit_param=False,
  fmts=("q8", "q8"), **state_kw,
):  # fmt: skip
  hp = {**HP, **(hp or {})}
  rng = np.random.default_rng(seed)
  p, lo, mu, nu = _state(rng, shape, fmts=fmts, **state_kw)
  g = _grads(rng, shape, dtype, adversarial)
  want = _reference(p, g, lo, mu, nu, count, hp, fmts)
  got = _kernel(p, g, lo, mu, nu, count, hp, policy)
  names = ("update", "residual", "mu codes", "mu scales", "nu codes", "nu scales")
  if fmts[0] == "bf16":
    names = ("update", "residual", "mu", "nu codes", "nu scales")
  flat = lambda t: [t[0], t[1], *jax.tree.leaves(t[2]), t[3].codes, t[3].scales]
  for name, w, k in zip(names, flat(want), flat(got)):
    _bits_equal(k, w, name)
  if emit_param:  # the new param in place of the update: where optax.apply_updates lands
    got = _kernel(p, g, lo, mu, nu, count, hp, policy, emit_param=True)
    _bits_equal(got[0], jax.jit(optax.apply_updates)(p, want[0]), "param")
    for name, w, k in zip(names[1:], flat(want)[1:], flat(got)[1:]):
      _bits_equal(k, w, name)


@pytest.mark.parametrize("fmts", FMTS[:3], ids=FMT_IDS[:3])
@pytest.mark.parametrize("policy", ["mosaic", "triton"])
@pytest.mark.parametrize(
  "shape", [(8, 256), (40, 96), (3, 40), (5,), (), (2, 3, 33), (4096,), (16, 31), (70, 64)], ids=str
)
def test_bit_for_bit_adversarial(shape, policy, fmts):
  _check(shape, 0, adversarial=True, count=3, policy=policy, nan_codes=True, emit_param=policy == "mosaic", fmts=fmts)


@pytest.mark.parametrize(
  "case",
  [
    dict(scale_exp=(100, 126)),  # huge moments (saturation at 1e38, v's square)
    dict(scale_exp=(-133, -110)),  # tiny moments (subnormal scales)
    dict(dtype=jnp.float32, adversarial=True, emit_param=True),  # float32 gradients: a float32 update
    dict(hp=dict(nesterov=True), count=7),
    dict(hp=dict(weight_decay=0.0, learning_rate=lambda count: -1.0 + 0.0 * count)),  # a negative lr acts as 0
    dict(hp=dict(learning_rate=10.0, b1=0.5, b2=0.5, eps=1e-30, eps_root=1e-12), adversarial=True),
  ],
  ids=["huge", "tiny", "f32_grads", "nesterov", "no_decay_lr0", "wild_hp"],
)
@pytest.mark.parametrize("fmts", FMTS, ids=FMT_IDS)
def test_bit_for_bit_cases(case, fmts):
  _check((12, 80), 1, fmts=fmts, **case)


@pytest.mark.parametrize("fmts", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("shape, blocks", [((5, 96), (5, 96, 2, 64)), ((7, 200), (7, 224, 4, 128))], ids=str)
def test_bit_for_bit_partial_blocks(shape, blocks, fmts):
  """Blocks partly past the rows' ends and the columns' (as TPU's 4096-wide blocks of a 50304-wide row)."""
  _check(shape, 2, adversarial=True, count=5, policy=_pallas._Blocks(*blocks), emit_param=True, fmts=fmts)


@pytest.mark.parametrize("fmts", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("policy", ["mosaic", "triton"])
def test_bit_for_bit_from_init(fmts, policy):
  """Three steps from ``init``'s state (zero-coded ``v``, zero scales), with whole groups of zero gradients,
  a huge gradient (``g²`` overflows: ``v`` saturates at float32's largest) and NaN/±inf: each step's outputs
  bit for bit, the next step from the jnp path's state."""
  shape = (6, 100)
  tx = collage_optax.adamw(mode="compact", mu_format=fmts[0], nu_format=fmts[1], **HP)
  p = jnp.asarray(np.random.default_rng(3).standard_normal(shape), BF16)
  s = tx.init({"w": p})
  lo, mu, nu = s.lo["w"], s.mu["w"], s.nu["w"]
  for count in range(3):
    g = np.array(_grads(np.random.default_rng(20 + count), shape, jnp.float32, adversarial=True))
    g[1] = 0.0  # whole groups of zeros (and a group cut by the row's end: 100 = 3·32 + 4)
    g[2, 96:] = 0.0
    g[3, :32] = 1e-45 * (count + 1)  # subnormal gradients: g² is 0
    g[4, 5] = 3e38
    g = jnp.asarray(g, BF16)
    want = _reference(p, g, lo, mu, nu, count, HP, fmts)
    got = _kernel(p, g, lo, mu, nu, count, HP, policy)
    for i, (w, k) in enumerate(zip(jax.tree.leaves(want), jax.tree.leaves(got))):
      _bits_equal(k, w, f"step {count} output {i}")
    _, lo, mu, nu = want
    p = optax.apply_updates(p, want[0])


@pytest.mark.parametrize("fmts", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_nan_kept_under_tritons_max_and_min(monkeypatch, fmts, nesterov):
  """Triton lowers ``max``/``min`` (and ``clip``) to ``maxnumf``/``minnumf``, which return the operand that
  is not NaN. With those semantics in the kernel's body (interpret mode) its outputs keep their bits:
  a NaN or ±inf gradient still poisons its element as on CPU, not a saturated finite step."""
  rng = np.random.default_rng(7)
  shape = (4, 96)
  p, lo, mu, nu = _state(rng, shape, fmts=fmts)
  g = _grads(rng, shape, adversarial=True)
  hp = {**HP, "nesterov": nesterov}
  want = _kernel(p, g, lo, mu, nu, 2, hp, "triton", emit_param=True)
  assert np.isnan(np.asarray(want[0], np.float32)[~np.isfinite(np.asarray(g, np.float32))]).all()
  nan_dropping = types.SimpleNamespace(**{k: getattr(jnp, k) for k in dir(jnp) if not k.startswith("__")})
  nan_dropping.maximum, nan_dropping.minimum = jnp.fmax, jnp.fmin
  nan_dropping.clip = lambda x, lo=None, hi=None: jnp.fmin(jnp.fmax(lo, x), hi)
  monkeypatch.setattr(_pallas, "jnp", nan_dropping)
  got = _kernel(p, g, lo, mu, nu, 2, hp, "triton", emit_param=True)
  for i, (w, k) in enumerate(zip(jax.tree.leaves(want), jax.tree.leaves(got))):
    _bits_equal(k, w, f"output {i}")


@settings(max_examples=10, deadline=None)
@given(
  rows=st.integers(1, 9),
  cols=st.integers(1, 100),
  seed=st.integers(0, 2**31 - 1),
  count=st.integers(0, 2000),
  adversarial=st.booleans(),
  policy=st.sampled_from(["mosaic", "triton"]),
  nan_codes=st.booleans(),
)
@pytest.mark.parametrize("fmts", FMTS[:3], ids=FMT_IDS[:3])
def test_bit_for_bit_random(fmts, rows, cols, seed, count, adversarial, policy, nan_codes):
  _check((rows, cols), seed, count=count, adversarial=adversarial, policy=policy, nan_codes=nan_codes, fmts=fmts)


# ---------------------------------------------------------------------------
# Compiled for the accelerators (deviceless): the kernel is chosen there, and it is one sweep.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pallas_bench(accel):
  """``benchmarks/pallas_compact.py`` (it compiles through ``accelerators.py``: skipped with it)."""
  import bench  # pylint: disable=import-outside-toplevel

  return bench.load("pallas_compact")


@pytest.mark.parametrize("mode", ["compact", "lean"])
@pytest.mark.parametrize("target", ["h200", "v5e"])
def test_compiled_one_sweep(pallas_bench, target, mode):
  shape = (1024, 1024)
  fused = pallas_bench.measure("apply_gradients", shape, target, mode)
  # collage_optax.apply_gradients: the kernel writes the new param over the old: one pass, the layout's bytes
  # (compact 12.25 B/param, lean 16.25: read and write params 2, residual 1, m 2 (lean) or 1 + 1/16,
  # v 2 + 1/8 or 1 + 1/16).
  assert fused["param_sized_kernels"] == 1 and fused["hbm_B"] <= fused["ideal_B"] + 0.05, fused
  assert fused["temp_B"] < 0.1 and fused["hbm_B"] <= {"compact": 13.5, "lean": 16.5}[mode], fused
  # tx.update chooses it on the accelerator too; optax.apply_updates then adds a pass over the params
  # (read params and updates, write params: 6 B/param; on TPU in VMEM).
  via_adamw = pallas_bench.measure("adamw", shape, target, mode)
  assert via_adamw["hbm_B"] <= fused["hbm_B"] + 6.25, via_adamw
  # Better than the jnp path: fewer bytes on the GPU (31 B/param there), fewer passes on the TPU (whose
  # HBM bytes, for a leaf this small, hide in VMEM).
  jnp_path = pallas_bench.measure("jnp", shape, target, mode)
  what = "hbm_B" if target == "h200" else "param_sized_kernels"
  # (lean on the GPU, at this size: XLA's jnp path writes the new param in its own pass, 20.75 B/param,
  # which the update and apply_updates' pass, 16.25 + 6, do not beat; the kernel alone does.)
  kernel = fused if (mode, target) == ("lean", "h200") else via_adamw
  assert jnp_path[what] > kernel[what], (jnp_path, kernel)


def test_not_with_metrics():
  """With ``track_metrics`` the step needs its intermediate values: every leaf takes the jnp path (and still runs)."""
  params = {"w": jnp.ones((4, 64), BF16)}
  tx = collage_optax.adamw(1e-3, mode="compact", track_metrics=True)
  u, _ = jax.jit(tx.update)(params, tx.init(params), params)
  assert u["w"].dtype == BF16


@pytest.mark.parametrize(
  "nesterov, x64, modes",
  [
    (False, False, "compact"),
    (True, False, "compact"),
    (False, True, "compact"),
    (False, False, "lean"),
    (True, True, "lean"),
    (False, False, "compact_log16"),
    (False, False, "mixed"),
  ],
)
def test_adamw_plumbing(monkeypatch, nesterov, x64, modes):
  """``adamw`` with the kernel (interpret mode) in place of the jnp path: the same bits.

  Runs adamw's own wiring (scalars, schedule, weight-decay mask, per-leaf
  modes, leaves the kernel does not take) over three steps, for
  ``mode="compact"``, ``mode="lean"``, compact with ``nu_format="log16"``
  and a tree mixing lean and compact leaves.
  """
  params = {
    "w": jnp.asarray(np.random.default_rng(0).standard_normal((16, 96)), BF16),
    "odd": jnp.asarray(np.random.default_rng(1).standard_normal((3, 45)), BF16),
    "vec": jnp.asarray(np.random.default_rng(2).standard_normal(256), BF16),
    "gain": jnp.ones((), BF16),
    "f32": jnp.ones((8,), jnp.float32),
    "exact": jnp.ones((4, 32), BF16),
  }
  main = {"compact": "compact", "compact_log16": "compact", "lean": "lean", "mixed": "lean"}[modes]
  mode = {"w": main, "odd": main, "vec": main, "gain": main, "f32": main, "exact": "exact"}
  if modes == "mixed":
    mode.update(odd="compact", gain="compact")
  extra = dict(nu_format="log16") if modes == "compact_log16" else {}
  mask = {k: k != "vec" for k in params}

  def run(states=None):
    """Three steps: ``(p, state, grads, update, new state)`` each; from ``states[i]`` (``(p, state)``) when given."""
    # A new adamw per run: jit caches the traced update of a given function.
    tx = collage_optax.adamw(
      optax.linear_schedule(3e-3, 1e-4, 3), weight_decay=0.1, mask=mask, mode=mode, nesterov=nesterov, **extra
    )
    p, s, out = params, tx.init(params), []
    update, fused_step = jax.jit(tx.update), jax.jit(functools.partial(collage_optax.apply_gradients, tx))
    for i in range(3):
      if states:
        p, s = states[i]
      rng = np.random.default_rng(10 + i)
      g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 1e-2, x.dtype), p)
      g["w"] = g["w"].at[0, :3].set(jnp.asarray([np.nan, np.inf, 0.0], BF16))
      u, s_new = update(g, s, p)
      # apply_gradients, where the kernel writes the new params: the same params and state, bit for bit.
      fused = fused_step(g, s, p)
      out.append((p, s, g, u, s_new))
      p, s = optax.apply_updates(p, u), s_new
      for j, (w, k) in enumerate(zip(jax.tree.leaves((p, s)), jax.tree.leaves(fused))):
        _bits_equal(k, w, f"apply_gradients, step {i}, output {j}")
    return out

  with jax.enable_x64(x64):  # x64: Python ints and floats default to 64 bits inside the step
    want = run()
    monkeypatch.setattr(_pallas, "INTERPRET_ON_CPU", True)
    taken = []  # the kernel's (m, v) formats, each time a step is traced
    emitted = []  # whether it wrote the params (apply_gradients) or the update (tx.update)
    step = _pallas.compact_step
    monkeypatch.setattr(
      _pallas, "compact_step",
      lambda p, g, lo, mu, nu, *a, **k: taken.append(
        (_pallas.moment_format(mu, False), _pallas.moment_format(nu, True))
      ) or emitted.append(k.get("emit_param", False)) or step(p, g, lo, mu, nu, *a, **k),
    )  # fmt: skip
    # Each step from the jnp path's state, so that a difference would not carry into the next steps.
    got = run([(p, s) for p, s, *_ in want])
  # w, odd, vec and gain take the kernel (f32 and exact do not), in their own formats.
  want_fmts = {"compact": ("q8", "q8"), "lean": ("bf16", "log16"), "compact_log16": ("q8", "log16")}
  fmts_seen = {want_fmts.get(modes)} if modes != "mixed" else {("q8", "q8"), ("bf16", "log16")}
  # Traced once by update and once by apply_gradients, each time in its three platforms' branches; the latter
  # has the kernel write the params.
  assert len(taken) == 4 * 3 * 2 and set(taken) == fmts_seen, taken
  assert sum(emitted) == 4 * 3, emitted
  ties = 0
  for (_, s, g, uw, sw), (_, _, _, ug, sg) in zip(want, got):
    for k in params:
      outs = lambda u, s: jax.tree.leaves((u[k], s.lo[k], s.mu[k], s.nu[k]))
      w_all, k_all = outs(uw, sw), outs(ug, sg)
      # A bfloat16 m: the jnp path's own bits depend on how XLA:CPU fuses it (see _fma_ties); where that
      # decides, the kernel's m is the FMA's, and the update and residual follow it.
      tie = _fma_ties(g[k], s.mu[k], 0.9) if mode[k] == "lean" and k != "f32" else None
      if tie is not None:
        ties += int(tie.sum())
        np.testing.assert_array_equal(np.asarray(sg.mu[k], np.float32)[tie], _fma_ties.fma[tie])
      for w, kk in zip(w_all, k_all):
        w, kk = np.asarray(w), np.asarray(kk)
        if tie is not None and w.shape == tie.shape:
          w, kk = w[~tie], kk[~tie]
        _bits_equal(kk, w, f"adamw {k}")
  assert ties < 0.01 * 3 * sum(x.size for x in params.values()), ties  # a few elements in a thousand


def _fma_ties(g, m, b1):
  """Where a bfloat16 ``m``'s update ``(1 − b1)·g + b1·m`` rounds to another bfloat16 with an FMA than without.

  XLA:CPU contracts one product of it into an FMA or not depending on the
  fusion around it: a leaf's jnp path gives ``fma(b1, m, (1 − b1)·g)`` when
  it is compiled alone and the unfused sum in some trees (measured: both
  differ at element 68 of the plumbing test's ``vec`` at its third step). The
  kernel computes the FMA. Returns the mask (``_fma_ties.fma`` holds the
  FMA's bfloat16 values, as float32).
  """
  f, F = np.float32, np.float64
  G, M = np.asarray(g, np.float32), np.asarray(m, np.float32)
  c1, b1 = f(1 - b1), f(b1)
  with np.errstate(all="ignore"):
    cands = [f(f(c1 * G) + f(b1 * M)), f(F(c1) * F(G) + F(f(b1 * M))), f(F(f(c1 * G)) + F(b1) * F(M))]
  bf = [np.asarray(jnp.asarray(c, BF16), np.float32) for c in cands]
  same = lambda a, b: (a == b) | (np.isnan(a) & np.isnan(b))
  _fma_ties.fma = bf[2]
  return ~(same(bf[0], bf[2]) & same(bf[1], bf[2]))
