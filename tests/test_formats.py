"""The storage formats of ``collage_optax.formats`` against numpy / ml_dtypes.

Every reference here is computed with numpy, ml_dtypes and float64, never with
the library: a narrowing is an ml_dtypes/numpy cast (round to nearest even,
overflow to ``±inf``), a float32 sum or difference is the float64 one rounded
to float32 (exact double rounding, 53 >= 2*24 + 2). Each check runs eagerly,
under ``jit`` and fused into one ``jit`` with its consumer (XLA may compute a chain of
bfloat16 ops in float32 and skip the roundings in between), and once more in a subprocess with
``--xla_allow_excess_precision=true``.

Subnormals. XLA on CPU reads float32 subnormal operands of arithmetic as zero
(DAZ) and flushes subnormal float32 results (FTZ); ``mcf.py``'s module
docstring documents it. The references apply what this backend does (probed
below) to each float32 ``+``/``-``; roundings and bit shifts are not arithmetic
and keep subnormals. So on CPU: a ``bf16`` moment keeps a bfloat16 subnormal
(``widen`` is a bit shift); an ``mcf`` moment of a float32 subnormal has
``hi = round(x)``, ``lo = 0`` (``mcf.from_float``'s documented split) and
decodes to zero (``hi + lo`` reads ``hi`` as zero); ``f32`` keeps it.

Precision floors: an ``mcf`` moment or a landed ``mcf`` param
is within ``2**-16·|x|`` (float16 params: ``2**-21·|x|``) plus a tiny absolute
term. When the update dtype cannot hold ``round(x) − p`` exactly,
``apply_updates`` lands elsewhere and the residual keeps ``x − landed`` to its
own precision only (e.g. a bfloat16 param 1.0, ``x = 1e-5`` and bfloat16
updates: the only landings near ``x`` are 0 and ``2**-8``, so the pair is
``(0, bf16(1e-5))``, 8 bits); the bound below is then relative to
``|x − landed|``.
"""

from __future__ import annotations

import functools
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collage_optax import formats, mcf

import strategies as S

F32, F64 = np.float32, np.float64
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
SMALLEST_NORMAL = 2.0**-126
N = 256  # elements per hypothesis example
BF16_MAX = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
BF16_TIE = BF16_MAX + 2.0**119  # max + ulp(max)/2: ties to even, i.e. to inf

EXAMPLES = settings(max_examples=30, deadline=None)
FEW = settings(max_examples=12, deadline=None)

PFMT = {"bfloat16": S.BF16, "float16": S.F16}
UDTYPES = {"bf16": BF16, "f16": F16, "f32": np.dtype(F32)}


DAZ, FTZ = S.backend_flushing()
FLUSH = DAZ or FTZ


# ---------------------------------------------------------------------------
# numpy references.
# ---------------------------------------------------------------------------


def cast(x, dtype) -> np.ndarray:
  """The ml_dtypes / numpy cast (round to nearest even, overflow to ±inf)."""
  with np.errstate(all="ignore"):
    return np.asarray(x).astype(dtype)


def _flush(x, on: bool) -> np.ndarray:
  x = np.asarray(x, F64)
  return np.where(on & (np.abs(x) < SMALLEST_NORMAL), np.copysign(0.0, x), x)


def op32(op, *xs) -> np.ndarray:
  """A float32 ``+``/``-`` as this backend does it (DAZ operands, FTZ result)."""
  with np.errstate(all="ignore"):
    args = [_flush(cast(x, F32).astype(F64), DAZ) for x in xs]
    return _flush(op(*args).astype(F32), FTZ).astype(F32)


@np.errstate(all="ignore")
def is_f32_subnormal(x) -> np.ndarray:
  a = np.abs(cast(x, F32).astype(F64))
  return (a > 0) & (a < SMALLEST_NORMAL)


def ulp_bf16(h) -> np.ndarray:
  """ulp of a finite nonzero bfloat16 (spacing above its binade's start)."""
  a = np.abs(np.asarray(h, F64))
  e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
  return np.exp2(np.maximum(e, -126) - 7)


def ref_moment(name: str, x: np.ndarray):
  """(storage value(s), decoded float32) of a float32 ``x``."""
  if name == "f32":
    return x, x
  hi = cast(x, BF16)
  if name == "bf16":
    return hi, hi.astype(F32)
  hi32 = hi.astype(F32)
  lo = cast(op32(np.subtract, x, hi32), BF16)
  # Non-finite hi: lo = 0. A float32 subnormal x is read as zero: lo = 0
  # (``mcf.from_float``'s documented split).
  lo = np.where(np.isfinite(hi32) & ~(DAZ & is_f32_subnormal(x)), lo, np.zeros_like(lo))
  return (hi, lo), op32(np.add, hi32, lo.astype(F32))


