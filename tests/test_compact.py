"""The ``compact`` param format: bfloat16 ``hi`` + int8 residual, ~15 bits.

``hi`` is the bfloat16 nearest the float32 ``x`` (ties to even), the residual
``r = round(127·(x − hi)/u)`` with ``u = ulp(hi)/2`` held at ``2**-126`` below
``2**-118``, and the value ``hi + r·u/127``. References: numpy float64 of that
formula, ml_dtypes for the bfloat16 rounding, optax itself; never the library.

Measured (2 cores, XLA:CPU, which flushes float32 subnormals): the round trip
is within ``u/254`` (``ulp(hi)/508``; ``2**-126/254`` absolute below
``2**-118``); the tests allow half a float32 ulp of ``x`` more for the final
rounding. Over 3.2M values (every binade, and 2**-126 to 2**-100 densely) the
largest error was 0.99994 of ``u/254`` for ``|hi| >= 2**-118`` and 0.9999995
below, never beyond it. The residual equals the float64 formula's everywhere. A float32 subnormal ``x`` is read as
zero by the arithmetic (DAZ; see tests/test_formats.py): its pair decodes within
``2**-126`` of it. Before the residual's arithmetic was lifted by ``2**64``
(formats._compact_lift), ``x − hi`` and the unit ``u/127`` were float32
subnormals for ``|hi| < 2**-110`` and were flushed: the error reached
``ulp(hi)/2`` (bfloat16's own) there.
"""

from __future__ import annotations

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

COMPACT = formats.PARAM_FORMATS["compact"]
F32, F64 = np.float32, np.float64
BF16 = np.dtype(ml_dtypes.bfloat16)
TINY = 2.0**-126
BF16_MAX = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
TOP = 0x7F7F7FFF  # the largest float32 magnitude that rounds to a finite bfloat16 (0x7F7F8000 ties to inf)
N = 512
UDTYPES = {"f32": jnp.dtype(jnp.float32), "bf16": jnp.dtype(jnp.bfloat16)}

EXAMPLES = settings(max_examples=25, deadline=None)


DAZ, FTZ = S.backend_flushing()
FLUSH = DAZ or FTZ


# ---------------------------------------------------------------------------
# numpy references.
# ---------------------------------------------------------------------------


def bf16(x) -> np.ndarray:
  """The ml_dtypes cast (round to nearest even, overflow to ±inf)."""
  with np.errstate(all="ignore"):
    return np.asarray(x).astype(BF16)


def unit(hi) -> np.ndarray:
  """``u = max(ulp(hi)/2, 2**-126)`` of a bfloat16 ``hi`` (float64)."""
  return np.maximum(R.ulp(np.asarray(hi, F64)) / 2, TINY)


def subnormal(x) -> np.ndarray:
  a = np.abs(np.asarray(x, F64))
  return (a > 0) & (a < TINY)


def as_read(x) -> np.ndarray:
  """``x`` as this backend's float32 arithmetic reads it (a subnormal is ±0 where DAZ)."""
  x = np.asarray(x, F64)
  return np.where(DAZ & subnormal(x), np.copysign(0.0, x), x)


@np.errstate(all="ignore")
def ref_residual(x, at) -> np.ndarray:
  """``clip(round(127·(x − at)/u(at)), ±127)`` in float64 (0 where ``at`` or ``x`` is not finite)."""
  x, at = as_read(x), np.asarray(at, F64)
  r = np.clip(np.round(127.0 * (x - at) / unit(at)), -127, 127)
  return np.where(np.isfinite(at) & np.isfinite(x), r, 0.0)


def ref_decode(at, r) -> np.ndarray:
  """``at + r·u(at)/127`` in float64."""
  at = np.asarray(at, F64)
  return at + np.asarray(r, F64) * unit(at) / 127.0


def fails(ok, what: str, **inputs) -> str:
  """A message naming the first failing element's inputs (with their bits)."""
  i = int(np.flatnonzero(~np.asarray(ok))[0])
  parts = []
  for k, v in inputs.items():
    v = np.asarray(v).ravel()[i]
    b = np.asarray(v).view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[np.asarray(v).dtype.itemsize])
    parts.append(f"{k}={v!r} (0x{int(b):X})")
  return f"{what}: {np.count_nonzero(~np.asarray(ok))} element(s); first: " + ", ".join(parts)


