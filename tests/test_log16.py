"""The ``log16`` second-moment format: uint16 codes of log2 v below a group's largest.

Codes (``collage_optax/formats/_log16.py``): ``s`` = the largest finite ``v``
of each group of 32 along the last axis (stored as a float32); code
``c = floor((bits(s) − bits(v) + u) / 2**12)``, ``u ∈ [0, 2**12)`` the low bits
of Wellons' lowbias32 hash of ``v``'s mantissa bits (stochastic rounding), where
``bits(y)/2**23 − 127`` is Mitchell's piecewise-linear ``log2 y``: ``c`` counts
1/2048 octaves of that log down from ``s``, and decodes to the float32 with
bits ``bits(s) − c·2**12``. Codes 0xFFFF: ``v = 0``, 0xFFFE: non-finite,
0xFFFD: the floor (32 octaves down), where smaller positive ``v`` saturate.

References, never the library: the codes from float64 arithmetic on
Mitchell's log, ``M(y) = e + (m − 1)`` for ``y = m·2**e`` (``1 ≤ m < 2``;
``y·2**126 − 127`` below 2**-126), as ``floor(2048·(M(s) − M(v)) + u/2**12)``
with ``u`` from a numpy uint32 lowbias32; the
decode as ``M⁻¹(M(s) − c/2048)`` in float64; the error against float64 within
the bound derived in ``formats.log16_bound``'s docstring (``rel =
2**-11/(1 − 2**-11)``, ``floor = 2**-31``, ``tiny = 2**-137``), whose values are
recomputed here from that math.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import reference as R
import strategies as S
from hypothesis import given, settings
from hypothesis import strategies as st

import collage_optax as co
from collage_optax import formats

F32, F64 = np.float32, np.float64
BF16 = np.dtype(ml_dtypes.bfloat16)
GROUP = 32
V = formats.moment_format("log16", second=True)
STEPS_PER_OCTAVE = 2048
ZERO, NAN, FLOOR = 0xFFFF, 0xFFFE, 0xFFFD
# The bound, from the math (see the module docstring): under a step of 2**12 bit-units, each at most
# 2**-23 of the larger value; a subnormal's bit-unit 2**-149 (and the clamp at bits 0: 2**12 units);
# the floor 65533/2048 Mitchell octaves below s, Mitchell's log within 0.0861 of log2.
REL, FLOOR_RATIO, TINY = 2.0**-11 / (1 - 2.0**-11), 2.0**-31, 2.0**-137
MAX = float(np.finfo(F32).max)

EXAMPLES = settings(max_examples=25, deadline=None)
V_SCALES = (1e-2, 1e-6, 1e-8, 1e-18, 1e18)  # of g; v = g²
SHAPES = ((16, 130), (2000,), (8, 8, 32), (3, 7, 50))


# ---------------------------------------------------------------------------
# numpy references.
# ---------------------------------------------------------------------------




def mitchell(y: np.ndarray) -> np.ndarray:
  """``M(y)`` in float64: ``e + (m − 1)`` for ``y = m·2**e``, ``1 ≤ m < 2``; ``y·2**126 − 127`` below 2**-126."""
  y = np.asarray(y, F64)
  m, e = np.frexp(np.where(y > 0, y, 1.0))  # y = m·2**e, 0.5 <= m < 1
  return np.where(y >= 2.0**-126, (e - 1) + (2 * m - 1), y * 2.0**126 - 127)


def mitchell_inverse(t: np.ndarray) -> np.ndarray:
  t = np.asarray(t, F64)
  e = np.floor(t)
  return np.where(t >= -126, np.ldexp(1 + (t - e), e.astype(np.int32)), (t + 127) * 2.0**-126)


def _positive(v) -> np.ndarray:
  """float64 ``v`` where it is a positive finite float32, else 0."""
  v = np.asarray(v, F32).astype(F64)
  return np.where(np.isfinite(v) & (v > 0), v, 0.0)


def lowbias32(x: np.ndarray) -> np.ndarray:
  """C. Wellons' lowbias32 integer hash, numpy uint32 (wrapping multiplications)."""
  x = np.asarray(x, np.uint32)
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> np.uint32(15))
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def dither(v: np.ndarray) -> np.ndarray:
  """``u/2**12 ∈ [0, 1)``: the low 12 bits of lowbias32 of ``v``'s mantissa bits (0 where ``v`` is not positive)."""
  b = np.where(_positive(v) > 0, np.asarray(v, F32).view(np.uint32), 0) & np.uint32(0x7FFFFF)
  return (lowbias32(b) & np.uint32(0xFFF)).astype(F64) / 4096


