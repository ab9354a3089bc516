"""The ``q8`` moment format: 8-bit codes and a bfloat16 scale per group of 32.

``m``: int8 codes ``c = round(127·φ(m/s))``, ``φ(y) = 2y/(1 + |y|)``; ``v``:
uint8 codes ``c = round(254·√v/s)``; ``s`` the group's largest finite
magnitude (of ``m``, of ``√v``) rounded to bfloat16, one per 32 consecutive
elements along the last axis; a non-finite element gets the NaN code (−128,
255) and is left out of its group's scale. References: numpy float64 of those
formulas (ml_dtypes for the scale's rounding, numpy's float32 ``sqrt``) and
optax's float32 adamw; never the library.

Inputs are gradient-like, at scales where a float16 scale would underflow or
overflow: ``m`` at 1e-2, 1e-6, 1e-8, 1e-20 and 1e30, ``v = g²`` for ``g`` at 1e-2,
1e-6, 1e-8, 1e-18 and 1e18 (1e-20² and 1e30² are outside float32), with
magnitudes spread over up to 12 decades within each group. XLA:CPU reads a
float32 subnormal ``v`` as zero (DAZ, see tests/test_formats.py); the reference
does too. It also flushes a decoded value below 2**-126 to zero (FTZ): a ``v``
of ~1e-38 (a gradient of ~1e-19) may decode to 0, an error of up to 2**-63
in ``√v``, allowed where the float64 decode of the codes is below 2**-126.

Measured (330k elements per scale): the codes equal the float64 formula's but
for 5 of 3.3M (off by one, float32 rounding at a tie); the largest error was
0.989·q8_bound(False)·s for ``m`` and 0.994·q8_bound(True)·s for ``√v``, in a
group whose scale rounds below ``s`` (its largest ``√v`` clips at code 254:
the bound is 2**-8, not 1/508); in the others ``√v`` stays within
1.0032·s/508, i.e. 1/508·(1 + 2**-8).
"""

from __future__ import annotations

import math
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
TINY = 2.0**-126
GROUP = 32
M = formats.moment_format("q8")
V = formats.moment_format("q8", second=True)
NAN_CODE = {False: -128, True: 255}

EXAMPLES = settings(max_examples=25, deadline=None)

M_SCALES = (1e-2, 1e-6, 1e-8, 1e-20, 1e30)
V_SCALES = (1e-2, 1e-6, 1e-8, 1e-18, 1e18)  # of g; v = g²
SHAPES = ((16, 130), (2000,), (8, 8, 32), (3, 7, 50))


DAZ, FTZ = S.backend_flushing()


# ---------------------------------------------------------------------------
# numpy references.
# ---------------------------------------------------------------------------


def fmt(second: bool) -> formats.MomentFormat:
  return V if second else M


def as_read(x) -> np.ndarray:
  """float32 ``x`` as this backend's arithmetic reads it (a subnormal is ±0 where DAZ)."""
  x = np.asarray(x, F32)
  return np.where(DAZ & (np.abs(x) < TINY), np.copysign(F32(0), x), x)




@np.errstate(invalid="ignore")
def magnitudes(x, second: bool) -> np.ndarray:
  """The grouped quantity (float64): ``m`` itself, or ``√v`` (numpy's float32 sqrt), 0 where not finite."""
  x = as_read(x)
  y = np.where(np.isfinite(x), x, F32(0))
  if second:
    y = np.sqrt(np.maximum(y, F32(0)))
  return y.astype(F64)


def group_max(x, second: bool) -> np.ndarray:
  """The group's largest finite magnitude, exact (float64), per element."""
  return R.per_element(np.max(np.abs(R.grouped(magnitudes(x, second))), axis=-1), np.shape(x))