# ---------------------------------------------------------------------------
# Inputs: float32 bit patterns within bfloat16's range.
# ---------------------------------------------------------------------------


def _bits(v) -> int:
  return int(np.asarray(v, F32).view(np.uint32))


# Magnitudes: ±0, subnormals (the smallest, the largest, one that rounds up to 2**-126), 2**-126,
# the edges of the unit's floor (2**-118) and of the lift (2**-110, 2**-64), 1, bfloat16's max and
# the largest float32 below its tie with inf.
LANDMARKS = np.array([
    0, 1, 0x7FFFFF, 0x7FFFFF - 0x7FFF, 1 << 23, (1 << 23) + 1,
    _bits(2.0**-118) - 1, _bits(2.0**-118), _bits(2.0**-110) - 1, _bits(2.0**-110),
    _bits(2.0**-64) - 1, _bits(2.0**-64), _bits(1.0) - 1, _bits(1.0), _bits(BF16_MAX), TOP,
], np.int64)


def f32_batch(rng: np.random.Generator, n: int, pins=None) -> np.ndarray:
  """float32s with ``|x| <= TOP``: uniform bit patterns (every binade), neighbours of a binade edge
  ``2**e`` (from below they round up into the next binade, whose ulp is twice as large), bfloat16
  ties and their neighbours (the halfway point below an edge too), and the landmarks."""
  free = S.raw_magnitudes(S.F32, rng, n, TOP)
  edge = rng.integers(1, 255, n).astype(np.int64) << 23
  tie = (S.raw_magnitudes(S.F32, rng, n, TOP) & ~0xFFFF) | 0x8000
  j = rng.integers(-3, 4, n)
  kind = rng.integers(0, 5, n)
  mags = np.select([kind == 0, kind == 1, kind == 2, kind == 3],
                   [free, edge + j, edge - 0x8000 + j, tie + j], rng.choice(LANDMARKS, n))
  mags, signs = S._pin(np.clip(mags, 0, TOP), S._signs(rng, n), pins)
  return S.from_bits(S.F32, np.clip(mags, 0, TOP), signs)


def f32_inputs() -> st.SearchStrategy[np.ndarray]:
  return st.tuples(S.seeds(), S.pinned(S.F32)).map(lambda t: f32_batch(t[0], N, t[1]))


def _step(x, p, udt):
  """encode, optax.apply_updates, decode: ``(u, r, landed, decoded)``."""
  u, r = COMPACT.encode(x, p, udt)
  q = optax.apply_updates(p, u)
  return u, r, q, COMPACT.decode(q, r)


STEP = jax.jit(_step, static_argnums=2)


# ---------------------------------------------------------------------------
# Round trip.
# ---------------------------------------------------------------------------


@EXAMPLES
@given(x=f32_inputs(), start=st.sampled_from(["hi", "zero"]), udt=st.sampled_from(list(UDTYPES)))
def test_round_trip(x, start, udt):
  """From ``p = bf16(x)`` (a step that does not move ``hi``) or ``p = 0``: ``apply_updates`` lands on the
  nearest-even bfloat16 of ``x``; ``r`` is the float64 formula's, in [−127, 127]; the pair decodes
  to ``hi + r·u/127`` (to float32 rounding), within ``u/254 + R.ulp32(x)/2`` of ``x``."""
  hi = bf16(x)
  p = hi if start == "hi" else np.zeros_like(hi)
  u, r, q, d = (np.asarray(a) for a in STEP(jnp.asarray(x), jnp.asarray(p), UDTYPES[udt]))
  assert u.dtype == UDTYPES[udt] and r.dtype == np.int8 and q.dtype == BF16 and d.dtype == F32
  assert np.all(np.abs(r.astype(np.int64)) <= 127), fails(np.abs(r.astype(np.int64)) <= 127, "|r| > 127", x=x)
  # A bfloat16 subnormal hi is read as zero by the landing's addition where DAZ: it lands on 0.
  # (A −0 hi lands on +0: p + u is −0 + +0.)
  sub = DAZ & subnormal(hi.astype(F64))
  zero = (hi.astype(F64) == 0) | sub
  ok = (q.view(np.uint16) == hi.view(np.uint16)) | (zero & (q.astype(F64) == 0))
  assert np.all(ok), fails(ok, "landed != round-to-nearest-even(x)", x=x, landed=q)
  want_r = ref_residual(x, q)
  assert np.all(r == want_r), fails(r == want_r, "r != float64 formula", x=x, r=r)
  x64, d64, want = x.astype(F64), d.astype(F64), ref_decode(q, r)
  slack = R.ulp32(want) + np.where(FLUSH & (np.abs(want) < TINY), TINY, 0.0)
  ok = np.abs(d64 - want) <= slack
  assert np.all(ok), fails(ok, "decode != hi + r·u/127", x=x, decoded=d)
  # The precision: u/254 (ulp(hi)/508, or 2**-126/254 below 2**-118), plus the final float32 rounding.
  err, bound = np.abs(d64 - x64), unit(hi) / 254 + R.ulp32(x64) / 2
  flushed = DAZ & subnormal(x64)
  ok = np.where(flushed, err <= TINY, err <= bound)
  assert np.all(ok), fails(ok, "round trip beyond u/254", x=x, decoded=d)