def ref_log16(v) -> tuple[np.ndarray, np.ndarray]:
  """(codes, s) of the documented encode, in float64."""
  v = np.asarray(v, F32)
  y = _positive(v)
  s = np.max(R.grouped(y), axis=-1)
  se = R.per_element(s, v.shape)
  with np.errstate(over="ignore"):
    c = np.floor(STEPS_PER_OCTAVE * (mitchell(se) - mitchell(y)) + dither(v))
  c = np.minimum(np.minimum(c, np.floor(STEPS_PER_OCTAVE * (mitchell(se) + 127))), FLOOR)
  c = np.where(y == 0, ZERO, c)
  return np.where(np.isfinite(v), c, NAN).astype(np.int64), s.astype(F32)


def ref_decode(codes, s) -> np.ndarray:
  """``M⁻¹(M(s) − c/2048)`` in float64; 0 and NaN at their codes."""
  c = np.asarray(codes, np.int64)
  se = R.per_element(np.asarray(s, F64), c.shape)
  x = mitchell_inverse(np.maximum(mitchell(se) - c / STEPS_PER_OCTAVE, -127))
  return np.where(c == ZERO, 0.0, np.where(c == NAN, np.nan, x))


def group_max(v) -> np.ndarray:
  """The group's largest positive finite v (float64), per element."""
  return R.per_element(np.max(R.grouped(_positive(v)), axis=-1), np.shape(v))


def fails(ok, what: str, **inputs) -> str:
  ok = np.asarray(ok)
  i = int(np.flatnonzero(~ok.ravel())[0])
  args = ", ".join(f"{k}={np.asarray(x).ravel()[i]!r}" for k, x in inputs.items())
  return f"{what}: {np.count_nonzero(~ok)} element(s); first (flat index {i}): {args}"


def v_batch(rng: np.random.Generator, shape, scale: float, spread: float) -> np.ndarray:
  """``v = g²`` (float32) for ``g ~ N(0.5, 1)·scale``, each element ``10**-U(0, spread)`` smaller, 5% zeros."""
  g = rng.normal(0.5, 1.0, shape) * scale * 10.0 ** -rng.uniform(0, spread, shape)
  g = np.where(rng.random(shape) < 0.05, 0.0, g)
  return np.asarray(g * g, F64).astype(F32)


_ENC, _DEC = jax.jit(V.encode), jax.jit(V.decode)