def ref_param(name: str, x, p, udt):
  """(u, landed, r, decoded) of encoding float32 ``x`` on param ``p``."""
  pdt = p.dtype
  hi = cast(x, pdt)
  d = op32(np.subtract, hi, p)
  big = F32(float(np.finfo(np.dtype(udt)).max))
  finite = np.isfinite(hi.astype(F32))
  d = np.where(finite, np.clip(d, -big, big), d)  # x within p's range: the update within its dtype's
  u = cast(d, udt)
  landed = cast(op32(np.add, p, u), pdt)
  stuck = finite & ~np.isfinite(landed.astype(F32))  # rounding u up would overshoot p's max: no move
  u = np.where(stuck, np.zeros_like(u), u)
  landed = np.where(stuck, cast(op32(np.add, p, np.zeros_like(p)), pdt), landed)  # p + 0: -0 lands on +0
  if name == "bf16":
    return u, landed, None, landed.astype(F32)
  r = cast(op32(np.subtract, x, landed), pdt)
  r = np.where(np.isfinite(landed.astype(F32)), r, np.zeros_like(r))
  return u, landed, r, op32(np.add, landed, r)


# ---------------------------------------------------------------------------
# Comparison helpers.
# ---------------------------------------------------------------------------


def bits(a) -> np.ndarray:
  a = np.asarray(a)
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same(got, want, what: str, inputs: dict, nan_bits: bool = False) -> None:
  """Bit for bit, NaN for NaN (NaN payloads too when ``nan_bits``)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
  assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
  if np.issubdtype(want.dtype, np.integer) or nan_bits:
    bad = bits(got) != bits(want)
  else:
    gn, wn = np.isnan(got.astype(F32)), np.isnan(want.astype(F32))
    bad = (gn != wn) | (~wn & (bits(got) != bits(want)))
  idx = np.flatnonzero(bad)
  if idx.size:
    i = idx[0]
    args = ", ".join(f"{k}={np.asarray(v).ravel()[i]!r}" for k, v in inputs.items())
    raise AssertionError(f"{what}: {idx.size} of {bad.size} differ; first: got {got.ravel()[i]!r} "
                         f"want {want.ravel()[i]!r} for {args}")


def assert_all(ok, what: str, inputs: dict) -> None:
  idx = np.flatnonzero(~np.asarray(ok))
  if idx.size:
    i = idx[0]
    args = ", ".join(f"{k}={np.asarray(v).ravel()[i]!r}" for k, v in inputs.items())
    raise AssertionError(f"{what}: {idx.size} element(s) fail; first for {args}")


# ---------------------------------------------------------------------------
# Inputs (bit patterns, reusing tests/strategies.py).
# ---------------------------------------------------------------------------

# float32 landmarks for the moments: bfloat16's max finite, just below and at
# the tie with the next (inf), float32 max, the float32 subnormal edges,
# subnormals that round up to bfloat16's smallest normal, ±0, ±inf, NaN.
F32_SPECIALS = np.array([
    BF16_MAX, np.nextafter(F32(BF16_TIE), F32(0)), BF16_TIE, np.nextafter(F32(BF16_TIE), F32(np.inf)),
    np.finfo(F32).max, 2.0**-149, 2.0**-127, float(np.nextafter(F32(2.0**-126), F32(0))),
    2.0**-126, 2.0**-118, 0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, 1.0 + 2.0**-8, 1.0 + 2.0**-9,
], F32)


def f32_batch(rng: np.random.Generator, n: int, pins=None) -> np.ndarray:
  mags, signs = S._pin(S.raw_magnitudes(S.F32, rng, n), S._signs(rng, n), pins)
  x = S.from_bits(S.F32, mags, signs)
  special = rng.random(n) < 1 / 8
  special[: 0 if pins is None else pins[0].size] = False
  pick = rng.choice(F32_SPECIALS, n) * np.where(rng.random(n) < 0.5, F32(-1), F32(1))
  return np.where(special, pick, x).astype(F32)


def f32_inputs() -> st.SearchStrategy[np.ndarray]:
  return st.tuples(S.seeds(), S.pinned(S.F32)).map(lambda t: f32_batch(t[0], N, t[1]))


def param_batch(fmt: S.Format, rng: np.random.Generator, n: int, pins=None):
  """Params ``p`` of ``fmt`` (every binade, 0, subnormals, max) and float32
  targets ``x``: ``x = p``, zero crossings, ``|x| >> |p|``, ``|x| << ulp(p)``,
  ``x`` near ``p``, unrelated float32s, and specials (NaN, ±inf, ±0, the
  dtype's max and its overflow tie, float32 subnormals)."""
  mags, signs = S._pin(S.raw_magnitudes(fmt, rng, n), S._signs(rng, n), pins)
  p = S.from_bits(fmt, mags, signs)
  p64 = p.astype(F64)
  mag = np.where(p64 == 0, 1.0, np.abs(p64))
  sign = np.where(S._signs(rng, n), -1.0, 1.0)
  jitter = rng.uniform(1.0, 2.0, n)
  eps = np.where(rng.random(n) < 0.3, 0.0, sign * np.exp2(-rng.integers(0, 31, n).astype(F64)))
  fmax = float(ml_dtypes.finfo(fmt.dtype).max)
  specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, fmax, -fmax, fmax * (1 + 2.0**-fmt.p),
                       2.0**-130, 2.0**-149, fmax / 2, 1.0], F64)
  kinds = [
      p64,                                                                    # x = p
      np.where(rng.random(n) < 0.5, -p64 * (1 + eps),                         # crossing zero
               -p64 * np.exp2(-rng.integers(0, 40, n).astype(F64))),
      sign * mag * jitter * np.exp2(rng.integers(1, 60, n).astype(F64)),      # |x| >> |p|
      sign * mag * jitter * np.exp2(-rng.integers(fmt.p + 1, 60, n).astype(F64)),  # |x| << ulp(p)
      p64 * (1 + sign * jitter * np.exp2(-rng.integers(1, 31, n).astype(F64))),     # near p
      S.from_bits(S.F32, S.raw_magnitudes(S.F32, rng, n), S._signs(rng, n)).astype(F64),
      rng.choice(specials, n),
  ]
  kind = rng.integers(0, len(kinds), n)
  x = cast(np.choose(kind, kinds), F32)
  return p, x


