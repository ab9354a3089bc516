"""The numerics of ``collage_optax.mcf`` against independent references.

Two yardsticks, neither of them the library:

* **Exact arithmetic.** Every float here is a multiple of ``2**-149`` and every
  product of two of them a multiple of ``2**-298``, so Python integers scaled by
  ``2**SCALE`` hold all values, sums and products exactly. Every error-free
  transformation must satisfy ``s + e == a + b`` (``a·b``) exactly and return
  the correctly rounded ``s``; ``grow``, ``add`` and ``mul`` must land within the
  error bounds derived (below) from their algorithms.
* **A numpy / ml_dtypes re-implementation** of the same algorithms (the
  docstrings of ``mcf.py``; Knuth's TwoSum, Dekker's FastTwoSum and TwoProduct): float32 numpy arithmetic followed by an
  ml_dtypes/numpy cast to the storage dtype, which is how ml_dtypes itself does
  bfloat16 arithmetic. The library's bits must equal it eagerly, under ``jit``,
  under ``vmap``, and in a subprocess run with ``--xla_allow_excess_precision``.

Subnormals. XLA on CPU (and TPU) reads float32 subnormal operands as zero
(DAZ) and flushes subnormal float32 results to zero (FTZ); numpy does neither.
The reference applies what the backend does, detected by a probe below, to each
of its float32 operations. The documented contract (``mcf.py``'s module
docstring) is checked with exact arithmetic: for bfloat16/float32, ``two_prod``
is exact when operands, the correctly rounded product and its exact error are
zero or at least ``2**-126``, ``two_sum``/``fast_two_sum`` when each operand is
zero or at least ``2**(p - 127)``; otherwise ``s + e`` misses the exact result on
the operands as read by less than ``2**-126``. float16 subnormals are normal
float32 numbers, so float16 is exact including them.

Each hypothesis example is a batch of 64 elements (a drawn seed for the bulk
plus a few bit patterns hypothesis draws itself), run under ``jit`` and
``vmap``; the op-by-op eager path is checked on one large batch per operation.
"""

from __future__ import annotations

import math
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collage_optax import mcf
from collage_optax.mcf import MCF

import strategies as S

F32 = np.float32
F64 = np.float64
SMALLEST_NORMAL = 2.0**-126  # float32 and bfloat16
FORMATS = {fmt.name: fmt for fmt in S.FORMATS}
HALF = (S.BF16, S.F16)
BATCH = 1 << 14  # elements of the large eager batches

EXAMPLES = settings(max_examples=200, deadline=None)
FEWER_EXAMPLES = settings(max_examples=100, deadline=None)
by_format = pytest.mark.parametrize("fmt", S.FORMATS, ids=lambda f: f.name)


def _probe_flushing() -> tuple[bool, bool]:
  """(DAZ, FTZ) of this backend's float32 arithmetic."""
  add = jax.jit(lambda a, b: a + b)
  mul = jax.jit(lambda a, b: a * b)
  t = F32(2.0**-127)
  daz = float(add(t, t)) == 0.0  # 2**-126 is normal: only reading t as 0 gives 0
  ftz = float(mul(F32(2.0**-63), F32(2.0**-64))) == 0.0
  return daz, ftz


DAZ, FTZ = _probe_flushing()


def flushes(fmt: S.Format) -> bool:
  """Whether subnormals of ``fmt`` meet DAZ/FTZ (float16's never do: they are
  normal float32 numbers)."""
  return fmt is not S.F16 and (DAZ or FTZ)


# ---------------------------------------------------------------------------
# The numpy / ml_dtypes reference.
# ---------------------------------------------------------------------------


def _flush(x, on: bool) -> np.ndarray:
  x = np.asarray(x, F32)
  if not on:
    return x
  return np.where(np.abs(x) < SMALLEST_NORMAL, np.copysign(F32(0), x), x).astype(F32)


def op32(op, *xs) -> np.ndarray:
  """One float32 operation as the backend does it: DAZ operands, FTZ result.

  A sum of floats is exact when it is subnormal, and the products used here are
  exact in float32, so flushing numpy's gradual-underflow result is what the
  hardware returns.
  """
  with np.errstate(all="ignore"):
    return _flush(op(*(_flush(x, DAZ) for x in xs)), FTZ)


def rounder(fmt: S.Format):
  """The rounding of ``⊕ ⊖ ⊗``: float32 → storage dtype (ml_dtypes/numpy cast) → float32."""
  if fmt is S.F32:
    return lambda x: np.asarray(x, F32)

  def r(x):
    with np.errstate(over="ignore"):
      return np.asarray(x, F32).astype(fmt.dtype).astype(F32)

  return r


def _round32(x64) -> np.ndarray:
  """float64 → float32 as the backend rounds a float32 product (FTZ)."""
  with np.errstate(all="ignore"):
    return _flush(np.asarray(x64, F64).astype(F32), FTZ)


def _ref_fast_two_sum(a, b, R):
  s = R(op32(np.add, a, b))
  return s, R(op32(np.subtract, b, R(op32(np.subtract, s, a))))


def _ref_two_sum(a, b, R):
  s = R(op32(np.add, a, b))
  bb = R(op32(np.subtract, s, a))
  aa = R(op32(np.subtract, s, bb))
  return s, R(op32(np.add, R(op32(np.subtract, a, aa)), R(op32(np.subtract, b, bb))))


def _ref_two_prod(a, b, fmt, R):
  if fmt is S.F32:
    # The exact product of two float32 numbers fits float64 (48 bits), and so
    # does its rounding error: p = fl(a·b) and e = a·b − round24(a·b), where
    # round24 rounds to 24 bits with an unbounded exponent (equal to p unless
    # p underflows). e is then flushed like any float32 result.
    with np.errstate(all="ignore"):
      ab = _flush(a, DAZ).astype(F64) * _flush(b, DAZ).astype(F64)
      p = _round32(ab)
      unbounded = (ab * 2.0**200).astype(F32).astype(F64) * 2.0**-200
      p24 = np.where(np.abs(ab) < SMALLEST_NORMAL, unbounded, p.astype(F64))
      return p, _round32(ab - p24)
  ab = op32(np.multiply, a, b)  # exact: 8 + 8 or 11 + 11 significant bits
  p = R(ab)
  return p, R(op32(np.subtract, ab, p))


def _wide(*xs):
  return [np.asarray(x).astype(F32) for x in xs]