def ref_q8(x, second: bool) -> tuple[np.ndarray, np.ndarray]:
  """(codes, scales) of the documented formulas, in float64."""
  x = np.asarray(x, F32)
  g = R.grouped(magnitudes(x, second))
  s = np.max(np.abs(g), axis=-1).astype(BF16)
  s64 = s.astype(F64)[..., None]
  y = np.where(s64 > 0, g / np.where(s64 > 0, s64, 1.0), 0.0)
  if second:
    c = np.clip(np.round(254.0 * y), 0, 254)
  else:
    c = np.clip(np.round(127.0 * 2 * y / (1 + np.abs(y))), -127, 127)
  n = x.shape[-1] if x.shape else 1
  c = c.reshape(*c.shape[:-2], -1)[..., :n].reshape(x.shape)
  return np.where(np.isfinite(x), c, NAN_CODE[second]), s


def ref_decode(codes, scales, second: bool) -> np.ndarray:
  """``s·φ⁻¹(c/127)`` (``φ⁻¹(z) = z/(2 − |z|)``) or ``(c·s/254)²`` (code 0 as 0.5), float64; NaN at the NaN code."""
  c = np.asarray(codes, F64)
  s = R.per_element(np.asarray(scales).astype(F64), np.shape(codes))
  if second:
    x = (np.where(c == 0, 0.5, c) * s / 254.0) ** 2  # code 0: the middle of [0, s/508)
  else:
    z = c / 127.0
    x = s * z / (2 - np.abs(z))
  return np.where(np.asarray(codes) == NAN_CODE[second], np.nan, x)


def fails(ok, what: str, **inputs) -> str:
  ok = np.asarray(ok)
  i = int(np.flatnonzero(~ok.ravel())[0])
  args = ", ".join(f"{k}={np.asarray(v).ravel()[i]!r}" for k, v in inputs.items())
  return f"{what}: {np.count_nonzero(~ok)} element(s); first (flat index {i}): {args}"


def moment_batch(rng: np.random.Generator, shape, scale: float, spread: float, second: bool) -> np.ndarray:
  """Gradient-like ``g ~ N(0.5, 1)·scale``, each element ``10**-U(0, spread)`` smaller, 5% zeros;
  ``m = g`` or ``v = g²`` as float32."""
  g = rng.normal(0.5, 1.0, shape) * scale * 10.0 ** -rng.uniform(0, spread, shape)
  g = np.where(rng.random(shape) < 0.05, 0.0, g)
  return np.asarray(g * g if second else g, F64).astype(F32)


_ENC = {second: jax.jit(fmt(second).encode) for second in (False, True)}
_DEC = {second: jax.jit(fmt(second).decode) for second in (False, True)}