def param_inputs(fmt: S.Format) -> st.SearchStrategy:
  return st.tuples(S.seeds(), S.pinned(fmt)).map(lambda t: param_batch(fmt, t[0], N, t[1]))


# ---------------------------------------------------------------------------
# The functions under test, eager / jit / fused.
# ---------------------------------------------------------------------------

# The elementwise formats ("exact" is "f32"'s alias; "q8": tests/test_q8.py).
MOMENTS = {k: formats.MOMENT_FORMATS[k] for k in ("bf16", "mcf", "f32")}
PARAMS = {k: formats.PARAM_FORMATS[k] for k in ("mcf", "bf16")}  # "exact", "compact": their own test files


@functools.lru_cache(maxsize=None)
def _moment_fns(name):
  f = MOMENTS[name]
  enc, dec = jax.jit(f.encode), jax.jit(f.decode)
  fused = jax.jit(lambda x: f.decode(f.encode(x)) * 1.0)
  return enc, dec, fused


@functools.lru_cache(maxsize=None)
def _param_fns(name, udt):
  f = PARAMS[name]
  enc = jax.jit(lambda x, p: f.encode(x, p, udt))
  dec = jax.jit(f.decode)

  @jax.jit
  def step(x, p):  # one fused program: encode, optax's update, decode
    u, r = f.encode(x, p, udt)
    q = optax.apply_updates(p, u)
    return u, r, q, f.decode(q, r)

  return enc, dec, step


apply_updates_jit = jax.jit(optax.apply_updates)
landed_jit = jax.jit(formats.landed)


# ---------------------------------------------------------------------------
# Moment formats.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MOMENTS))
@pytest.mark.parametrize("shape", [(), (3,), (2, 5)])
@pytest.mark.parametrize("like_dtype", [BF16, F16, F32])
def test_moment_zeros_and_bytes(name, shape, like_dtype):
  f = MOMENTS[name]
  assert f.name == name and formats.moment_format(name) is f
  z = f.zeros(jnp.zeros(shape, like_dtype))
  want_dtype = {"bf16": BF16, "mcf": np.dtype(np.uint32), "f32": np.dtype(F32)}[name]
  assert z.dtype == want_dtype and z.shape == shape
  assert f.bytes == z.dtype.itemsize
  assert formats.moment_format_of(z) is f
  d = np.asarray(f.decode(z))
  assert d.dtype == F32 and d.shape == shape
  assert_same(d, np.zeros(shape, F32), f"{name} decode(zeros)", {})  # +0.0 bits
  assert f.max == {"f32": float(np.finfo(F32).max)}.get(name, BF16_MAX)