def encode(v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(codes, k, decoded) of the library, jitted."""
  q = _ENC(jnp.asarray(v))
  return np.asarray(q.codes), np.asarray(q.scales), np.asarray(_DEC(q))


# ---------------------------------------------------------------------------
# Layout and refusal.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 70), (5,), (), (2, 64), (4, 1, 33), (32,)])
def test_layout(shape):
  """uint16 codes shaped like the param, one float32 scale per group of 32 along the last axis
  (a scalar: one), padded groups; 2 + 4/32 bytes; zeros decode to +0.0."""
  assert V.name == "log16" and V.bytes == 2 + 4 / 32 and V.max == MAX
  assert formats.log16_bound() == (REL, FLOOR_RATIO, TINY)
  assert formats.MOMENT_FORMATS["log16"] is V
  scales_shape = (*shape[:-1], math.ceil(shape[-1] / GROUP)) if shape else (1,)
  for like in (BF16, np.dtype(F32)):
    z = V.zeros(jnp.zeros(shape, like))
    assert isinstance(z, formats.Log16) and isinstance(z, formats.GROUPED)
    assert z.codes.dtype == np.uint16 and z.codes.shape == shape
    assert z.scales.dtype == F32 and z.scales.shape == scales_shape
    assert formats.moment_format_of(z) is V
    d = np.asarray(_DEC(z))
    assert d.dtype == F32 and d.shape == shape and np.all(d.view(np.uint32) == 0)  # +0.0
  v = v_batch(np.random.default_rng(len(shape)), shape, 1e-3, 3)
  q = _ENC(jnp.asarray(v))
  assert isinstance(q, formats.Log16) and formats.moment_format_of(q) is V
  assert q.codes.shape == shape and q.scales.shape == scales_shape
  codes, top = ref_log16(v)
  assert np.array_equal(np.asarray(q.codes), codes) and np.array_equal(np.asarray(q.scales), top.reshape(scales_shape))


def test_refused_for_the_first_moment():
  """log16 holds v ≥ 0 only: asking for it as a first moment is a clear error, in every spelling."""
  with pytest.raises(ValueError, match="second moment"):
    formats.moment_format("log16")
  with pytest.raises(ValueError, match="mu_format"):
    co.adamw(1e-3, mu_format="log16")
  assert formats.moment_format("log16", second=True) is V and formats.moment_format(V, second=True) is V


# ---------------------------------------------------------------------------
# Precision.
# ---------------------------------------------------------------------------


@np.errstate(invalid="ignore", over="ignore")
def check_log16(v: np.ndarray) -> None:
  """Codes and scales equal the float64 reference; the decode is the float64 formula of its codes;
  the error is within the bound; zeros decode to +0.0, non-finite elements to NaN."""
  codes, s, d = encode(v)
  want_c, want_s = ref_log16(v)
  assert np.array_equal(s.view(np.uint32), want_s.view(np.uint32)), "scales != the group's largest"
  assert np.array_equal(codes, want_c), fails(codes == want_c, "codes", v=v, code=codes, want=want_c)
  d64, want_d = d.astype(F64), ref_decode(codes, s)
  same = (d64 == want_d) | (np.isnan(d64) & np.isnan(want_d))
  assert np.all(same), fails(same, "decode != the formula of its codes", v=v, decoded=d, want=want_d)
  v64, se = v.astype(F64), group_max(v)
  finite = np.isfinite(v64)
  vv = _positive(v)  # v ≤ 0 is stored as 0
  lo_ok = d64 >= vv - REL * vv - TINY
  hi_ok = d64 <= np.maximum(vv + REL * vv + TINY, FLOOR_RATIO * se)
  ok = ~finite | (lo_ok & hi_ok)
  assert np.all(ok), fails(ok, "beyond log16_bound", v=v, decoded=d, group_max=se)
  assert np.all(np.isnan(d64[~finite])) and not np.any(np.isnan(d64[finite]))
  assert np.all(d[finite & (vv == 0)].view(np.uint32) == 0)
  top = finite & (vv == se) & (vv > 0)
  assert np.all(d64[top] == vv[top]), "the group's largest is not exact"


@EXAMPLES
@given(rng=S.seeds(), scale=st.sampled_from(V_SCALES), spread=st.integers(0, 12), shape=st.sampled_from(SHAPES))
def test_codes_and_bound(rng, scale, spread, shape):
  """Gradient-like v over 24 decades within a group at most (past the 32 octaves: the floor)."""
  check_log16(v_batch(rng, shape, scale, spread))


@EXAMPLES
@given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=200))
def test_any_float32_bits(bits):
  """Every float32 bit pattern (subnormals, negatives, −0.0, NaNs, ±inf, the largest finite)."""
  check_log16(np.array(bits, np.uint32).view(F32))


def test_the_relative_bound_is_reached_and_the_floor_saturates_up():
  """Uniform v in one octave reach nearly 2**-11 relative error (the bound is tight) and the rounding
  is unbiased (the mean bit-distance is ~0 of a step); v 2**-40 below its group's largest decodes to
  the floor: above v, within 2**-31 of the largest."""
  rng = np.random.default_rng(0)
  v = rng.uniform(1, 2, (512, GROUP)).astype(F32)
  _, _, d = encode(v)
  rel = np.abs(d.astype(F64) / v - 1)
  assert 0.75 * 2.0**-11 < rel.max() <= REL
  steps = (d.view(np.uint32).astype(np.int64) - v.view(np.uint32).astype(np.int64)) / 2.0**12
  assert np.all(np.abs(steps) < 1) and abs(steps.mean()) < 0.02, steps.mean()
  v = np.ones((1, GROUP), F32)
  v[0, 1], v[0, 2] = 2.0**-40, 2.0**-31  # below the 32 octaves: the floor; within them
  codes, _, d = encode(v)
  assert codes[0, 1] == FLOOR and codes[0, 2] == 31 * STEPS_PER_OCTAVE
  assert 2.0**-40 < d[0, 1] <= FLOOR_RATIO and d[0, 2] == 2.0**-31


def test_saturates_at_its_floor_not_at_infinity():
  """float32's largest is held exactly (it is its group's largest); a 1.0 in its group is 128 octaves
  below: it decodes to the floor, within 2**-31 of it. Nothing becomes inf."""
  v = np.array([np.finfo(F32).max, 1.0], F32)
  codes, _, d = encode(v)
  assert d[0] == MAX and codes[1] == FLOOR and 1.0 < d[1] <= FLOOR_RATIO * MAX and np.all(np.isfinite(d))


@EXAMPLES
@given(rng=S.seeds(), k=st.integers(-20, 20), shape=st.sampled_from(SHAPES[:2]))
def test_scale_invariance(rng, k, shape):
  """``v·4**k`` has the codes of ``v`` (the hash reads only the mantissa), scales and decode ``·4**k``."""
  v = v_batch(rng, shape, 1.0, 6)
  v = np.where(v < 2.0**-40, F32(0), v)  # nothing may become subnormal or overflow
  codes, ks, d = encode(v)
  codes2, ks2, d2 = encode((v.astype(F64) * 4.0**k).astype(F32))
  assert np.array_equal(codes2, codes)
  assert np.array_equal(ks2.astype(F64), ks.astype(F64) * 4.0**k)
  assert np.array_equal(d2.astype(F64), d.astype(F64) * 4.0**k)


# ---------------------------------------------------------------------------
# Non-finite elements.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("seed", [0, 1])
def test_non_finite_element(bad, seed):
  """A NaN or ±inf element gets the NaN code and decodes to NaN; it is left out of its group's scale:
  every other element has the codes and decode it has with 0 there."""
  rng = np.random.default_rng(seed)
  v = v_batch(rng, (4, 70), 1e-6, 4)
  v[0, 5] = v.max() * 4  # the would-be largest of its group becomes non-finite below
  where = [(0, 3), (0, 5), (1, 40), (2, 69), (3, 0), (3, 1)]
  v_bad, v_zero = v.copy(), v.copy()
  mask = np.zeros(v.shape, bool)
  for i in where:
    v_bad[i], v_zero[i], mask[i] = bad, 0, True
  codes, k, d = encode(v_bad)
  codes0, k0, d0 = encode(v_zero)
  assert np.all(codes[mask] == NAN) and np.all(np.isnan(d[mask]))
  assert np.all(codes[~mask] != NAN) and not np.any(np.isnan(d[~mask]))
  assert np.array_equal(k.view(np.uint32), k0.view(np.uint32)) and np.array_equal(codes[~mask], codes0[~mask])
  assert np.array_equal(d[~mask].view(np.uint32), d0[~mask].view(np.uint32))
  check_log16(v_bad)


def test_all_non_finite_group():
  """A group of NaNs only: scale 0, NaN codes; its neighbours unaffected."""
  v = np.ones((2, 64), F32)
  v[0, :GROUP] = np.nan
  codes, k, d = encode(v)
  assert np.all(codes[0, :GROUP] == NAN) and np.all(np.isnan(d[0, :GROUP]))
  assert k[0, 0] == 0 and np.all(k.ravel()[1:] == 1.0)
  assert np.all(d[0, GROUP:] == 1.0) and np.all(d[1] == 1.0)


# ---------------------------------------------------------------------------
# The XLA trap: a fresh process with --xla_allow_excess_precision.
# ---------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np, jax, jax.numpy as jnp
    from collage_optax import formats

    f = formats.moment_format("log16", second=True)
    x = jnp.asarray(np.load(sys.argv[1])["v"])
    q = jax.jit(lambda v: f.encode(v * 1.0 + 0.0))(x)
    dec = jax.jit(lambda v: f.decode(f.encode(v * 1.0)) * 1.0)(x)  # fused into arithmetic, as in a step
    k = np.asarray(q.scales).view(np.uint32)
    np.savez(sys.argv[2], codes=np.asarray(q.codes), k=k, dec=np.asarray(dec).view(np.uint32))
    """
)