def test_round_trip_tiny_values_keep_their_residual():
  """Just above the float32 subnormals the pair still holds ``x`` to ``2**-126/254`` (absolute):
  every binade from 2**-126 to 2**-100, where ``x − hi`` and the unit are float32 subnormals."""
  rng = np.random.default_rng(0)
  e = rng.integers(-126, -100, 4096).astype(F64)
  x = (rng.uniform(1, 2, 4096) * np.exp2(e) * np.where(rng.random(4096) < 0.5, -1, 1)).astype(F32)
  hi = bf16(x)
  _, r, _, d = (np.asarray(a) for a in STEP(jnp.asarray(x), jnp.asarray(hi), UDTYPES["f32"]))
  err = np.abs(d.astype(F64) - x.astype(F64))
  bound = unit(hi) / 254 + R.ulp32(x) / 2
  assert np.all(err <= bound), fails(err <= bound, "tiny x loses its residual", x=x, decoded=d)
  assert np.count_nonzero(r) > 3000  # the residual is used, not flushed to 0


@pytest.mark.parametrize("udt", list(UDTYPES))
def test_nan_and_inf(udt):
  """A NaN target lands on NaN, ±inf (and a finite x past bfloat16's tie with inf) on ±inf, as
  ``apply_updates(p, x − p)`` would; r = 0, and the pair decodes to the same NaN / ±inf."""
  xs = np.array([np.nan, -np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, np.finfo(F32).max,
                 S.from_bits(S.F32, TOP + 1, False)], F32)
  ps = np.array([0.0, 1.5, -2.0, BF16_MAX, -BF16_MAX, 2.0**-100], F32).astype(BF16)
  x, p = (a.ravel() for a in np.meshgrid(xs, ps, indexing="ij"))
  _, r, q, d = (np.asarray(a) for a in STEP(jnp.asarray(x), jnp.asarray(p), UDTYPES[udt]))
  want = bf16(x).astype(F32)  # NaN, or ±inf
  assert np.all(r == 0)
  assert np.array_equal(np.isnan(q.astype(F32)), np.isnan(want)) and np.array_equal(np.isnan(d), np.isnan(want))
  inf = np.isinf(want)
  assert np.all(q.astype(F32)[inf] == want[inf]) and np.all(d[inf] == want[inf])
  # What optax would do with the plain float32 step: the same non-finite param.
  with np.errstate(over="ignore"):
    plain = np.asarray(optax.apply_updates(jnp.asarray(p), jnp.asarray(x - p.astype(F32)).astype(UDTYPES[udt])))
  assert np.array_equal(np.isnan(plain.astype(F32)), np.isnan(want))
  assert np.all(plain.astype(F32)[inf] == want[inf])


# ---------------------------------------------------------------------------
# Landing misses.
# ---------------------------------------------------------------------------