@pytest.mark.parametrize("name", list(MOMENTS))
@EXAMPLES
@given(x=f32_inputs())
def test_moment_round_trip(name, x):
  """encode then decode against the numpy reference, eager, jit and fused."""
  f = MOMENTS[name]
  enc_j, dec_j, fused = _moment_fns(name)
  store_ref, dec_ref = ref_moment(name, x)
  xs = jnp.asarray(x)
  # Subnormals that round up to 2**-126: checked by their own test
  # (test_mcf_moment_subnormal_rounding_up_to_normal).
  known = np.zeros(x.shape, bool)
  if name == "mcf" and DAZ:
    known = is_f32_subnormal(x) & (np.abs(cast(x, BF16).astype(F64)) == SMALLEST_NORMAL)
  keep = lambda a: np.where(known, np.zeros_like(a), a)
  for mode, enc, dec in (("eager", f.encode, f.decode), ("jit", enc_j, dec_j)):
    s = enc(xs)
    got = np.asarray(dec(s))
    assert got.dtype == F32
    assert_same(keep(got), keep(dec_ref), f"{name} decode∘encode [{mode}]", {"x": x})
    if name == "bf16":
      assert_same(np.asarray(s), store_ref, f"bf16 encode [{mode}]", {"x": x})
    elif name == "f32":
      assert_same(np.asarray(s), x, f"f32 encode [{mode}]", {"x": x}, nan_bits=True)
    else:
      assert np.asarray(s).dtype == np.uint32
      c = formats.mcf_components(s)
      hi, lo = np.asarray(c.hi), np.asarray(c.lo)
      assert_same(hi, store_ref[0], f"mcf hi [{mode}]", {"x": x})
      assert_same(keep(lo), keep(store_ref[1]), f"mcf lo [{mode}]", {"x": x})
  assert_same(keep(np.asarray(fused(xs))), keep(dec_ref), f"{name} fused round trip", {"x": x})

  # Properties of the library's own output (bits equal the reference above).
  out = np.asarray(f.decode(f.encode(xs))).astype(F64)
  x64 = x.astype(F64)
  fin = np.isfinite(x64)
  assert_all(np.isnan(out) == np.isnan(x64), f"{name}: NaN iff NaN", {"x": x})
  assert_all(~np.isinf(x64) | (out == x64), f"{name}: ±inf stays ±inf", {"x": x})
  if name == "f32":
    return
  hi64 = cast(x, BF16).astype(F64)
  over = fin & np.isinf(hi64)
  assert_all(~over | (out == np.copysign(np.inf, x64)), f"{name}: overflow is ±inf, not NaN", {"x": x})
  assert_all(~over | (np.abs(x64) >= BF16_TIE), f"{name}: only past the tie overflows", {"x": x})
  normal = fin & ~over & (np.abs(x64) >= SMALLEST_NORMAL)
  with np.errstate(invalid="ignore"):
    err = np.abs(out - x64)
  if name == "bf16":
    assert_all(~normal | (err <= ulp_bf16(hi64) / 2), "bf16: within half an ulp", {"x": x})
    return
  c = formats.mcf_components(f.encode(xs))
  hi, lo = np.asarray(c.hi).astype(F64), np.asarray(c.lo).astype(F64)
  tiny = SMALLEST_NORMAL if FLUSH else 2.0**-134
  assert_all(~normal | (err <= 2.0**-16 * np.abs(x64) + tiny), "mcf: relative error <= 2**-16", {"x": x})
  nz = np.isfinite(hi) & (hi != 0) & ~known
  assert_all(~nz | (np.abs(lo) <= ulp_bf16(hi) / 2), "mcf: |lo| <= ulp(hi)/2", {"x": x})
  assert_all(np.isfinite(hi) | (lo == 0), "mcf: lo = 0 where hi is not finite", {"x": x})
  assert_all(np.isfinite(hi) | np.isnan(hi) | (hi == np.copysign(np.inf, x64)), "mcf: hi = ±inf", {"x": x})
  # The same bits as mcf.from_float for finite x (from_float has lo = NaN at ±inf).
  m = mcf.from_float(xs, jnp.bfloat16)
  ok = fin & ~known
  assert_same(np.where(ok, np.asarray(c.hi), 0), np.where(ok, np.asarray(m.hi), 0), "hi vs from_float", {"x": x})
  assert_same(np.where(ok, np.asarray(c.lo), 0), np.where(ok, np.asarray(m.lo), 0), "lo vs from_float", {"x": x})


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_moment_specials(jit):
  """Explicit landmarks: signed zeros, ±inf, NaN, bf16's max and the overflow
  tie, and float32 subnormals as documented for this backend."""
  cases = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, BF16_MAX, -BF16_MAX,
                    float(np.nextafter(F32(BF16_TIE), F32(0))), BF16_TIE, -BF16_TIE,
                    float(np.finfo(F32).max), 2.0**-127, -2.0**-133, 2.0**-140], F32)
  xs = jnp.asarray(cases)
  run = (lambda g: jax.jit(g)) if jit else (lambda g: g)
  out = {n: np.asarray(run(lambda x, f=MOMENTS[n]: f.decode(f.encode(x)))(xs)) for n in MOMENTS}
  s = run(MOMENTS["mcf"].encode)(xs)
  c = formats.mcf_components(s)
  hi, lo = np.asarray(c.hi), np.asarray(c.lo)
  b16 = np.asarray(run(MOMENTS["bf16"].encode)(xs))
  # Signed zero keeps its sign in the stored bf16 / hi.
  assert bits(b16)[1] == 0x8000 and bits(hi)[1] == 0x8000 and bits(hi)[0] == 0
  assert out["mcf"][1] == 0 and out["bf16"][1] == 0 and np.signbit(out["bf16"][1])
  assert bits(out["f32"])[1] == 0x80000000
  for n in MOMENTS:
    assert out[n][2] == np.inf and out[n][3] == -np.inf and np.isnan(out[n][4]), n
  assert bits(hi)[2] == 0x7F80 and bits(hi)[3] == 0xFF80 and lo[2] == 0 and lo[3] == 0 and lo[4] == 0
  # bf16 max is kept; just below the tie rounds to max (lo holds the rest);
  # at/past the tie -> ±inf (never NaN), lo = 0.
  for n in ("bf16", "mcf"):
    assert out[n][5] == BF16_MAX and out[n][6] == -BF16_MAX
    assert out[n][8] == np.inf and out[n][9] == -np.inf and out[n][10] == np.inf, n
  assert float(hi[7]) == BF16_MAX and out["bf16"][7] == BF16_MAX
  assert abs(float(out["mcf"][7]) - float(cases[7])) <= 2.0**-16 * float(cases[7])
  assert lo[8] == 0 and lo[10] == 0
  # float32 subnormals: bf16 rounds them like ml_dtypes and keeps them;
  # f32 keeps them; mcf hi = bf16(x), lo = 0, decoded as zero where DAZ.
  sub = cases[11:]
  assert_same(b16[11:], cast(sub, BF16), "bf16 subnormals", {"x": sub})
  assert_same(out["bf16"][11:], cast(sub, BF16).astype(F32), "bf16 subnormals decoded", {"x": sub})
  assert_same(out["f32"][11:], sub, "f32 subnormals", {"x": sub})
  assert_same(hi[11:], cast(sub, BF16), "mcf subnormal hi", {"x": sub})
  assert np.all(lo[11:] == 0)
  want = np.zeros(3) if DAZ else cast(sub, BF16).astype(F64)
  assert np.all(out["mcf"][11:] == want)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_mcf_moment_subnormal_rounding_up_to_normal(jit):
  """A float32 subnormal that rounds up to 2**-126 keeps lo = 0, as mcf.from_float does."""
  x = np.array([np.nextafter(F32(2.0**-126), F32(0)), -2.0**-126 * (1 - 2.0**-9)], F32)
  enc = jax.jit(MOMENTS["mcf"].encode) if jit else MOMENTS["mcf"].encode
  c = formats.mcf_components(enc(jnp.asarray(x)))
  m = mcf.from_float(jnp.asarray(x), jnp.bfloat16)
  assert_same(np.asarray(c.hi), np.asarray(m.hi), "hi", {"x": x})
  assert_same(np.asarray(c.lo), np.asarray(m.lo), "lo", {"x": x})  # from_float: lo = 0
  assert np.all(np.asarray(MOMENTS["mcf"].decode(enc(jnp.asarray(x)))) == cast(x, BF16).astype(F32))