@pytest.mark.parametrize("excess", ["true", "false"])
def test_log16_under_xla_allow_excess_precision(excess, run_with_excess_precision):
  """Codes, scales and decoded values in a fresh process, excess precision allowed or not, equal the
  numpy reference bit for bit (integer operations only)."""
  rng = np.random.default_rng(5)
  v = np.concatenate([v_batch(rng, (8, 200), s, 6) for s in V_SCALES])
  v[0, :3] = [np.nan, np.inf, 0.0]
  got, _ = run_with_excess_precision(_CHILD, {"v": v}, excess)
  codes, k = ref_log16(v)
  assert np.array_equal(got["codes"], codes) and np.array_equal(got["k"], k.view(np.uint32))
  want = ref_decode(codes, k).astype(F32)
  gd, nan = got["dec"].view(F32), np.isnan(want)
  assert np.array_equal(np.isnan(gd), nan) and np.array_equal(gd[~nan], want[~nan])


# ---------------------------------------------------------------------------
# adamw with a log16 v.
# ---------------------------------------------------------------------------


def _run(tx, params, grads, state=None):
  """``params`` and the state after a jitted step per gradient, from ``state`` (``tx.init(params)``: None)."""
  state = tx.init(params) if state is None else state
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  for g in grads:
    params, state = step(params, state, g)
  return params, state