@np.errstate(all="ignore")
def check_miss(p: np.ndarray, x: np.ndarray, udt) -> int:
  """encode ``x`` on ``p`` (finite, ``bf16(x)`` finite): the residual is the float64 formula's
  taken from wherever ``apply_updates`` lands, clipped; the error is at most the part of the miss
  beyond the residual's reach, ``max(0, |x − at| − u(at))``, plus ``u(at)/254``; never NaN, always
  finite. Returns the number of misses."""
  _, r, q, d = (np.asarray(a) for a in STEP(jnp.asarray(x), jnp.asarray(p), udt))
  x64, p64, at, d64 = x.astype(F64), p.astype(F64), q.astype(F64), d.astype(F64)
  hi = bf16(x).astype(F64)
  assert np.all(np.isfinite(d)), fails(np.isfinite(d), "finite x decodes non-finite", x=x, p=p, decoded=d)
  want_r = ref_residual(x, q)
  assert np.all(r == want_r), fails(r == want_r, "r != float64 formula", x=x, p=p, landed=q, r=r)
  want = ref_decode(q, r)
  ok = np.abs(d64 - want) <= R.ulp32(want) + np.where(FLUSH & (np.abs(want) < TINY), TINY, 0.0)
  assert np.all(ok), fails(ok, "decode != at + r·u/127", x=x, p=p, landed=q, decoded=d)
  xr = as_read(x64)
  bound = np.maximum(0.0, np.abs(xr - at) - unit(at)) + unit(at) / 254 + R.ulp32(xr) + R.ulp32(d64)
  # A subnormal x is read as ±0 (DAZ); a decoded value below 2**-126 is flushed to ±0 (FTZ): e.g.
  # x = −2**-126 on p = −1.52e-38, whose float32 update hi − p (3.4e-39) flushes to 0, so the pair
  # stays at p with r = 38, worth −1.1728e-38, a subnormal.
  bound = bound + np.where((DAZ & subnormal(x64)) | (FLUSH & (np.abs(want) < TINY)), TINY, 0.0)
  ok = np.abs(d64 - x64) <= bound
  assert np.all(ok), fails(ok, "error beyond the clipped miss", x=x, p=p, landed=q, decoded=d)
  # Where hi − p is exactly a udt number (Knuth's TwoSum in float64), optax lands on hi.
  dd = hi - p64
  bb = dd - hi
  exact = ((hi - (dd - bb)) + (-p64 - bb) == 0) & (dd.astype(np.dtype(udt)).astype(F64) == dd)
  if FLUSH:
    exact &= np.logical_and.reduce([(v == 0) | (np.abs(v) >= TINY) for v in (p64, hi, dd)])
  ok = ~exact | (at == hi)
  assert np.all(ok), fails(ok, "an exact update missed", x=x, p=p, landed=q)
  return int(np.count_nonzero(at != hi))


MISSES = [  # (p, x): zero crossings, across many binades, far below ulp(p), p at bfloat16's max
    (-1.52447e-38, -(2.0**-126)), (1e-3, 1e-9), (1e-3, -1e-9), (1e-3, -1e-3 / 3), (1e-3, 1e-3 / 3), (-1e-3, 2e-3),
    (1.0, -1.0 - 2.0**-12),
    (1.0, 300.7), (300.0, 1e-3), (2.0**100, 2.0**90), (-(2.0**100), 3.0), (2.0**100, -(2.0**-100)),
    (-5.0, 7.3e-5), (2.0**-100, -(2.0**-120)), (1e-30, 1e30), (1.0, 1e-38), (BF16_MAX, -BF16_MAX),
    (BF16_MAX, 1.0), (-BF16_MAX, BF16_MAX / 3), (0.5, -1e-4), (1.0, 1e-5), (2.0**-126, -(2.0**-126)),
]


@pytest.mark.parametrize("udt", list(UDTYPES))
def test_landing_misses(udt):
  p = np.array([a for a, _ in MISSES], F64).astype(BF16)
  x = np.array([b for _, b in MISSES], F32)
  misses = check_miss(p, x, UDTYPES[udt])
  assert misses >= (10 if udt == "bf16" else 3)  # the cases do miss


def miss_batch(rng: np.random.Generator, n: int):
  """Normal bfloat16 params ``p`` and targets across zero (``−p·f``), binades away (``p·2**±j``),
  near zero (``p·2**-j``), or unrelated (any float32 of bfloat16's range)."""
  mags = rng.integers(1 << 7, 0x7F7F + 1, n)  # normal bfloat16 magnitudes
  p = S.from_bits(S.BF16, mags, S._signs(rng, n))
  p64 = p.astype(F64)
  sign = np.where(S._signs(rng, n), -1.0, 1.0)
  j = rng.integers(1, 40, n).astype(F64)
  kinds = [
      -p64 * rng.uniform(0.0, 3.0, n),
      p64 * rng.uniform(1.0, 2.0, n) * np.exp2(sign * j),
      sign * p64 * np.exp2(-j - 8),
      S.from_bits(S.F32, S.raw_magnitudes(S.F32, rng, n, TOP), S._signs(rng, n)).astype(F64),
  ]
  with np.errstate(all="ignore"):
    x = np.choose(rng.integers(0, len(kinds), n), kinds).astype(F32)
  x = np.where(np.isfinite(bf16(x).astype(F32)), x, F32(1.0))  # within bfloat16's range
  return p, x