# ---------------------------------------------------------------------------
# Param formats.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("pdt", [BF16, F16], ids=["bf16", "f16"])
def test_param_init_bytes_and_decode_exhaustive(name, pdt):
  """decode(p, init(p)) == float32(p) for all 65536 patterns, eager and jit
  (mcf: a bf16 subnormal p is read as zero where DAZ; -0 + 0 = +0)."""
  f = PARAMS[name]
  assert f.name == name and formats.param_format(name) is f
  p = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(pdt)
  ps = jnp.asarray(p)
  r = f.init(ps)
  if name == "bf16":
    assert r is None and f.residual_bytes == 0
  else:
    assert r.dtype == pdt and r.shape == p.shape and f.residual_bytes == r.dtype.itemsize
    assert np.all(bits(np.asarray(r)) == 0)
  assert formats.param_format_of(r) is f
  want = p.astype(F32)
  for mode, dec in (("eager", f.decode), ("jit", jax.jit(f.decode))):
    got = np.asarray(dec(ps, r))
    assert got.dtype == F32
    if name == "bf16":
      assert_same(got, want, f"{name} decode(p, init(p)) [{mode}]", {"p": p}, nan_bits=(pdt == BF16))
    else:
      assert_same(got, op32(np.add, want, 0.0), f"{name} decode(p, init(p)) [{mode}]", {"p": p})
      flushed = (DAZ & is_f32_subnormal(want)) | (want == 0)
      assert_all(flushed | np.isnan(want) | (got == want), "decode == p", {"p": p})