@pytest.mark.parametrize("scale", [1e-2, 1e-6, 1e-8])
def test_adamw_tracks_float32_under_gradient_rescaling(scale):
  """100 steps on 4096 params (64 x 64), gradients ~N(0.5·s, s) as bfloat16 (optax gets their float32
  values), lr 1e-3, no weight decay: the displacement ``||θ_100 − θ_0||`` of ``adamw(mode="lean")`` and of
  ``adamw(param_format="exact", mu_format="f32", nu_format="log16")`` is within 2% of optax.adamw's
  float32 one at every gradient scale, and the error is small (asserted < 2e-2 and < 1e-3)."""
  rng = np.random.default_rng(0)
  theta0 = jnp.asarray(rng.normal(size=(64, 64)), jnp.bfloat16)
  grads = [jnp.asarray(rng.normal(0.5 * scale, scale, (64, 64)), jnp.bfloat16) for _ in range(100)]
  ref, _ = _run(optax.adamw(1e-3, weight_decay=0.0), theta0.astype(jnp.float32), [g.astype(jnp.float32) for g in grads])
  t0, ref = np.asarray(theta0, F64), np.asarray(ref, F64)
  travel = np.linalg.norm(ref - t0)
  txs = {
      "lean": (co.adamw(1e-3, weight_decay=0.0, mode="lean"), 2e-2),
      "exact+log16 v": (co.adamw(1e-3, weight_decay=0.0, param_format="exact", mu_format="f32",
                                 nu_format="log16"), 1e-3),
  }
  report = []
  for name, (tx, tol) in txs.items():
    params, state = _run(tx, theta0, grads)
    assert isinstance(state.nu, formats.Log16) and state.nu.codes.dtype == jnp.uint16
    theta = np.asarray(co.master_params(params, state), F64)
    ratio = np.linalg.norm(theta - t0) / travel
    err = np.linalg.norm(theta - ref) / travel
    report.append(f"{name}: displacement ratio {ratio:.5f}, error {err:.2e}")
    assert abs(ratio - 1) < 0.02, report[-1]
    assert err < tol, report[-1]
  print(f"scale {scale:g}: " + "; ".join(report))