def ref_fast_two_sum(a, b, fmt):
  return _ref_fast_two_sum(*_wide(a, b), rounder(fmt))


def ref_two_sum(a, b, fmt):
  return _ref_two_sum(*_wide(a, b), rounder(fmt))


def ref_two_prod(a, b, fmt):
  return _ref_two_prod(*_wide(a, b), fmt, rounder(fmt))


def ref_grow(hi, lo, b, fmt):
  """``grow`` as documented: ``b' = round(b); (s, e) = two_sum(x, b')``; then
  for 16-bit formats ``t = r + e`` (float32), ``x' = s ⊕ t``,
  ``r' = round((s − x') + t)``; for float32 ``(x', r') = two_sum(s, r ⊕ e)``."""
  R = rounder(fmt)
  x, r = _wide(hi, lo)
  s, e = _ref_two_sum(x, R(np.asarray(b, F32)), R)
  if fmt is S.F32:
    return _ref_two_sum(s, R(op32(np.add, r, e)), R)
  t = op32(np.add, r, e)
  h = R(op32(np.add, s, t))
  return h, R(op32(np.add, op32(np.subtract, s, h), t))


def ref_add(h1, l1, h2, l2, fmt):
  """``add``: ``(s, e) = two_sum(x1, x2); e = e ⊕ (r1 ⊕ r2); two_sum(s, e)``."""
  R = rounder(fmt)
  x1, r1, x2, r2 = _wide(h1, l1, h2, l2)
  s, e = _ref_two_sum(x1, x2, R)
  return _ref_two_sum(s, R(op32(np.add, e, R(op32(np.add, r1, r2)))), R)


def ref_mul(x, r, c, d, fmt):
  """``mul``: ``(p, e) = two_prod(x, c); e = e ⊕ (x ⊗ d ⊕ r ⊗ c); fast_two_sum(p, e)``."""
  R = rounder(fmt)
  x, r, c, d = _wide(x, r, c, d)
  p, e = _ref_two_prod(x, c, fmt, R)
  t = R(op32(np.add, R(op32(np.multiply, x, d)), R(op32(np.multiply, r, c))))
  return _ref_fast_two_sum(p, R(op32(np.add, e, t)), R)


REFS = {
    "two_sum": ref_two_sum, "fast_two_sum": ref_fast_two_sum, "two_prod": ref_two_prod,
    "grow": ref_grow, "add": ref_add, "mul": ref_mul,
}


# ---------------------------------------------------------------------------
# Exact arithmetic on integers scaled by 2**SCALE.
# ---------------------------------------------------------------------------

SCALE = 320
LAMBDA = 1 << (SCALE - 126)  # the smallest normal float32/bfloat16, scaled


def ex(x) -> list:
  """Exact values of an array, scaled by ``2**SCALE`` (``None`` for Inf/NaN)."""
  out = []
  for v in np.asarray(x).astype(F64).ravel().tolist():
    if not math.isfinite(v):
      out.append(None)
      continue
    n, d = v.as_integer_ratio()
    q, rest = divmod(n << SCALE, d)
    assert rest == 0, v
    out.append(q)
  return out


def xmul(a: int, b: int) -> int:
  """The exact product of two scaled values (products here are multiples of 2**-298)."""
  q, rest = divmod(a * b, 1 << SCALE)
  assert rest == 0
  return q


def val(x: int) -> float:
  return x / (1 << SCALE)


def quantum(fmt: S.Format) -> int:
  """The smallest subnormal of ``fmt``: its spacing below ``2**emin``."""
  return 1 << (SCALE + fmt.emin - fmt.p + 1)


def ulp(x: int, fmt: S.Format) -> int:
  """``2**(e - p + 1)`` for ``2**e <= |x| < 2**(e+1)``, never below ``quantum``."""
  e = abs(x).bit_length() - 1 - SCALE
  return 1 << (SCALE + max(e, fmt.emin) - fmt.p + 1) if x else quantum(fmt)


def max_finite(fmt: S.Format) -> int:
  return ((1 << fmt.p) - 1) << (SCALE + fmt.emax - fmt.p + 1)


def round_exact(x: int, fmt: S.Format):
  """``x`` correctly rounded to ``fmt`` (nearest, ties to even, gradual
  underflow); ``None`` when it overflows."""
  step = ulp(x, fmt)
  n, rest = divmod(abs(x), step)
  if 2 * rest > step or (2 * rest == step and n % 2):
    n += 1
  if n * step > max_finite(fmt):
    return None
  return n * step if x >= 0 else -n * step


def representable(x: int, fmt: S.Format) -> bool:
  return round_exact(x, fmt) == x


def zero_or_normal(*xs: int) -> bool:
  return all(x == 0 or abs(x) >= LAMBDA for x in xs)


def as_read(x: int, fmt: S.Format) -> int:
  """An operand as the backend reads it (DAZ)."""
  return 0 if flushes(fmt) and DAZ and abs(x) < LAMBDA else x


def tiny(fmt: S.Format) -> int:
  """The most one rounding or flush of a tiny value can change it: the flush
  threshold where subnormals are flushed, half a quantum where they are kept."""
  return LAMBDA if flushes(fmt) else quantum(fmt) // 2


def check_normalised(hi: int, lo: int, fmt: S.Format, where: str) -> None:
  assert 2 * abs(lo) <= ulp(hi, fmt), f"{where}: |lo| > ulp(hi)/2"