@EXAMPLES
@given(rng=S.seeds(), udt=st.sampled_from(list(UDTYPES)))
def test_landing_misses_random(rng, udt):
  p, x = miss_batch(rng, N)
  check_miss(p, x, UDTYPES[udt])


# ---------------------------------------------------------------------------
# The optimizers.
# ---------------------------------------------------------------------------


def _train(tx, params, grads):
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  for g in grads:
    params, state = step(params, state, g)
  return params, state


def test_adamw_compact_state_and_master_params():
  """``mode="compact"``: int8 residuals, q8 moments (int8 m, uint8 v); ``master_params`` is the
  float64 decode formula of (param, residual) to float32 rounding, and the residuals are used."""
  rng = np.random.default_rng(0)
  shapes = {"w": (64, 48), "b": (70,), "s": ()}
  params = {k: jnp.asarray(rng.normal(size=s), jnp.bfloat16) for k, s in shapes.items()}
  grads = [{k: jnp.asarray(rng.normal(size=s), jnp.bfloat16) for k, s in shapes.items()} for _ in range(20)]
  tx = co.adamw(1e-3, weight_decay=0.1, mode="compact")
  params, state = _train(tx, params, grads)
  master = co.master_params(params, state)
  used = 0
  for k, s in shapes.items():
    lo, mu, nu = state.lo[k], state.mu[k], state.nu[k]
    assert lo.dtype == jnp.int8 and lo.shape == s
    assert isinstance(mu, formats.Q8) and mu.codes.dtype == jnp.int8 and mu.codes.shape == s
    assert isinstance(nu, formats.Q8) and nu.codes.dtype == jnp.uint8 and nu.codes.shape == s
    assert formats.param_format_of(lo) is COMPACT
    want = ref_decode(np.asarray(params[k]), np.asarray(lo))
    got = np.asarray(master[k]).astype(F64)
    assert master[k].dtype == jnp.float32
    assert np.all(np.abs(got - want) <= R.ulp32(want)), k
    used += int(np.count_nonzero(np.asarray(lo)))
  assert used > 0.9 * sum(int(np.prod(s)) for s in shapes.values())


@pytest.mark.parametrize("make", ["adamw", "compensate"])
def test_float16_params_are_refused_naming_the_leaf(make):
  tx = co.adamw(1e-3, mode="compact") if make == "adamw" else co.compensate(param_format="compact")
  params = {"enc": {"w": jnp.ones((3,), jnp.float16)}, "b": jnp.ones((2,), jnp.bfloat16)}
  with pytest.raises(TypeError, match=r"leaf \['enc'\]\['w'\].*'compact' keeps bfloat16 params.*param_format='mcf'"):
    tx.init(params)


def test_compensate_compact_tracks_float64_sgd():
  """``optax.chain(optax.sgd(lr), compensate(param_format="compact"))`` on bfloat16 params against float64
  SGD (the same float32 gradients, which do not depend on the params): 300 steps of ~1e-4 on params
  ~N(0, 1), well below their half ulp. Measured error ||θ − θ64|| / ||θ64 − θ0||: compact 3.8e-3,
  plain bfloat16 (``optax.sgd`` + ``apply_updates``) 0.97 (it stalls), float32 SGD 1.5e-5."""
  rng = np.random.default_rng(0)
  n, steps, lr = 4096, 300, 1e-4
  theta0 = rng.normal(size=n).astype(BF16)
  grads = [rng.normal(1.0, 1.0, n).astype(F32) for _ in range(steps)]
  ref = theta0.astype(F64) - lr * np.sum(np.asarray(grads, F64), axis=0)
  rel = lambda t: float(np.linalg.norm(np.asarray(t, F64) - ref) / np.linalg.norm(ref - theta0.astype(F64)))
  tx = optax.chain(optax.sgd(lr), co.compensate(param_format="compact"))
  p, state = _train(tx, jnp.asarray(theta0), [jnp.asarray(g) for g in grads])
  compact = rel(co.master_params(p, state))
  plain = rel(_train(optax.sgd(lr), jnp.asarray(theta0), [jnp.asarray(g) for g in grads])[0].astype(jnp.float32))
  f32 = rel(_train(optax.sgd(lr), jnp.asarray(theta0, jnp.float32), [jnp.asarray(g) for g in grads])[0])
  print(f"error vs float64 SGD: compact {compact:.2e}, plain bf16 {plain:.2e}, float32 {f32:.2e}")
  assert state[1].lo.dtype == jnp.int8
  assert plain > 0.5
  assert compact < 1e-2 and compact < plain / 100