def test_second_moment_decays_like_float64():
  """v fed g for 300 steps, then zeros for 3000 (to 5% of its peak): it decays like ``0.999**t`` in
  float64 (a bf16 v stays put: 0.999 rounds to 1). Every element, g over 4.4 decades. Each step's
  change is ~2 grid steps; rounded stochastically the errors do not add up coherently: measured
  worst 1.7% (rounded to nearest: 13%)."""
  g = np.array([1.0, 3.0, 0.37, 0.01, 1e-3, 25.0], F32)  # v over 29 octaves: within the 32
  b2 = 0.999
  tx = co.adamw(1e-3, weight_decay=0.0, mode="lean")
  params = jnp.zeros(g.shape, jnp.bfloat16)
  state = tx.init(params)
  step = jax.jit(lambda p, s, gg: tx.update(gg, s, p)[1])
  v64 = np.zeros(g.shape)
  worst = 0.0
  for t in range(3300):
    gt = g if t < 300 else np.zeros_like(g)
    state = step(params, state, jnp.asarray(gt, jnp.bfloat16))
    v64 = b2 * v64 + (1 - b2) * np.asarray(jnp.asarray(gt, jnp.bfloat16), F64) ** 2
    v = np.asarray(V.decode(state.nu), F64)
    worst = max(worst, float(np.max(np.abs(v / v64 - 1))))
  print(f"log16 v against float64 over 3300 steps: worst relative error {worst:.2e}")
  assert worst < 0.05, worst


def test_lean_state_and_master_params():
  """``mode="lean"``: compact's int8 residual, a bf16 m, a log16 v; ``master_params`` is compact's
  documented value ``hi + r·(ulp(hi)/2)/127`` (numpy, float64)."""
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=(8, 40)), jnp.bfloat16), "b": jnp.ones((40,), jnp.bfloat16)}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 1e-3, p.shape), jnp.bfloat16), params) for _ in range(20)]
  tx = co.adamw(1e-3, mode="lean")
  assert co.PRESETS["lean"] == ("compact", "bf16", "log16")
  params, state = _run(tx, params, grads)
  for name, p in params.items():
    assert state.lo[name].dtype == jnp.int8 and state.mu[name].dtype == jnp.bfloat16
    assert isinstance(state.nu[name], formats.Log16) and state.nu[name].codes.shape == p.shape
  master = co.master_params(params, state)
  for name, p in params.items():
    hi, r = np.asarray(p, F64), np.asarray(state.lo[name], F64)
    e = np.maximum(np.frexp(np.where(hi == 0, 1.0, hi))[1] - 1, -126 + 8)
    e = np.where(np.abs(hi) < 2.0**-118, -118, e)
    want = hi + r * 2.0 ** (e - 8) / 127
    np.testing.assert_allclose(np.asarray(master[name], F64), want, rtol=2.0**-22, atol=1e-37)
  assert np.count_nonzero(np.asarray(state.lo["w"])) > 0