@np.errstate(all="ignore")
def check_param(name: str, udt, p: np.ndarray, x: np.ndarray) -> None:
  """encode(x, p, udt) against the reference, eager, jit and fused with
  optax.apply_updates; then the precision and non-finite properties."""
  f = PARAMS[name]
  pdt = p.dtype
  fmt = PFMT[pdt.name]
  u_ref, l_ref, r_ref, d_ref = ref_param(name, x, p, udt)
  xs, ps = jnp.asarray(x), jnp.asarray(p)
  inputs = {"x": x, "p": p}
  enc_j, dec_j, step = _param_fns(name, jnp.dtype(udt))
  for mode, enc, dec in (("eager", lambda a, b: f.encode(a, b, jnp.dtype(udt)), f.decode), ("jit", enc_j, dec_j)):
    u, r = enc(xs, ps)
    assert u.dtype == udt and u.shape == p.shape
    assert_same(np.asarray(u), u_ref, f"{name} u [{mode}]", inputs)
    q = apply_updates_jit(ps, u)
    assert_same(np.asarray(q), l_ref, f"{name} landed [{mode}]", inputs)
    if name == "bf16":
      assert r is None
    else:
      assert r.dtype == pdt
      assert_same(np.asarray(r), r_ref, f"{name} r [{mode}]", inputs)
    assert_same(np.asarray(dec(q, r)), d_ref, f"{name} decode [{mode}]", inputs)
  u, r, q, d = step(xs, ps)
  assert_same(np.asarray(q), l_ref, f"{name} fused landed", inputs)
  assert_same(np.asarray(d), d_ref, f"{name} fused decode", inputs)

  # Properties (on the reference, whose bits the library matched above).
  x64, p64 = x.astype(F64), p.astype(F64)
  hi64, l64, dec = cast(x, pdt).astype(F64), l_ref.astype(F64), d_ref.astype(F64)
  assert_all(np.isnan(dec) == np.isnan(x64), "NaN iff x is NaN", inputs)
  assert_all(~np.isinf(x64) | (dec == x64), "±inf x decodes to itself", inputs)
  fin = np.isfinite(x64)
  assert_all(~(fin & np.isinf(hi64)) | (dec == np.copysign(np.inf, x64)), "overflow is ±inf", inputs)
  # Landing overflow although round(x) is finite: a known bug (see
  # test_param_encode_in_range_stays_finite); at least never NaN / finite-wrong.
  blown = fin & np.isfinite(hi64) & ~np.isfinite(l64)
  assert_all(~blown | (np.isinf(dec) & ~np.isnan(dec)), "a blown landing decodes to ±inf", inputs)
  ok = fin & np.isfinite(hi64) & ~blown
  # Where hi - p is exactly a udt number (and no operand is flushed), optax
  # lands exactly on hi = round(x).
  with np.errstate(all="ignore"):  # Knuth's TwoSum in float64: d is hi - p exactly iff e == 0
    d = hi64 - p64
    bb = d - hi64
    e = (hi64 - (d - bb)) + (-p64 - bb)
    exact = (e == 0) & (cast(d, udt).astype(F64) == d)
  if FLUSH:
    exact &= np.logical_and.reduce([(v == 0) | (np.abs(v) >= SMALLEST_NORMAL) for v in (p64, hi64, d)])
  assert_all(~(ok & exact) | (l64 == hi64), "lands on round(x) when the update is exact", inputs)
  # x = p stays put (a bf16 subnormal p is flushed by apply_updates itself where DAZ).
  assert_all(~(ok & (x64 == p64)) | (l64 == p64) | (DAZ & is_f32_subnormal(p)), "x = p stays put", inputs)
  err = np.abs(dec - x64)
  if name == "bf16":
    assert_all(~(ok & exact) | (dec == hi64), "bf16 param: the nearest number", inputs)
    return
  rel = 2.0**-16 if pdt == BF16 else 2.0**-21
  tiny = 2.0**-25 if pdt == F16 else (SMALLEST_NORMAL if FLUSH else 2.0**-133)
  hit = ok & (l64 == hi64)
  assert_all(~hit | (err <= rel * np.abs(x64) + tiny), "landed: within MCF precision", inputs)
  miss = ok & (l64 != hi64) & np.isfinite(dec)
  bound = 2.0**-fmt.p * (1 + 2.0**-8) * np.abs(x64 - l64) + 2.0**-23 * np.abs(x64) + tiny
  assert_all(~miss | (err <= bound), "missed landing: the residual's own precision", inputs)
  assert_all(~ok | np.isfinite(dec) | (np.abs(x64 - l64) > float(ml_dtypes.finfo(pdt).max)),
             "finite in-range x decodes finite", inputs)


PARAM_CASES = [(n, pdt, u) for n in PARAMS for pdt in ("bfloat16", "float16") for u in UDTYPES]


@pytest.mark.parametrize("name,pdt,udt", PARAM_CASES, ids=[f"{n}-{p}-u{u}" for n, p, u in PARAM_CASES])
@FEW
@given(data=st.data())
def test_param_encode(name, pdt, udt, data):
  p, x = data.draw(param_inputs(PFMT[pdt]))
  check_param(name, UDTYPES[udt], p, x)


@pytest.mark.parametrize("name,pdt,udt", PARAM_CASES, ids=[f"{n}-{p}-u{u}" for n, p, u in PARAM_CASES])
def test_param_encode_adversarial(name, pdt, udt):
  """Deterministic cases: x = p, p = 0, zero crossings, |x| >> |p|,
  |x| << ulp(p), p near the dtype's max, NaN and ±inf targets."""
  dt = PFMT[pdt].dtype
  fmax = float(ml_dtypes.finfo(dt).max)
  pairs = [  # (p, x)
      (1.0, 1.0), (-3.5, -3.5), (fmax, fmax), (0.0, 0.0), (0.0, 1.2345), (0.0, -1e-3), (0.0, 3.0e-6),
      (1.0, -1.0), (1.0, -1.0009765), (0.5, -1e-4), (-2.0, 2.0 + 2**-12), (1.0, 1e-5), (1.0, -1e-9),
      (1e-3, 12.345), (2**-10, 2.0**5 + 0.1), (1.0, 1.0 + 2.0**-12), (1.0, 1.0 - 2.0**-14),
      (fmax, fmax * (1 - 2.0**-12)), (-fmax, -fmax / 3), (fmax / 2, fmax * 0.9), (fmax, fmax * 2),
      (1.0, np.nan), (1.0, np.inf), (-1.0, -np.inf), (0.0, np.nan), (fmax, np.inf), (2.0, 2.0**-130),
  ]
  p = cast(np.array([a for a, _ in pairs], F64), dt)
  x = cast(np.array([b for _, b in pairs], F64), F32)
  check_param(name, UDTYPES[udt], p, x)