def test_exact_arithmetic_helpers():
  """The yardstick itself, on values checked by hand."""
  one = 1 << SCALE
  assert ex(np.array([1.5, -(2.0**-149)], F32)) == [3 * one // 2, -(1 << (SCALE - 149))]
  assert round_exact(one + (one >> 8), S.BF16) == one  # tie to even
  assert round_exact(one + 3 * (one >> 8), S.BF16) == one + (one >> 6)
  assert round_exact(quantum(S.F16) // 2, S.F16) == 0
  assert round_exact(3 * quantum(S.F16) // 2, S.F16) == 2 * quantum(S.F16)
  assert round_exact(65520 * one, S.F16) is None and round_exact(65519 * one, S.F16) == 65504 * one
  assert val(max_finite(S.BF16)) == float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
  assert ulp(one, S.F32) == one >> 23 and ulp(0, S.BF16) == 1 << (SCALE - 133)


# ---------------------------------------------------------------------------
# Running the library eagerly, under jit and under vmap.
# ---------------------------------------------------------------------------


def _grow(hi, lo, b):
  m = mcf.grow(MCF(hi, lo), b)
  return m.hi, m.lo


def _add(h1, l1, h2, l2):
  m = mcf.add(MCF(h1, l1), MCF(h2, l2))
  return m.hi, m.lo


def _mul(x, r, c, d):
  m = mcf.mul(MCF(x, r), MCF(c, d))
  return m.hi, m.lo


OPS = {
    "two_sum": mcf.two_sum,
    "fast_two_sum": mcf.fast_two_sum,
    "two_prod": mcf.two_prod,
    "grow": _grow,
    "add": _add,
    "mul": _mul,
}
# vmap maps the elementwise ops over scalars; jitted so that it is traced once.
MODES = {name: {"eager": f, "jit": jax.jit(f), "vmap": jax.jit(jax.vmap(f))} for name, f in OPS.items()}


def bits(x, fmt: S.Format) -> np.ndarray:
  return np.asarray(x).astype(fmt.dtype).view(fmt.uint)


def assert_bits(got, want, mask, fmt: S.Format, what: str, inputs: dict) -> None:
  got = np.asarray(got)
  assert got.dtype == fmt.dtype, f"{what}: dtype {got.dtype}, expected {fmt.dtype}"
  bad = np.flatnonzero(mask & (bits(got, fmt) != bits(want, fmt)))
  if bad.size:
    i = bad[0]
    args = ", ".join(f"{k}={np.asarray(v)[i]!r}" for k, v in inputs.items())
    raise AssertionError(
        f"{what}: {bad.size} element(s) differ from the numpy reference; first: "
        f"got {got[i]!r}, want {np.asarray(want).astype(fmt.dtype)[i]!r} for {args}"
    )


def finite(*xs) -> np.ndarray:
  return np.logical_and.reduce([np.isfinite(np.asarray(x).astype(F32)) for x in xs])


def run_and_compare(name, fmt, args: dict, mask=None, modes=("jit", "vmap"), compare_bits=True):
  """Runs ``name`` in each mode; its bits must equal the reference's where
  ``mask`` (default: where the reference is finite). Returns (outputs, mask)."""
  ref = REFS[name](*args.values(), fmt)
  mask = finite(*ref) if mask is None else mask & finite(*ref)
  outs = None
  for mode in modes:
    outs = tuple(np.asarray(o) for o in MODES[name][mode](*(jnp.asarray(a) for a in args.values())))
    for k, (got, want) in enumerate(zip(outs, ref)):
      assert_bits(got, want, mask if compare_bits else np.zeros_like(mask), fmt, f"{name}[{mode}] output {k}", args)
  return outs, mask


# ---------------------------------------------------------------------------
# Error-free transformations.
# ---------------------------------------------------------------------------


def check_error_free(name: str, fmt: S.Format, a, b, modes=("jit", "vmap")) -> None:
  """Bits equal the reference in every mode; ``s + e`` is exact under the contract."""
  product = name == "two_prod"
  mask = np.ones(a.shape, bool)
  if product and fmt is S.F32:
    # Whether a product just below 2**-126 that rounds up to it is flushed
    # depends on the core (tininess before/after rounding): not compared.
    ab = np.abs(a.astype(F64) * b.astype(F64))
    mask &= ~((ab < SMALLEST_NORMAL) & (ab >= SMALLEST_NORMAL * (1 - 2.0**-23)))
  (s, e), mask = run_and_compare(name, fmt, {"a": a, "b": b}, mask, modes)
  # Off the exact domain: less than the flush threshold where subnormals are
  # flushed; half a quantum for float16 (e rounded once among its subnormals);
  # less than a quantum for bfloat16/float32 kept subnormal (rounded to float32
  # first, then to the storage dtype).
  if flushes(fmt):
    within = lambda dev: dev < LAMBDA
  elif fmt is S.F16:
    within = lambda dev: 2 * dev <= quantum(fmt)
  else:
    within = lambda dev: dev < quantum(fmt)
  for i, A, B, S_, E_ in zip(range(a.size), ex(a), ex(b), ex(s), ex(e)):
    if not mask[i]:
      continue
    exact = xmul(A, B) if product else A + B
    s_star = round_exact(exact, fmt)
    if s_star is None:
      continue  # overflow
    e_star = exact - s_star
    where = f"{name}({a[i]!r}, {b[i]!r}) = ({s[i]!r}, {e[i]!r})"
    if product:  # operands, product and error zero or normal
      clear = zero_or_normal(A, B, s_star, e_star)
    else:  # operands zero or >= 2**(p - 127): every intermediate is a multiple of 2**-126
      clear = all(x == 0 or abs(x) >= LAMBDA << (fmt.p - 1) for x in (A, B))
    if representable(e_star, fmt) and (not flushes(fmt) or clear):
      assert S_ == s_star, f"{where}: s is not the correctly rounded result"
      assert S_ + E_ == exact, f"{where}: s + e != exact by {val(S_ + E_ - exact)!r}"
    else:  # Flushed or underflowed: exact on the operands as read, up to a tiny error.
      A, B = as_read(A, fmt), as_read(B, fmt)
      dev = abs(S_ + E_ - (xmul(A, B) if product else A + B))
      assert within(dev), f"{where}: off by {val(dev)!r}"


def test_two_sum_near_the_flush_threshold():
  """The documented example: operands, result and error normal, yet an
  intermediate below 2**-126 is flushed; the miss stays below 2**-126."""
  a, b = np.array([-1.8e-37], ml_dtypes.bfloat16), np.array([-1.2e-35], ml_dtypes.bfloat16)
  check_error_free("two_sum", S.BF16, a, b, ("eager", "jit", "vmap"))
  s, e = mcf.two_sum(jnp.asarray(a), jnp.asarray(b))
  dev = abs(sum(ex(s) + ex(e)) - sum(ex(a) + ex(b)))
  assert dev < LAMBDA and (dev == 0 or flushes(S.BF16))


def _dominant_first(fmt, a, b):
  """Swaps each pair so that ``|a| >= |b|`` (magnitude bits order like values)."""
  swap = (a.view(fmt.uint) & (fmt.sign_bit - 1)) < (b.view(fmt.uint) & (fmt.sign_bit - 1))
  return np.where(swap, b, a), np.where(swap, a, b)


@by_format
@EXAMPLES
@given(data=st.data())
def test_two_sum_is_error_free(fmt, data):
  check_error_free("two_sum", fmt, *data.draw(S.sum_operands(fmt)))


@by_format
@EXAMPLES
@given(data=st.data())
def test_fast_two_sum_is_error_free_when_a_dominates(fmt, data):
  check_error_free("fast_two_sum", fmt, *_dominant_first(fmt, *data.draw(S.sum_operands(fmt))))


@by_format
@EXAMPLES
@given(data=st.data())
def test_two_prod_is_error_free(fmt, data):
  check_error_free("two_prod", fmt, *data.draw(S.product_operands(fmt)))


@by_format
def test_error_free_transformations_eagerly(fmt):
  """The op-by-op (eager) path, on one large batch, against the same contract."""
  rng = np.random.default_rng(11)
  modes = ("eager", "jit")
  check_error_free("two_sum", fmt, *S.sum_batch(fmt, rng, BATCH), modes)
  check_error_free("fast_two_sum", fmt, *_dominant_first(fmt, *S.sum_batch(fmt, rng, BATCH)), modes)
  check_error_free("two_prod", fmt, *S.product_batch(fmt, rng, BATCH), modes)


@by_format
def test_error_free_transformations_on_landmarks(fmt):
  """Signed zeros, the subnormal boundary and the overflow edge, all pairs."""
  m = fmt.nmant
  mags = [0, 1, (1 << m) - 1, 1 << m, (1 << m) + 1, fmt.one_bits, fmt.one_bits + 1,
          (fmt.bias + fmt.p) << m, fmt.max_bits - 1, fmt.max_bits]
  v = np.concatenate([S.from_bits(fmt, mags, False), S.from_bits(fmt, mags, True)])
  a, b = np.repeat(v, v.size), np.tile(v, v.size)
  modes = ("eager", "jit", "vmap")
  check_error_free("two_sum", fmt, a, b, modes)
  check_error_free("two_prod", fmt, a, b, modes)
  check_error_free("fast_two_sum", fmt, *_dominant_first(fmt, a, b), modes)
  zeros = np.where(np.arange(v.size) % 2, -np.zeros_like(v), np.zeros_like(v))
  check_error_free("fast_two_sum", fmt, zeros, v, modes)  # a == 0, any b


def test_float32_two_prod_is_exact_for_small_normal_operands():
  """Dekker's split of a float32 below ~2**-103 has a subnormal low half; a
  flushed low half times a large cofactor would be a large error in ``e``."""
  a = np.array([8.7163286e-36, 1.1e-33, 2.0**-120 * 1.2345, -3.3559e-35, 2.0**-126 * (1 + 2.0**-23)], F32)
  b = np.array([-2.4864117e38, -3.0e5, 2.0**60 * 1.4142, 991.0 * 2.0**30, 2.0**126], F32)
  check_error_free("two_prod", S.F32, a, b, ("eager", "jit", "vmap"))
  p, e = mcf.two_prod(jnp.asarray(a), jnp.asarray(b))
  for A, B, P, E in zip(ex(a), ex(b), ex(p), ex(e)):
    assert P + E == xmul(A, B)


# ---------------------------------------------------------------------------
# round_to, from_float, to_float.
# ---------------------------------------------------------------------------


_ROUND_TO = jax.jit(mcf.round_to, static_argnums=1)


def _x64():
  """A context enabling 64-bit types (``jax.enable_x64`` on current JAX)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # older JAX
  return enable_x64()


def _float32_probes(fmt: S.Format) -> np.ndarray:
  """float32 inputs for rounding to ``fmt``: every midpoint between neighbours
  of ``fmt`` (ties, the overflow threshold, subnormals), the float32 numbers
  either side of each, every ``fmt`` number, and 2**18 random float32 bit
  patterns; NaN and Inf; both signs."""
  v = S.from_bits(fmt, np.arange(fmt.max_bits + 1), False).astype(F64)
  nxt = np.append(v[1:], 2.0 ** (fmt.emax + 1))
  mid = ((v + nxt) / 2).astype(F32)  # exact: p + 1 <= 24 bits
  around = [mid, np.nextafter(mid, F32(np.inf)), np.nextafter(mid, F32(0))]
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 2**32, 2**18, dtype=np.uint64).astype(np.uint32).view(F32)
  x = np.concatenate(around + [v.astype(F32), noise, np.array([np.inf, np.nan], F32)])
  return np.concatenate([x, -x])


@pytest.mark.parametrize("fmt", HALF, ids=lambda f: f.name)
def test_round_to_matches_casting_float32(fmt):
  """``round_to(x, dtype)`` equals the ml_dtypes/numpy cast ``x.astype(dtype)``."""
  x = _float32_probes(fmt)
  with np.errstate(over="ignore", invalid="ignore"):
    want = x.astype(fmt.dtype).astype(F32)
  nan = np.isnan(want)
  for f in (mcf.round_to, _ROUND_TO):
    got = np.asarray(f(jnp.asarray(x), fmt.dtype))
    assert got.dtype == F32
    np.testing.assert_array_equal(np.isnan(got), nan)
    assert_bits(got, want, ~nan, S.F32, f"round_to(x, {fmt.name})", {"x": x})


ROUNDING_CASES = [
    # (x, dtype, expected): ties to even, overflow, subnormals, signed zero, Inf.
    (1 + 2.0**-8, "bfloat16", 1.0),
    (1 + 3 * 2.0**-8, "bfloat16", 1 + 2.0**-6),
    (1 + 2.0**-8 + 2.0**-20, "bfloat16", 1 + 2.0**-7),
    ((2 - 2.0**-8) * 2.0**127, "bfloat16", math.inf),  # max + ulp/2: tie to even is inf
    ((2 - 2.0**-7 + 2.0**-10) * 2.0**127, "bfloat16", (2 - 2.0**-7) * 2.0**127),
    (-(2.0**-127) * 1.00390625, "bfloat16", -(2.0**-127)),  # bfloat16 subnormal, tie to even
    (-0.0, "bfloat16", -0.0),
    (-math.inf, "bfloat16", -math.inf),
    (1 + 2.0**-11, "float16", 1.0),
    (1 + 3 * 2.0**-11, "float16", 1 + 2.0**-9),
    (2.0**-25, "float16", 0.0),  # half the smallest subnormal: tie to even (zero)
    (3 * 2.0**-25, "float16", 2.0**-23),
    (2.0**-25 + 2.0**-35, "float16", 2.0**-24),
    (2.0**-14 - 2.0**-26, "float16", 2.0**-14),  # rounds up into the normals
    (-(2.0**-26), "float16", -0.0),
    (65519.0, "float16", 65504.0),
    (65520.0, "float16", math.inf),
    (math.inf, "float16", math.inf),
]


@pytest.mark.parametrize("x, name, expected", ROUNDING_CASES)
def test_round_to_landmarks(x, name, expected):
  dtype = FORMATS[name].dtype
  for f in (mcf.round_to, _ROUND_TO):
    got = float(f(jnp.asarray(F32(x)), dtype))
    assert got == expected and math.copysign(1, got) == math.copysign(1, expected), (x, got)


@by_format
@FEWER_EXAMPLES
@given(data=st.data())
def test_round_to_from_float64(fmt, data):
  """float64 → bfloat16/float16/float32 (with x64), subnormals of the target
  included, against exact rounding (and numpy's direct casts, which are
  correctly rounded for float16 and float32; ml_dtypes rounds float64 →
  bfloat16 twice, via float32)."""
  rng = data.draw(S.seeds())
  n = 48
  e = np.exp2(rng.integers(fmt.emin - fmt.p - 2, fmt.emax + 2, n).astype(F64))
  m = rng.uniform(1.0, 2.0, n)
  tie = (np.floor(m * 2**fmt.nmant) + 0.5) / 2**fmt.nmant * e  # midpoints of the target
  kind = rng.integers(0, 4, n)
  x = np.select([kind == 0, kind == 1, kind == 2], [tie, np.nextafter(tie, 0), np.nextafter(tie, np.inf)], m * e)
  x[0] = data.draw(st.just(0.0) | st.floats(2.0 ** (fmt.emin - fmt.p - 40), 2.0 ** (fmt.emax + 2)))
  x = np.where(rng.random(n) < 0.5, -x, x)
  with _x64(), np.errstate(over="ignore"):
    got = [np.asarray(f(jnp.asarray(x, jnp.float64), fmt.dtype)) for f in (mcf.round_to, _ROUND_TO)]
    cast = x.astype(fmt.dtype).astype(F64)
  want = np.array([math.copysign(math.inf, v) if r is None else val(r)
                   for v, r in zip(x, (round_exact(v, fmt) for v in ex(x)))])
  if fmt is not S.BF16:
    np.testing.assert_array_equal(cast, want)
  for g in got:
    assert g.dtype == F64
    np.testing.assert_array_equal(g, want)
    np.testing.assert_array_equal(np.signbit(g), np.signbit(x))


def test_round_to_rejects_a_wider_target():
  with pytest.raises(TypeError, match="not narrower"):
    mcf.round_to(jnp.zeros(2, jnp.bfloat16), jnp.float32)


@pytest.mark.parametrize("fmt", HALF, ids=lambda f: f.name)
@EXAMPLES
@given(data=st.data())
def test_from_float_and_to_float(fmt, data):
  """``hi = round(x)``, ``lo = round(x − hi)``; ``to_float`` adds them once in
  float32, so it gives back ``x`` exactly when ``x`` is an MCF value (at most
  ``2p`` significant bits) and nothing is flushed."""
  rng = data.draw(S.seeds())
  n = 64
  mags, signs = S._pin(S.raw_magnitudes(S.F32, rng, n), rng.random(n) < 0.5, data.draw(S.pinned(S.F32)))
  x = S.from_bits(S.F32, mags, signs)
  short = rng.random(n) < 0.5  # keep only 2p significant bits
  keep = np.uint32((0xFFFFFFFF << (23 - (2 * fmt.p - 1))) & 0xFFFFFFFF)
  x = np.where(short, (x.view(np.uint32) & keep).view(F32), x)
  with np.errstate(over="ignore"):
    hi_ref = x.astype(fmt.dtype)
  lo_ref = rounder(fmt)(op32(np.subtract, x, hi_ref.astype(F32))).astype(fmt.dtype)
  # A float32 subnormal that hi rounds up to 2**-126 is read as 0 by the
  # subtraction (DAZ), which leaves lo = -hi: documented to become lo = 0.
  lo_ref = np.where((lo_ref.astype(F32) == -hi_ref.astype(F32)) & (hi_ref != 0), np.zeros_like(lo_ref), lo_ref)
  sum_ref = op32(np.add, hi_ref.astype(F32), lo_ref.astype(F32))
  mask = finite(hi_ref)  # |x| beyond the largest finite value rounds hi to inf
  for m in (mcf.from_float(jnp.asarray(x), fmt.dtype),
            jax.jit(mcf.from_float, static_argnums=1)(jnp.asarray(x), fmt.dtype)):
    assert_bits(np.asarray(m.hi), hi_ref, mask, fmt, "from_float hi", {"x": x})
    assert_bits(np.asarray(m.lo), lo_ref, mask, fmt, "from_float lo", {"x": x})
    back = np.asarray(mcf.to_float(m))
    assert back.dtype == F32
    assert_bits(back, sum_ref, mask, S.F32, "to_float", {"x": x})
  for i, X, H, L in zip(range(n), ex(x), ex(hi_ref), ex(lo_ref)):
    if not mask[i]:
      continue
    check_normalised(H, L, fmt, f"from_float({x[i]!r})")
    rest = X - H  # exact when it is a storage number (not flushed, no underflow)
    if short[i] and representable(rest, fmt) and (not flushes(fmt) or zero_or_normal(rest)):
      assert H + L == X, f"from_float({x[i]!r}) = {hi_ref[i]!r} + {lo_ref[i]!r} is not exact"
    if H + L == X and (not flushes(fmt) or zero_or_normal(H, L)):
      assert back[i] == x[i], f"to_float(from_float({x[i]!r})) = {back[i]!r}"


@by_format
@pytest.mark.parametrize("value", [0.999, 0.9, 0.95, 1e-3, 1 / 3, -2.5e-5])
def test_from_float_splits_python_floats_in_float64(fmt, value):
  """``from_float(0.999, bf16)`` is ``1.0 + bf16(0.999 − 1.0)``: the low part
  is the float64 remainder, not ``0.999 − float32(0.999)`` (which leaves
  ``hi + lo == 1`` in bfloat16)."""
  m = mcf.from_float(value, fmt.dtype)
  assert m.hi.dtype == fmt.dtype and m.lo.dtype == fmt.dtype
  v = ex(np.array([value]))[0]
  hi = round_exact(v, fmt)
  lo = round_exact(v - hi, fmt)
  assert ex(m.hi) == [hi] and ex(m.lo) == [lo]
  assert 2 * abs(v - hi - lo) <= ulp(lo, fmt)
  if fmt is S.BF16 and value == 0.999:
    assert float(m.hi) == 1.0 and float(m.lo) == float(ml_dtypes.bfloat16(-0.001))
    assert float(m.lo) != float(ml_dtypes.bfloat16(0.999 - float(F32(0.999))))


@pytest.mark.parametrize("fmt", HALF, ids=lambda f: f.name)
def test_from_float_of_a_float32_scalar_eager_and_traced(fmt):
  """A float32 scalar (e.g. a hyperparameter injected by optax) splits from its
  float32 value, also when traced."""
  x = F32(0.999)
  hi = x.astype(fmt.dtype)
  lo = (x - hi.astype(F32)).astype(fmt.dtype)
  for m in (mcf.from_float(jnp.float32(x), fmt.dtype),
            jax.jit(lambda v: mcf.from_float(v, fmt.dtype))(jnp.float32(x))):
    assert bits(m.hi, fmt) == bits(hi, fmt) and bits(m.lo, fmt) == bits(lo, fmt)
    assert float(m.lo) != 0.0


# ---------------------------------------------------------------------------
# grow, add, mul: accuracy bounds.
#
# u = 2**-p (p = 8, 11, 24). One rounding errs by at most u·|exact| (relative)
# or tiny(fmt) (absolute: a flush, or half a quantum among float16 subnormals).
#
# grow((x, r), b), b' = round(b): (s, e) = two_sum(x, b') is exact, |e| <= u|x + b'|;
#   float32 storage: t = fl(r + e) errs by <= u(|r| + |e|) <= u²(|x| + |x + b'|)
#   (|r| <= u|x|) and (x', r') = two_sum(s, t) is exact; 16-bit storage: t is a
#   float32 sum, x' = s ⊕ t, and rounding r' = (s − x') + t errs by
#   <= u|r'| <= u·ulp(x')/2 <= u²(|x + b'| + u|x|), plus two float32 roundings. Flushes: x, r, b' read as zero (3), two
#   two_sum deviations (2), t (1), and u·tiny slack: 7·tiny.
# add((x1, r1), (x2, r2)): errors of q = fl(r1 + r2) and fl(e + q):
#   <= u²((2 + u)(|x1| + |x2|) + |x1 + x2|) (no bound relative to the result
#   under cancellation: then only the r's are left, rounded once). Flushes: 4
#   operands, two two_sums, q, e', slack: 9·tiny.
# mul((x, r), (c, d)), |r| <= u|x|, |d| <= u|c|, P = |x·c|: the dropped r·d,
#   the roundings of x⊗d, r⊗c, their sum and e ⊕ (...) add up to
#   <= (8 + 7u + 2u²)u²·P; fast_two_sum is exact (|p| >> |e|). Flushes: an
#   operand read as zero loses at most tiny·(1+u)²·(|x| or |c|) (2 each), and
#   6 roundings/flushes: 2(1+u)²(|x| + |c|)·tiny + 6·tiny.
# Integer bounds below are floors of the exact rational bound; errors are
# integers too, so "err <= floor(bound)" is "err <= bound".
# ---------------------------------------------------------------------------


def grow_bound(X, Bw, fmt) -> int:
  # 16-bit formats: t and (s − x') + t are float32 sums of values below
  # u(|x| + |x + b'|): two more roundings of 2**-24 relative each.
  wide = 0 if fmt is S.F32 else (abs(X) + abs(X + Bw)) >> (fmt.p + 23)
  return ((abs(X) + abs(X + Bw)) >> (2 * fmt.p)) + wide + 7 * tiny(fmt)


def add_bound(X1, X2, fmt) -> int:
  p = fmt.p
  return (((2 << p) + 1) * (abs(X1) + abs(X2)) + (abs(X1 + X2) << p) >> (3 * p)) + 9 * tiny(fmt)


def mul_bound(X, C, fmt) -> int:
  p, t = fmt.p, tiny(fmt)
  rel = ((8 << (2 * p)) + (7 << p) + 2) * abs(xmul(X, C))
  flush = 2 * ((1 << p) + 1) ** 2 * xmul(t, abs(X) + abs(C)) << (2 * p)
  return (rel + flush >> (4 * p)) + 6 * t


def check_grow(fmt, hi, lo, b, modes=("jit", "vmap")):
  (H, L), mask = run_and_compare("grow", fmt, {"hi": hi, "lo": lo, "b": b}, modes=modes)
  bw = b.astype(fmt.dtype)  # grow rounds b to storage precision first
  for i, X, R, Bw, Hi, Lo in zip(range(b.size), ex(hi), ex(lo), ex(bw), ex(H), ex(L)):
    if not mask[i]:
      continue
    where = f"grow(({hi[i]!r}, {lo[i]!r}), {b[i]!r}) = ({H[i]!r}, {L[i]!r})"
    err, bound = abs(Hi + Lo - (X + R + Bw)), grow_bound(X, Bw, fmt)
    assert err <= bound, f"{where}: error {val(err)!r} > {val(bound)!r}"
    check_normalised(Hi, Lo, fmt, where)
  return H, L


def check_add(fmt, h1, l1, h2, l2, modes=("jit", "vmap")):
  (H, L), mask = run_and_compare("add", fmt, {"h1": h1, "l1": l1, "h2": h2, "l2": l2}, modes=modes)
  for i, X1, R1, X2, R2, Hi, Lo in zip(range(h1.size), ex(h1), ex(l1), ex(h2), ex(l2), ex(H), ex(L)):
    if not mask[i]:
      continue
    where = f"add(({h1[i]!r}, {l1[i]!r}), ({h2[i]!r}, {l2[i]!r})) = ({H[i]!r}, {L[i]!r})"
    err, bound = abs(Hi + Lo - (X1 + R1 + X2 + R2)), add_bound(X1, X2, fmt)
    assert err <= bound, f"{where}: error {val(err)!r} > {val(bound)!r}"
    check_normalised(Hi, Lo, fmt, where)


def check_mul(fmt, x, r, c, d, modes=("jit", "vmap")):
  # float32 products may be fused into multiply-adds (fewer roundings, other
  # bits) on some backends; the accuracy bound holds either way.
  (H, L), mask = run_and_compare("mul", fmt, {"x": x, "r": r, "c": c, "d": d}, modes=modes,
                                 compare_bits=fmt is not S.F32)
  mask &= finite(H, L)
  for i, X, R, C, D, Hi, Lo in zip(range(x.size), ex(x), ex(r), ex(c), ex(d), ex(H), ex(L)):
    if not mask[i]:
      continue
    where = f"mul(({x[i]!r}, {r[i]!r}), ({c[i]!r}, {d[i]!r})) = ({H[i]!r}, {L[i]!r})"
    err, bound = abs(Hi + Lo - xmul(X + R, C + D)), mul_bound(X, C, fmt)
    assert err <= bound, f"{where}: error {val(err)!r} > {val(bound)!r}"
    check_normalised(Hi, Lo, fmt, where)


@by_format
@EXAMPLES
@given(data=st.data())
def test_grow_is_accurate_to_mcf_precision(fmt, data):
  hi, lo = data.draw(S.mcf_operands(fmt))
  check_grow(fmt, hi, lo, data.draw(S.increments(fmt, hi, lo)))


@by_format
@EXAMPLES
@given(data=st.data())
def test_add_is_accurate_to_mcf_precision(fmt, data):
  h1, h2 = data.draw(S.sum_operands(fmt))
  check_add(fmt, h1, data.draw(S.mcf_lows(fmt, h1)), h2, data.draw(S.mcf_lows(fmt, h2)))


@by_format
@EXAMPLES
@given(data=st.data())
def test_mul_is_accurate_to_mcf_precision(fmt, data):
  x, c = data.draw(S.product_operands(fmt))
  check_mul(fmt, x, data.draw(S.mcf_lows(fmt, x)), c, data.draw(S.mcf_lows(fmt, c)))


@by_format
def test_mcf_arithmetic_eagerly(fmt):
  """grow, add and mul op by op (eager), on one large batch each."""
  rng = np.random.default_rng(12)
  modes = ("eager", "jit")
  hi, lo = S.mcf_batch(fmt, rng, BATCH)
  check_grow(fmt, hi, lo, S.grow_increments(fmt, hi, lo, rng), modes)
  h1, h2 = S.sum_batch(fmt, rng, BATCH)
  check_add(fmt, h1, S.below_ulp(h1, fmt, rng), h2, S.below_ulp(h2, fmt, rng), modes)
  x, c = S.product_batch(fmt, rng, BATCH)
  check_mul(fmt, x, S.below_ulp(x, fmt, rng), c, S.below_ulp(c, fmt, rng), modes)


@by_format
@pytest.mark.parametrize("beta", [0.999, 0.9, 0.5, 1e-3, 3.0])
def test_mul_by_a_python_float_uses_its_float64_value(fmt, beta):
  """``mul(v, 0.999)`` multiplies by 0.999 to MCF precision, not by
  ``bf16(0.999) == 1``: the bound adds the split's own error ``|β − c − d|``."""
  rng = np.random.default_rng(7)
  x = (rng.uniform(1, 2, 256) * np.exp2(rng.integers(-fmt.emax // 2, fmt.emax // 2, 256))).astype(fmt.dtype)
  r = S.below_ulp(x, fmt, rng)
  m = mcf.mul(MCF(jnp.asarray(x), jnp.asarray(r)), beta)
  b = ex(np.array([beta]))[0]
  c = round_exact(b, fmt)
  split_error = abs(b - c - round_exact(b - c, fmt))
  for X, R, Hi, Lo in zip(ex(x), ex(r), ex(m.hi), ex(m.lo)):
    err = abs(Hi + Lo - xmul(X + R, b))
    assert err <= mul_bound(X, c, fmt) + xmul(abs(X + R), split_error), (val(X), beta)
    check_normalised(Hi, Lo, fmt, f"mul({val(X)}, {beta})")
  if fmt is S.BF16 and beta == 0.999:  # the point of MCF scalars: 0.999 is not 1
    x0 = float(x[0]) + float(r[0])
    assert abs(float(m.hi[0]) + float(m.lo[0]) - 0.999 * x0) < 0.001 * abs(x0) / 10


GROW_CASES = [
    # (dtype, hi, lo, b, exact result as a sum of floats, or None): zero
    # crossings, |b| >> |x|, b far below ulp(x), signed zeros, float16 subnormals.
    ("bfloat16", 1.0, 0.0, -1.0, [0.0]),
    ("bfloat16", 1.0, 2.0**-9, -1.0, [2.0**-9]),
    ("bfloat16", 1.0, 2.0**-9, -1.0 - 2.0**-6, [-(2.0**-6), 2.0**-9]),
    ("bfloat16", 1.0, -(2.0**-10), -1.5, [-0.5, -(2.0**-10)]),
    ("bfloat16", 1.0, 0.0, 1e-4, [1.0, float(ml_dtypes.bfloat16(1e-4))]),
    ("bfloat16", 1.0, 2.0**-9, 3e-9, None),
    ("bfloat16", 1.5, 2.0**-30, 2.0**-40, None),
    ("bfloat16", 1e-3, 2.0**-20, 100.0, None),
    ("bfloat16", -3.0, 2.0**-8, 2.0**20 + 2.0**12, None),
    ("bfloat16", -0.0, 0.0, 0.0, [0.0]),
    ("bfloat16", 0.0, 0.0, -0.0, [0.0]),
    ("bfloat16", 2.0**-120, 0.0, -(2.0**-120) * 1.01, None),  # result below 2**-126
    ("float16", 1.0, 2.0**-12, -1.0, [2.0**-12]),
    ("float16", 2048.0, 0.5, -2049.0, [0.5]),  # b rounds to -2048 (tie to even)
    ("float16", 1.0, 0.0, 1e-5, [1.0, float(np.float16(1e-5))]),
    ("float16", 2.0**-14, 0.0, -(2.0**-14) - 2.0**-24, [-(2.0**-24)]),  # into float16 subnormals
    ("float16", 6e-5, 0.0, 60000.0, None),
    ("float32", 1.0, 2.0**-25, -1.0, [2.0**-25]),
    ("float32", 1.0, 0.0, 1e-10, [1.0, float(F32(1e-10))]),
    ("float32", 3e-30, 0.0, 1e30, None),
]


@pytest.mark.parametrize("name, hi, lo, b, expected", GROW_CASES)
def test_grow_adversarial(name, hi, lo, b, expected):
  fmt = FORMATS[name]
  hi_a, lo_a, b_a = np.array([hi], fmt.dtype), np.array([lo], fmt.dtype), np.array([b], F32)
  (H,), (L,) = ex(hi_a), ex(lo_a)
  assert L == ex(np.array([lo]))[0] and 2 * abs(L) <= ulp(H, fmt)  # a normalised MCF
  out_hi, out_lo = check_grow(fmt, hi_a, lo_a, b_a, ("eager", "jit", "vmap"))
  if expected is not None:
    assert ex(out_hi)[0] + ex(out_lo)[0] == sum(ex(np.array(expected)))


# ---------------------------------------------------------------------------
# The XLA trap: excess precision must not remove the roundings.
# ---------------------------------------------------------------------------


_CHILD = textwrap.dedent(
    """
    import os, sys
    import numpy as np, ml_dtypes, jax, jax.numpy as jnp
    from collage_optax import mcf

    data = dict(np.load(sys.argv[1]))
    DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}

    @jax.jit
    def batch(a, b, lo, c, d, big, small, inc):
      s, e = mcf.two_sum(a, b)
      f, h = mcf.fast_two_sum(big, small)
      p, q = mcf.two_prod(a, b)
      g = mcf.grow(mcf.MCF(a, lo), inc)
      m = mcf.mul(mcf.MCF(a, lo), mcf.MCF(c, d))
      return s, e, f, h, p, q, g.hi, g.lo, m.hi, m.lo

    @jax.jit
    def naive(a, b):  # Fast2Sum's error term by arithmetic on the narrow type
      return b - ((a + b) - a)

    @jax.jit
    def naive_cast(a, b):  # rounding by an intermediate cast inside a float32 chain
      a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
      s = (a32 + b32).astype(a.dtype).astype(jnp.float32)
      return (b32 - (s - a32)).astype(a.dtype)

    out = {}
    for name, dtype in DTYPES.items():
      keys = ("a", "b", "lo", "c", "d", "big", "small")
      args = [jnp.asarray(data[f"{name}_{k}"].view(dtype)) for k in keys]
      args.append(jnp.asarray(data[f"{name}_inc"]))
      res = batch(*args)
      for k, v in zip(("s", "e", "f", "h", "p", "q", "ghi", "glo", "mhi", "mlo"), res):
        out[f"{name}_{k}"] = np.asarray(v).view(np.uint16)
      # The naive formulas on the same |big| >= |small| pairs, against our error terms.
      h = np.asarray(res[3], np.float32)
      need = int(np.count_nonzero(h))
      for label, f in (("b - ((a + b) - a)", naive), ("cast chain", naive_cast)):
        lost = int(np.count_nonzero((np.asarray(f(args[5], args[6]), np.float32) != h) & (h != 0)))
        print(f"{name} naive {label}: {lost} of {need} nonzero error terms wrong")
    np.savez(sys.argv[2], **out)
    print("XLA_FLAGS =", os.environ.get("XLA_FLAGS"), "backend =", jax.default_backend())
    """
)


def _trap_data(fmt: S.Format, n: int, rng) -> dict[str, np.ndarray]:
  """Normal-range operands with close magnitudes, cancellations and big ratios."""
  def values(spread):
    return (rng.uniform(1, 2, n) * np.exp2(rng.integers(-spread, spread, n)) * rng.choice([-1, 1], n))
  a = values(5).astype(fmt.dtype)  # |a·b| < 2**14: no float16 overflow
  b = np.where(rng.random(n) < 0.3, -a.astype(F64) * (1 + rng.uniform(-0.05, 0.05, n)), values(7))
  b = b.astype(fmt.dtype)
  lo = S.below_ulp(a, fmt, rng)
  c = values(4).astype(fmt.dtype)
  d = S.below_ulp(c, fmt, rng)
  inc = (a.astype(F64) * rng.uniform(0.5, 2, n) * np.exp2(rng.integers(-2 * fmt.p - 4, 4, n))
         * rng.choice([-1, 1], n)).astype(F32)
  big, small = _dominant_first(fmt, a, b)
  return {"a": a, "b": b, "lo": lo, "c": c, "d": d, "big": big, "small": small, "inc": inc}


@pytest.mark.parametrize("excess", ["true", "false"])
def test_exact_under_xla_allow_excess_precision(excess, run_with_excess_precision):
  """A fresh process with ``--xla_allow_excess_precision=<excess>`` runs a
  jitted batch of ``two_sum``, ``fast_two_sum``, ``two_prod``, ``grow`` and
  ``mul``; its bits must equal the numpy reference. The naive formulations
  (``b - ((a + b) - a)`` on bfloat16/float16 arrays, and rounding by
  ``astype`` inside a float32 chain) are only reported: whether XLA keeps their
  roundings depends on the backend and its passes."""
  rng = np.random.default_rng(2024)
  data, saved = {}, {}
  for fmt in HALF:
    data[fmt.name] = _trap_data(fmt, 4096, rng)
    for k, v in data[fmt.name].items():
      saved[f"{fmt.name}_{k}"] = v.view(np.uint16) if v.dtype == fmt.dtype else v
  got, stdout = run_with_excess_precision(_CHILD, saved, excess)
  print(stdout)
  for fmt in HALF:
    d = data[fmt.name]
    want = {}
    want["s"], want["e"] = ref_two_sum(d["a"], d["b"], fmt)
    want["f"], want["h"] = ref_fast_two_sum(d["big"], d["small"], fmt)
    want["p"], want["q"] = ref_two_prod(d["a"], d["b"], fmt)
    want["ghi"], want["glo"] = ref_grow(d["a"], d["lo"], d["inc"], fmt)
    want["mhi"], want["mlo"] = ref_mul(d["a"], d["lo"], d["c"], d["d"], fmt)
    mask = finite(*want.values())
    assert mask.all()
    for k, w in want.items():
      g = got[f"{fmt.name}_{k}"].view(fmt.dtype)
      assert_bits(g, w, mask, fmt, f"{fmt.name} {k} (excess precision {excess})", {"a": d["a"], "b": d["b"]})
    # The batch is not trivial: most error terms are nonzero and must survive.
    assert np.count_nonzero(want["e"].astype(F32)) > 1000