def test_non_finite_gradient_poisons_only_its_element():
  """A NaN gradient element makes that element's v NaN; the rest of its group keeps its codes."""
  tx = co.adamw(1e-3, mode="lean")
  params = {"w": jnp.ones((2, 64), jnp.bfloat16)}
  state = tx.init(params)
  g = np.full((2, 64), 1e-3, F32)
  g[0, 1] = 2e-3
  gb = g.copy()
  gb[0, 1] = np.nan
  step = jax.jit(lambda p, s, gg: tx.update(gg, s, p)[1])
  good = step(params, state, {"w": jnp.asarray(g, jnp.bfloat16)})
  bad = step(params, state, {"w": jnp.asarray(gb, jnp.bfloat16)})
  vg, vb = np.asarray(V.decode(good.nu["w"])), np.asarray(V.decode(bad.nu["w"]))
  nan = np.isnan(vb)
  assert nan.sum() == 1 and nan[0, 1]
  assert np.array_equal(vb[~nan], vg[~nan])


# ---------------------------------------------------------------------------
# Sharding, orbax, nnx.
# ---------------------------------------------------------------------------


def test_state_shardings_give_log16_scales_their_own_layout():
  """On a one-device mesh: codes get the param's sharding, exponents one per group with the param's
  spec; ``sharded_init`` equals the eager init and ``abstract_state`` has its shapes and dtypes."""
  from jax.sharding import NamedSharding, PartitionSpec

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
  spec = PartitionSpec("x", None)
  params = {"w": jax.device_put(jnp.ones((4, 70), jnp.bfloat16), NamedSharding(mesh, spec))}
  tx = co.adamw(1e-3, mode="lean")
  sh = co.state_shardings(tx, params)
  assert isinstance(sh.nu["w"], formats.Log16)
  assert sh.nu["w"].codes.spec == spec and sh.nu["w"].scales.spec == spec
  state, jitted = tx.init(params), co.sharded_init(tx, params)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(state)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  abstract = co.abstract_state(tx, params)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(abstract)] == [(x.shape, x.dtype) for x in jax.tree.leaves(state)]
  assert jitted.nu["w"].scales.shape == (4, 3) and jitted.nu["w"].scales.sharding.spec == spec


_SHARDED = textwrap.dedent(
    """
    import json, sys
    import numpy as np, jax, jax.numpy as jnp, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import collage_optax as co

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
    specs = {"rows": P("fsdp", None), "cols": P(None, "fsdp"), "aligned": P(None, "fsdp")}
    shapes = {"rows": (16, 40), "cols": (6, 64), "aligned": (4, 256)}
    rng = np.random.default_rng(0)
    host = {k: rng.normal(size=s).astype(jnp.bfloat16) for k, s in shapes.items()}
    grads = [{k: rng.normal(0, 1e-3, s).astype(jnp.bfloat16) for k, s in shapes.items()} for _ in range(3)]
    tx = co.adamw(1e-3, mode="lean")
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    out = {}
    for where in ("mesh", "single"):
      if where == "mesh":
        params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()}
        state = co.sharded_init(tx, params)
        f = jax.jit(step, out_shardings=(jax.tree.map(lambda x: x.sharding, params), co.state_shardings(tx, params)))
      else:
        params, state, f = {k: jnp.asarray(v) for k, v in host.items()}, None, jax.jit(step)
        state = tx.init(params)
      for g in grads:
        params, state = f(params, state, g)
      nu = state.nu
      out[where] = {k: [np.asarray(nu[k].codes).tolist(), np.asarray(nu[k].scales).tolist(),
                        np.asarray(params[k].astype(jnp.float32)).tolist()] for k in host}
      if where == "mesh":
        spec = lambda a: [str(x) for x in a.sharding.spec] + ["None"] * (a.ndim - len(a.sharding.spec))
        out["specs"] = {k: [spec(nu[k].codes), spec(nu[k].scales),
                            list(nu[k].scales.sharding.shard_shape(nu[k].scales.shape))] for k in host}
    print(json.dumps(out))
    """
)