@pytest.mark.parametrize("case", ["f16-ubf16-overshoot", "bf16-uf16-overflow", "bf16-uf32-overflow"])
def test_param_encode_in_range_stays_finite(case):
  """A finite x within p's range never makes apply_updates write ±inf: the update is clipped to
  its dtype, or 0 where rounding it would overshoot p's max, and the residual keeps the rest."""
  pdt, udt, p, x = {
      "f16-ubf16-overshoot": (F16, BF16, 32768.0, 65504.0),  # u = bf16(32736) = 32768 -> 65536 -> inf
      "bf16-uf16-overflow": (BF16, F16, 0.0, 1.0e5),  # u = f16(99840) = inf
      "bf16-uf32-overflow": (BF16, np.dtype(F32), -3.3e38, 3.3e38),  # hi - p > float32 max
  }[case]
  f = PARAMS["mcf"]
  ps = jnp.asarray(cast(np.array([p]), pdt))
  u, r = f.encode(jnp.asarray(np.array([x], F32)), ps, jnp.dtype(udt))
  out = np.asarray(f.decode(optax.apply_updates(ps, u), r))
  assert np.all(np.isfinite(out)), f"p={p}, x={x}: u={np.asarray(u)}, decoded {out}"
  assert np.all(np.abs(out - x) <= 2.0**-7 * abs(x)), f"p={p}, x={x}: decoded {out}"


@pytest.mark.parametrize("pdt", ["bfloat16", "float16"])
@pytest.mark.parametrize("udt", list(UDTYPES))
@EXAMPLES
@given(data=st.data())
def test_landed_is_apply_updates(pdt, udt, data):
  """formats.landed(p, u) == float32(optax.apply_updates(p, u)) (jitted), bit for bit, and the numpy value."""
  fmt = PFMT[pdt]
  p, x = data.draw(param_inputs(fmt))
  # Updates: -p (exact cancellation), the targets' distance to p, unrelated values.
  rng = np.random.default_rng(int(bits(p).astype(np.int64).sum()))
  with np.errstate(all="ignore"):
    cand = np.stack([-p.astype(F64), x.astype(F64) - p.astype(F64), x.astype(F64)])
  u = cast(cand[rng.integers(0, 3, p.size), np.arange(p.size)], UDTYPES[udt])
  want = cast(op32(np.add, p, u), fmt.dtype)
  ps, us = jnp.asarray(p), jnp.asarray(u)
  opt = np.asarray(apply_updates_jit(ps, us))
  assert opt.dtype == fmt.dtype
  assert_same(opt, want, "optax.apply_updates vs numpy", {"p": p, "u": u})
  for mode, fn in (("eager", formats.landed), ("jit", landed_jit)):
    got = np.asarray(fn(ps, us))
    assert got.dtype == F32
    assert_same(got, opt.astype(F32), f"landed vs apply_updates [{mode}]", {"p": p, "u": u})


# ---------------------------------------------------------------------------
# narrow / widen.
# ---------------------------------------------------------------------------

_narrow_fns = {
    d: (jax.jit(lambda x, d=d: formats.narrow(x, d)),
        jax.jit(lambda x, d=d: formats.narrow(x, d).astype(jnp.float32) * 1.0),
        jax.jit(lambda x, d=d: x - formats.narrow(x * 1.0, d).astype(jnp.float32)))
    for d in (BF16, F16)
}


@pytest.mark.parametrize("dt", [BF16, F16], ids=["bf16", "f16"])
@EXAMPLES
@given(x=f32_inputs())
def test_narrow(dt, x):
  """narrow == the ml_dtypes/numpy cast, eager, jit and fused with a consumer."""
  want = cast(x, dt)
  xs = jnp.asarray(x)
  plain, times_one, residual = _narrow_fns[dt]
  assert_same(np.asarray(formats.narrow(xs, dt)), want, "narrow [eager]", {"x": x})
  assert_same(np.asarray(plain(xs)), want, "narrow [jit]", {"x": x})
  assert_same(np.asarray(times_one(xs)), want.astype(F32), "narrow fused into * 1.0", {"x": x})
  assert_same(np.asarray(residual(xs)), op32(np.subtract, x, want.astype(F32)), "x - narrow(x)", {"x": x})
  # Same or wider dtypes: a plain conversion.
  assert_same(np.asarray(formats.narrow(xs, jnp.float32)), x, "narrow to float32", {"x": x}, nan_bits=True)