def encode(x, second: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(codes, scales, decoded) of the library, jitted."""
  q = _ENC[second](jnp.asarray(x))
  return np.asarray(q.codes), np.asarray(q.scales), np.asarray(_DEC[second](q))


# ---------------------------------------------------------------------------
# Layout.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("second", [False, True], ids=["m", "v"])
@pytest.mark.parametrize("shape", [(3, 70), (5,), (), (2, 64), (4, 1, 33), (32,)])
def test_layout(second, shape):
  """Codes shaped like the param (int8 for m, uint8 for v), one bfloat16 scale per group of 32 along
  the last axis (a scalar: one); sizes that are no multiple of 32 are padded; 1 + 2/32 bytes."""
  f = fmt(second)
  assert f.name == "q8" and f.bytes == 1 + 2 / 32
  assert 1e37 < f.max <= float(np.finfo(F32).max)
  assert (formats.moment_format("q8") is formats.MOMENT_FORMATS["q8"]) and (V is not M)
  code_dtype = np.uint8 if second else np.int8
  scales_shape = (*shape[:-1], math.ceil(shape[-1] / GROUP)) if shape else (1,)
  for like in (BF16, np.dtype(F32)):
    z = f.zeros(jnp.zeros(shape, like))
    assert isinstance(z, formats.Q8)
    assert z.codes.dtype == code_dtype and z.codes.shape == shape
    assert z.scales.dtype == BF16 and z.scales.shape == scales_shape
    assert formats.moment_format_of(z) is f
    d = np.asarray(_DEC[second](z))
    assert d.dtype == F32 and d.shape == shape and np.all(d.view(np.uint32) == 0)  # +0.0
  x = moment_batch(np.random.default_rng(len(shape)), shape, 1e-3, 3, second)
  q = _ENC[second](jnp.asarray(x))
  assert isinstance(q, formats.Q8) and formats.moment_format_of(q) is f
  assert q.codes.dtype == code_dtype and q.codes.shape == shape
  assert q.scales.dtype == BF16 and q.scales.shape == scales_shape
  codes, scales = ref_q8(x, second)
  # The padded last group's scale is its own elements' largest (the padding adds nothing).
  assert np.array_equal(np.asarray(q.scales).view(np.uint16), scales.view(np.uint16).reshape(scales_shape))
  assert np.max(np.abs(np.asarray(q.codes).astype(np.int64) - codes)) <= 1
  assert np.asarray(_DEC[second](q)).shape == shape


def test_moment_format_of_tells_m_from_v():
  like = jnp.zeros((4, 40), jnp.bfloat16)
  assert formats.moment_format_of(M.zeros(like)) is M and formats.moment_format_of(V.zeros(like)) is V
  assert formats.moment_format("q8", second=True) is V and formats.moment_format(V) is V


# ---------------------------------------------------------------------------
# Precision.
# ---------------------------------------------------------------------------


@np.errstate(invalid="ignore")
def check_q8(x: np.ndarray, second: bool) -> None:
  """Codes equal to the float64 formula up to ±1 at rounding ties (nearly all exact), scales bit for
  bit, the decode the float64 formula of the codes, and the error within q8_bound of the group's largest."""
  codes, scales, d = encode(x, second)
  want_c, want_s = ref_q8(x, second)
  assert np.array_equal(scales.view(np.uint16), want_s.view(np.uint16)), "scales != bf16(group max)"
  diff = np.abs(codes.astype(np.int64) - want_c)
  assert np.all(diff <= 1), fails(diff <= 1, "code off by more than 1", x=x, code=codes, want=want_c)
  assert np.mean(diff == 0) >= 0.99, f"only {np.mean(diff == 0):.4f} of the codes are exact"
  d64 = d.astype(F64)
  want_d = ref_decode(codes, scales, second)
  # A decoded value below 2**-126 is a float32 subnormal, which FTZ flushes to 0 (a v of ~1e-38:
  # a gradient of ~1e-19, whose g² Adam's own float32 arithmetic flushes too).
  flushed = FTZ & (np.abs(want_d) < TINY) & (d64 == 0)
  s_el = R.per_element(scales.astype(F64), x.shape)
  ok = np.abs(d64 - want_d) <= 4 * R.ulp32(want_d) + (4 * R.ulp32(s_el) * s_el / 127 if second else 4 * R.ulp32(s_el))
  assert np.all(ok | flushed), fails(ok | flushed, "decode != the formula of its codes", x=x, decoded=d, want=want_d)
  s = group_max(x, second)
  true = magnitudes(x, second)
  err = np.abs(np.sqrt(d64) - true) if second else np.abs(d64 - true)
  ok = err <= formats.q8_bound(second) * s + 4 * R.ulp32(s) + np.where(flushed, np.sqrt(TINY) if second else TINY, 0)
  assert np.all(ok), fails(ok, "beyond q8_bound·s", x=x, decoded=d, group_max=s)


@EXAMPLES
@given(rng=S.seeds(), scale=st.sampled_from(M_SCALES), spread=st.integers(0, 12), shape=st.sampled_from(SHAPES))
def test_m_codes_and_bound(rng, scale, spread, shape):
  check_q8(moment_batch(rng, shape, scale, spread, False), False)


@EXAMPLES
@given(rng=S.seeds(), scale=st.sampled_from(V_SCALES), spread=st.integers(0, 12), shape=st.sampled_from(SHAPES))
def test_v_codes_and_bound(rng, scale, spread, shape):
  check_q8(moment_batch(rng, shape, scale, spread, True), True)


def test_v_bound_is_reached_where_the_scale_rounds_down():
  """Half the groups round their scale below the largest √v, which then clips at code 254: the error
  there reaches ~2**-8·s, twice half a code step (1/508); elsewhere 1/508·(1 + 2**-8) holds."""
  rng = np.random.default_rng(1)
  y = rng.uniform(0, 1, (4096, GROUP))
  y[:, 0] = rng.uniform(1, 2, 4096)  # the group's largest, with every bfloat16 rounding
  v = (y * y).astype(F32)
  _, scales, d = encode(v, True)
  s = group_max(v, True)
  err = np.abs(np.sqrt(d.astype(F64)) - magnitudes(v, True)) / s
  down = R.per_element(scales.astype(F64), v.shape) < s
  assert 0.3 < down.mean() < 0.7
  assert err[down].max() > 1.5 / 508 and err.max() <= formats.q8_bound(True) * (1 + 2.0**-20)
  assert err[~down].max() <= (1 + 2.0**-8) / 508 + 2.0**-20


@EXAMPLES
@given(rng=S.seeds(), k=st.integers(-40, 40), second=st.booleans(), shape=st.sampled_from(SHAPES[:2]))
def test_scale_invariance(rng, k, second, shape):
  """``x·2**k`` (``v·4**k``) has the codes of ``x``, the scales times ``2**k`` and the decode times
  ``2**k`` (``4**k``), bit for bit: the codes do not depend on the moments' scale."""
  x = moment_batch(rng, shape, 1.0, 6, second)
  # Nothing may underflow: elements that 2**-40 (v: 4**-40) would make subnormal are 0.
  x = np.where(np.abs(x) * 2.0 ** (-80 if second else -40) < 2.0**-120, F32(0), x)
  f = 2.0 ** (2 * k if second else k)
  codes, scales, d = encode(x, second)
  codes2, scales2, d2 = encode((x.astype(F64) * f).astype(F32), second)
  assert np.array_equal(codes2, codes)
  assert np.array_equal(scales2.astype(F64), scales.astype(F64) * 2.0**k)
  assert np.array_equal(d2.astype(F64), d.astype(F64) * f)


# ---------------------------------------------------------------------------
# Non-finite elements.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("second", [False, True], ids=["m", "v"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("seed", [0, 1])
def test_non_finite_element(second, bad, seed):
  """A NaN or ±inf element gets the NaN code and decodes to NaN; it is left out of its group's scale:
  every other element (of its group and the others) has the codes and decode it has with 0 there.
  Also: a non-finite element larger than the rest would have set the scale."""
  rng = np.random.default_rng(seed)
  x = moment_batch(rng, (4, 70), 1e-6, 4, second)
  where = [(0, 3), (1, 40), (2, 69), (3, 0), (3, 1)]  # several groups, the padded tail, two in one group
  x_bad, x_zero = x.copy(), x.copy()
  for i in where:
    x_bad[i], x_zero[i] = bad, 0
  mask = np.zeros(x.shape, bool)
  mask[tuple(np.array(where).T)] = True
  codes, scales, d = encode(x_bad, second)
  codes0, scales0, d0 = encode(x_zero, second)
  assert np.all(codes[mask] == NAN_CODE[second]) and np.all(np.isnan(d[mask]))
  assert np.all(codes[~mask] != NAN_CODE[second]) and not np.any(np.isnan(d[~mask]))
  assert np.array_equal(scales.view(np.uint16), scales0.view(np.uint16))
  assert np.array_equal(codes[~mask], codes0[~mask])
  assert np.array_equal(d[~mask].view(np.uint32), d0[~mask].view(np.uint32))
  want_c, want_s = ref_q8(x_bad, second)
  assert np.array_equal(codes.astype(np.int64), want_c)
  assert np.array_equal(scales.view(np.uint16), want_s.view(np.uint16))


def test_all_non_finite_group():
  """A group of NaNs only: scale 0, NaN codes; its neighbour groups unaffected."""
  x = np.ones((2, 64), F32)
  x[0, :GROUP] = np.nan
  for second in (False, True):
    codes, scales, d = encode(x, second)
    assert np.all(codes[0, :GROUP] == NAN_CODE[second]) and np.all(np.isnan(d[0, :GROUP]))
    assert scales.astype(F64)[0, 0] == 0 and np.all(scales.astype(F64).ravel()[1:] == 1.0)
    assert np.all(d[0, GROUP:] == 1.0) and np.all(d[1] == 1.0)


# ---------------------------------------------------------------------------
# adamw with q8 moments against optax's float32 adamw.
# ---------------------------------------------------------------------------


def _run(tx, params, grads):
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  for g in grads:
    params, state = step(params, state, g)
  return params, state


@pytest.mark.parametrize("scale", [1e-2, 1e-6, 1e-8])
def test_adamw_tracks_float32_under_gradient_rescaling(scale):
  """100 steps on 4096 params (64 x 64), gradients ~N(0.5·s, s) as bfloat16 (optax gets their float32
  values), lr 1e-3, no weight decay, the same bfloat16-representable initial params: the displacement
  ||θ_100 − θ_0|| of ``adamw(mode="compact")`` and of ``adamw(param_format="exact", mu_format="q8",
  nu_format="q8")`` is within 2% of optax.adamw's, at every gradient scale (an fp16 scale would
  underflow at 1e-6 and 1e-8). Measured displacement ratios 1.00065–1.00104 (compact) and
  1.00065–1.00101 (exact + q8); error ||θ − θ_optax|| / ||θ_optax − θ_0|| 5.4e-3–6.0e-3 and
  4.7e-3–5.8e-3 (asserted < 2e-2)."""
  rng = np.random.default_rng(0)
  theta0 = jnp.asarray(rng.normal(size=(64, 64)), jnp.bfloat16)
  grads = [jnp.asarray(rng.normal(0.5 * scale, scale, (64, 64)), jnp.bfloat16) for _ in range(100)]
  ref, _ = _run(optax.adamw(1e-3, weight_decay=0.0), theta0.astype(jnp.float32), [g.astype(jnp.float32) for g in grads])
  t0, ref = np.asarray(theta0, F64), np.asarray(ref, F64)
  travel = np.linalg.norm(ref - t0)
  txs = {
      "compact": co.adamw(1e-3, weight_decay=0.0, mode="compact"),
      "exact+q8": co.adamw(1e-3, weight_decay=0.0, param_format="exact", mu_format="q8", nu_format="q8"),
  }
  report = []
  for name, tx in txs.items():
    params, state = _run(tx, theta0, grads)
    assert isinstance(state.mu, formats.Q8) and state.nu.codes.dtype == jnp.uint8
    theta = np.asarray(co.master_params(params, state), F64)
    ratio = np.linalg.norm(theta - t0) / travel
    err = np.linalg.norm(theta - ref) / travel
    report.append(f"{name}: displacement ratio {ratio:.5f}, error {err:.2e}")
    assert abs(ratio - 1) < 0.02, report[-1]
    assert err < 2e-2, report[-1]
  print(f"scale {scale:g}: " + "; ".join(report))


# ---------------------------------------------------------------------------
# The XLA trap: a fresh process with --xla_allow_excess_precision.
# ---------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np, jax, jax.numpy as jnp
    from collage_optax import formats

    data = dict(np.load(sys.argv[1]))
    out = {}
    for name, second in (("m", False), ("v", True)):
      f = formats.moment_format("q8", second=second)
      x = jnp.asarray(data[name])
      q = jax.jit(f.encode)(x)
      out[f"{name}_codes"] = np.asarray(q.codes)
      out[f"{name}_scales"] = np.asarray(q.scales).view(np.uint16)
      # Fused: the decode of this step's encode, consumed by arithmetic (as adamw's step does).
      out[f"{name}_dec"] = np.asarray(jax.jit(lambda v: f.decode(f.encode(v * 1.0)) * 1.0)(x)).view(np.uint32)
    np.savez(sys.argv[2], **out)
    """
)


@pytest.mark.parametrize("excess", ["true", "false"])
def test_q8_under_xla_allow_excess_precision(excess, run_with_excess_precision):
  """Codes, scales and decoded values of the jitted (and fused) encode in a fresh process, with
  excess precision allowed or not, equal the eager ones of this process bit for bit."""
  rng = np.random.default_rng(5)
  xs = {"m": np.concatenate([moment_batch(rng, (8, 200), s, 3, False) for s in M_SCALES]),
        "v": np.concatenate([moment_batch(rng, (8, 200), s, 3, True) for s in V_SCALES])}
  xs["m"][0, :5] = [np.nan, np.inf, -np.inf, 0.0, -0.0]
  xs["v"][0, :3] = [np.nan, np.inf, 0.0]
  got, _ = run_with_excess_precision(_CHILD, xs, excess)
  for name, second in (("m", False), ("v", True)):
    f = fmt(second)
    q = f.encode(jnp.asarray(xs[name]))  # eager: op by op
    d = np.asarray(f.decode(q))
    assert np.array_equal(got[f"{name}_codes"], np.asarray(q.codes)), name
    assert np.array_equal(got[f"{name}_scales"], np.asarray(q.scales).view(np.uint16)), name
    gd, nan = got[f"{name}_dec"].view(F32), np.isnan(d)
    assert np.array_equal(np.isnan(gd), nan) and np.array_equal(gd[~nan].view(np.uint32), d[~nan].view(np.uint32)), name
    assert np.count_nonzero(np.asarray(q.codes)) > 4000


def test_a_small_element_next_to_a_large_one_never_steps_too_far():
  """A group of 32 where one element's gradient alternates ±100 and another's is a steady 0.1:
  the small one's √v (0.1) is under half a code step of the group's scale (~3), so it is stored as
  code 0. Decoded at 0 it would make the next step's ``v`` just ``(1 − b2)·g²`` and the step
  ``m/(√0.001·|g|)``, up to 31× Adam's (measured 14× by step 300); decoded at the middle of its
  code's range, the step is smaller than Adam's, never larger (measured 0.32–0.45 of it)."""
  lr = 1e-3
  tx, ref = co.adamw(lr, weight_decay=0.0, mode="compact"), optax.adamw(lr, weight_decay=0.0)
  p, pr = {"w": jnp.zeros((32,), jnp.bfloat16)}, {"w": jnp.zeros((32,), jnp.float32)}
  s, sr = tx.init(p), ref.init(pr)

  @jax.jit
  def step(p, s, pr, sr, t):
    g = jnp.zeros(32).at[0].set(100.0 * jnp.where(t % 2 == 0, 1.0, -1.0)).at[1].set(0.1)
    before = co.master_params(p, s)["w"][1]
    u, s = tx.update({"w": g.astype(jnp.bfloat16)}, s, p)
    p = optax.apply_updates(p, u)
    ur, sr = ref.update({"w": g}, sr, pr)
    return p, s, optax.apply_updates(pr, ur), sr, co.master_params(p, s)["w"][1] - before, ur["w"][1]

  ratios = []
  for t in range(300):
    p, s, pr, sr, d, dr = step(p, s, pr, sr, t)
    ratios.append(float(d) / float(dr))
  assert 0 < min(ratios) and max(ratios) < 1.05, (min(ratios), max(ratios))