def test_fsdp_on_eight_devices_is_bitwise_one_device():
  """8 simulated CPU devices: codes sharded like the param; exponents sharded like it where the mesh
  divides the groups (rows; 256 = 8 shards of 32), replicated where a group spans shards (64 over 8);
  three jitted steps equal one device's bit for bit."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["mesh"] == out["single"]
  specs = out["specs"]
  assert specs["rows"][:2] == [["fsdp", "None"], ["fsdp", "None"]] and specs["rows"][2] == [2, 2]
  assert specs["cols"][0] == ["None", "fsdp"] and specs["cols"][2] == [6, 2]  # scales replicated
  assert specs["aligned"][1] == ["None", "fsdp"] and specs["aligned"][2] == [4, 1]


def test_orbax_round_trip(tmp_path, tree_bits):
  """A lean state (Log16 codes and exponents) saved and restored with orbax onto ``abstract_state``:
  bit for bit, and the restored state steps on."""
  ocp = pytest.importorskip("orbax.checkpoint")
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(8, 40)), jnp.bfloat16)}
  tx = co.adamw(1e-3, mode="lean")
  grads = [{"w": jnp.asarray(rng.normal(0, 1e-3, (8, 40)), jnp.bfloat16)} for _ in range(3)]
  params, state = _run(tx, params, grads)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params),
            "opt_state": co.abstract_state(tx, params)}
  with ocp.StandardCheckpointer() as ckpt:
    back = ckpt.restore(tmp_path / "ckpt", target)
  assert isinstance(back["opt_state"].nu["w"], formats.Log16)
  saved = {"params": params, "opt_state": state}
  assert [x.dtype for x in jax.tree.leaves(back)] == [x.dtype for x in jax.tree.leaves(saved)]
  assert tree_bits(back) == tree_bits(saved)
  assert tree_bits(_run(tx, params, grads[:1], state)) == tree_bits(
      _run(tx, back["params"], grads[:1], back["opt_state"]))


def test_nnx_optimizer_trains_with_lean():
  """``nnx.Optimizer(model, adamw(mode="lean"))``: the Log16 storage survives nnx's state handling (each
  of its arrays its own Variable), the state keeps its structure, the loss halves, v is in use."""
  nnx = pytest.importorskip("flax.nnx")
  bf = jnp.bfloat16
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (128, 8), jnp.float32)
  y = jnp.tanh(x @ jax.random.normal(kw, (8, 1)) / jnp.sqrt(8.0))
  x, y = x.astype(bf), y.astype(bf)

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(8, 32, param_dtype=bf, dtype=bf, rngs=rngs)
      self.fc2 = nnx.Linear(32, 1, param_dtype=bf, dtype=bf, rngs=rngs)

    def __call__(self, x):
      return self.fc2(jax.nn.gelu(self.fc1(x)))

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x).astype(jnp.float32) - y.astype(jnp.float32)) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, co.adamw(3e-3, mode="lean"), wrt=nnx.Param)
  structure0 = jax.tree.structure(optimizer.opt_state)
  losses = [float(train_step(model, optimizer, x, y)) for _ in range(60)]
  assert jax.tree.structure(optimizer.opt_state) == structure0
  assert losses[-1] < 0.5 * losses[0], losses
  nus = [n for n in jax.tree.leaves(optimizer.opt_state, is_leaf=lambda n: isinstance(n, formats.Log16))
         if isinstance(n, formats.Log16)]
  assert len(nus) == 4
  codes = [np.asarray(n.codes.get_value() if isinstance(n.codes, nnx.Variable) else n.codes) for n in nus]
  assert all(c.dtype == np.uint16 for c in codes) and sum(np.count_nonzero(c) for c in codes) > 0
  master = co.master_params(nnx.state(model, nnx.Param), optimizer.opt_state)
  assert {x.dtype for x in jax.tree.leaves(master)} == {jnp.dtype(jnp.float32)}