@pytest.mark.parametrize("dt", [BF16, F16], ids=["bf16", "f16"])
def test_widen_exhaustive(dt):
  """widen is exact on all 65536 patterns (bf16: bit for bit, NaN payloads too;
  f16: NaN for NaN, XLA quiets signalling NaNs), eager and jit."""
  x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dt)
  want = x.astype(F32)
  for mode, fn in (("eager", formats.widen), ("jit", jax.jit(formats.widen))):
    got = np.asarray(fn(jnp.asarray(x)))
    assert_same(got, want, f"widen {dt} [{mode}]", {"x": x}, nan_bits=(dt == BF16))
  y = np.array([1.5, -2.0**-140, np.inf], F32)
  assert_same(np.asarray(formats.widen(jnp.asarray(y))), y, "widen float32", {"x": y}, nan_bits=True)


# ---------------------------------------------------------------------------
# The XLA trap: a fresh process with --xla_allow_excess_precision.
# ---------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np, ml_dtypes, jax, jax.numpy as jnp, optax
    from collage_optax import formats

    data = dict(np.load(sys.argv[1]))
    x = jnp.asarray(data["x"])
    out = {}
    for name in ("bf16", "mcf", "f32"):
      f = formats.MOMENT_FORMATS[name]
      s = jax.jit(f.encode)(x)
      out[f"m_{name}_s"] = np.asarray(s).view(np.uint32 if name != "bf16" else np.uint16)
      out[f"m_{name}_d"] = np.asarray(jax.jit(lambda v: f.decode(f.encode(v)) * 1.0)(x))
    for d in ("bfloat16", "float16"):
      out[f"n_{d}"] = np.asarray(jax.jit(lambda v: formats.narrow(v, d).astype(jnp.float32) * 1.0)(x))
      out[f"r_{d}"] = np.asarray(jax.jit(lambda v: v - formats.narrow(v * 1.0, d).astype(jnp.float32))(x))
    for key in [k for k in data if k.startswith("p_")]:
      _, name, pdt, udt = key.split("_")
      p = jnp.asarray(data[key].view(np.dtype(getattr(ml_dtypes, pdt, None) or pdt)))
      xp = jnp.asarray(data[f"x_{pdt}"])
      f = formats.PARAM_FORMATS[name]

      @jax.jit
      def step(v, q):
        u, r = f.encode(v, q, jnp.dtype(udt))
        q2 = optax.apply_updates(q, u)
        return q2, f.decode(q2, r)

      q2, dec = step(xp, p)
      out[f"l_{name}_{pdt}_{udt}"] = np.asarray(q2).view(np.uint16)
      out[f"d_{name}_{pdt}_{udt}"] = np.asarray(dec)
    np.savez(sys.argv[2], **out)
    print("backend", jax.default_backend())
    """
)


@pytest.mark.parametrize("excess", ["true", "false"])
def test_formats_under_xla_allow_excess_precision(excess, run_with_excess_precision):
  rng = np.random.default_rng(7)
  x = f32_batch(rng, 4096)
  saved = {"x": x}
  params = {}
  for pdt, fmt in PFMT.items():
    p, xp = param_batch(fmt, rng, 4096)
    saved[f"x_{pdt}"] = xp
    params[pdt] = (p, xp)
    for name in PARAMS:
      for udt in UDTYPES.values():
        saved[f"p_{name}_{pdt}_{udt.name}"] = p.view(np.uint16)
  got, _ = run_with_excess_precision(_CHILD, saved, excess)
  known = DAZ & is_f32_subnormal(x) & (np.abs(cast(x, BF16).astype(F64)) == SMALLEST_NORMAL)
  for name in MOMENTS:
    store, dec = ref_moment(name, x)
    if name == "mcf":
      store = (bits(store[0]).astype(np.uint32) << 16) | bits(store[1]).astype(np.uint32)
      store, dec = np.where(known, 0, store), np.where(known, 0, dec)
      s, d = np.where(known, 0, got[f"m_{name}_s"]), np.where(known, 0, got[f"m_{name}_d"])
      assert np.count_nonzero(store & 0xFFFF) > 1000  # the low halves are there to lose
    else:
      s, d = got[f"m_{name}_s"].view(np.asarray(store).dtype), got[f"m_{name}_d"]
    assert_same(s, store, f"{name} encode (excess={excess})", {"x": x})
    assert_same(d, dec, f"{name} fused round trip (excess={excess})", {"x": x})
  for d, dt in (("bfloat16", BF16), ("float16", F16)):
    r = cast(x, dt).astype(F32)
    assert_same(got[f"n_{d}"], r, f"narrow {d} fused (excess={excess})", {"x": x})
    res = op32(np.subtract, x, r)
    assert_same(got[f"r_{d}"], res, f"x - narrow {d} (excess={excess})", {"x": x})
    assert np.count_nonzero(res) > 1000
  for pdt, (p, xp) in params.items():
    for name in PARAMS:
      for udt in UDTYPES.values():
        _, l_ref, _, d_ref = ref_param(name, xp, p, udt)
        key = f"{name}_{pdt}_{udt.name}"
        assert_same(got[f"l_{key}"].view(p.dtype), l_ref, f"landed {key} (excess={excess})", {"x": xp, "p": p})
        assert_same(got[f"d_{key}"], d_ref, f"decode {key} (excess={excess})", {"x": xp, "p": p})