# ---------------------------------------------------------------------------
# The XLA trap: a fresh process with --xla_allow_excess_precision.
# ---------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np, ml_dtypes, jax, jax.numpy as jnp, optax
    from collage_optax import formats

    f = formats.PARAM_FORMATS["compact"]
    data = dict(np.load(sys.argv[1]))
    out = {}
    for case in ("trip", "miss"):
      x = jnp.asarray(data[f"{case}_x"])
      p = jnp.asarray(data[f"{case}_p"].view(ml_dtypes.bfloat16))
      for udt in ("float32", "bfloat16"):

        @jax.jit
        def step(v, q):
          u, r = f.encode(v, q, jnp.dtype(udt))
          q2 = optax.apply_updates(q, u)
          return u, r, q2, f.decode(q2, r) * 1.0

        u, r, q2, dec = step(x, p)
        out[f"{case}_{udt}_u"] = np.asarray(u).view(np.uint32 if udt == "float32" else np.uint16)
        out[f"{case}_{udt}_r"] = np.asarray(r)
        out[f"{case}_{udt}_q"] = np.asarray(q2).view(np.uint16)
        out[f"{case}_{udt}_d"] = np.asarray(dec).view(np.uint32)
    np.savez(sys.argv[2], **out)
    """
)


@pytest.mark.parametrize("excess", ["true", "false"])
def test_compact_under_xla_allow_excess_precision(excess, run_with_excess_precision):
  """The fused jitted step in a fresh process, with excess precision allowed or not, gives the
  bits of the eager (op by op) step in this one."""
  rng = np.random.default_rng(3)
  x = f32_batch(rng, 4096)
  cases = {"trip": (x, bf16(x)), "miss": miss_batch(rng, 4096)[::-1]}
  saved = {}
  for case, (xc, pc) in cases.items():
    saved[f"{case}_x"], saved[f"{case}_p"] = xc, pc.view(np.uint16)
  got, _ = run_with_excess_precision(_CHILD, saved, excess)
  for case, (xc, pc) in cases.items():
    for udt in ("float32", "bfloat16"):
      u, r, q, d = (np.asarray(a) for a in _step(jnp.asarray(xc), jnp.asarray(pc), jnp.dtype(udt)))
      key = f"{case}_{udt}"
      assert np.count_nonzero(r) > 1000  # residuals to lose
      nan = np.isnan(d)
      assert np.array_equal(got[f"{key}_u"], u.view(got[f"{key}_u"].dtype)), key
      assert np.array_equal(got[f"{key}_r"], r), key
      assert np.array_equal(got[f"{key}_q"], q.view(np.uint16)), key
      gd = got[f"{key}_d"].view(F32)
      assert np.array_equal(np.isnan(gd), nan), key
      assert np.array_equal(gd[~nan].view(np.uint32), d[~nan].view(np.uint32)), key


def _update_temporaries(mode: str, leaves: int, shape=(256, 1024)) -> int:
  """Temporaries of a compiled, donated ``adamw`` step over ``leaves`` equal bf16 leaves (CPU)."""
  params = {f"w{i}": jax.ShapeDtypeStruct(shape, jnp.bfloat16) for i in range(leaves)}
  tx = co.adamw(1e-3, mode=mode)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = jax.eval_shape(tx.init, params)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("mode", ["compact", "lean"])
def test_grouped_moments_scratch_is_one_leaf_at_a_time(mode):
  """The float32 scratch of a grouped moment (decoded values, group maxima)
  is live for one leaf at a time (``_kernel.adam_then``): eight leaves need
  at most two leaves' scratch plus the seven other bf16 updates that wait for
  ``apply_updates``, not eight leaves' scratch (XLA:CPU would otherwise run
  the leaves side by side: 8x)."""
  one, eight = _update_temporaries(mode, 1), _update_temporaries(mode, 8)
  updates = 256 * 1024 * 2
  assert eight <= 2 * one + 7 * updates, (one, eight)
