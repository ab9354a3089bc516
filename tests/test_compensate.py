"""``compensate()``: ``θ + lo`` grows by the update, against float64, on adversarial values.

For every bfloat16/float16 param ``θ`` with low component ``lo`` (the state) and
intended update ``u``: after ``θ' = optax.apply_updates(θ, emitted)`` and
``lo'`` from the new state,

  ``float64(θ') + float64(lo') == float64(θ) + float64(lo) + float64(u)``

(the sums taken exactly, with ``math.fsum``: they span more binades than
float64 holds) to within MCF precision. The bound follows ``compensate``'s
steps (decode, float32 arithmetic, encode; ``ε = 2**-24`` is
float32's unit roundoff, ``2**-p`` the storage's, ``p`` = 8 or 11 significant
bits; ``E = θ + lo + u`` exactly):

* decode ``d = fl32(θ + lo)`` errs by at most ``ε·|θ + lo|``;
* ``x = fl32(d + u)`` (``u`` taken at its own, float32 or bfloat16, value)
  errs by at most ``ε·|d + u| <= ε·(|E| + ε·|θ + lo|)``;
* encode: ``hi = round(x)``; ``compensate`` emits ``hi − θ`` in the update's
  dtype and ``apply_updates`` lands on ``at`` (``hi``, unless the emitted
  update is not exact there: a zero crossing over many binades); then
  ``lo' = round(fl32(x − at))``, which errs by at most
  ``(2**-p + ε)·|x − at| <= 2·2**-p·|lo'|``. ``θ' + lo' − E`` is the sum of
  these errors: the first two are float32's floor (an update below ~``2**-24``
  of the param is lost in one step), the last the MCF's own (~``2**-17`` of
  the param for bfloat16: two bfloat16s carry ~16 significant bits);
* flushes: XLA reads and writes float32 subnormals as zero on CPU, so each of
  the operands ``θ, lo, u``, the float32 sums, the landing and the residual
  may lose up to ``2**-126`` (bfloat16); float16 subnormals are normal float32
  numbers and one rounding among them errs by half a quantum, ``2**-25``. We
  allow ten of those.

Bound: ``ε·(1 + 2**-20)·(|θ + lo| + |E|) + 2·2**-p·|lo'| + 10·tiny``. Values
are drawn as bit patterns over the whole range (signed zeros, subnormals, the
largest values) and increments that cross zero, exceed the param by many
binades, or lie far below its ulp; three steps in a row so that a landing
correction is carried on. Also: the emitted updates have the tree and dtypes
of the received ones (bfloat16 and float32 updates), float32 leaves pass
through bit for bit with no state (``lo`` is ``None``), eagerly and with
``compensate`` and ``apply_updates`` fused under one ``jit``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import hypothesis.extra.numpy as hnp

import collage_optax
from collage_optax import CompensateState
import strategies as S


# The storage formats of tests/strategies.py (bias = emax for both), and
# ``tiny``: the most a flush or a rounding among subnormals can change a value
# (see the module docstring).
FORMATS = {"bfloat16": S.BF16, "float16": S.F16}
TINY = {"bfloat16": 2.0**-126, "float16": 2.0**-25}
UPDATE_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
STEPS = 3

EXAMPLES = settings(max_examples=40, deadline=None)

_TX = collage_optax.compensate()


def _step(params, lo, updates):
  """One ``compensate`` update followed by ``optax.apply_updates``."""
  emitted, state = _TX.update(updates, CompensateState(lo), params)
  return optax.apply_updates(params, emitted), state.lo, emitted


RUN = {"eager": _step, "jit": jax.jit(_step)}


def f64(x) -> np.ndarray:
  return np.asarray(x).astype(np.float64)


def check_invariant(theta, lo, update, theta_new, lo_new, fmt_name: str, where: str = "") -> None:
  """Asserts the invariant with the bound of the module docstring, elementwise."""
  fmt = FORMATS[fmt_name]
  unit, tiny, eps = 2.0**-fmt.p, TINY[fmt_name], 2.0**-24
  with np.errstate(over="ignore", invalid="ignore"):
    b = f64(update).ravel()  # the update at its own precision: the step adds it in float32.
    t, l, tn, ln = (f64(x).ravel() for x in (theta, lo, theta_new, lo_new))
    # The sums span up to ~260 binades, beyond float64's 53 bits: fsum rounds
    # each exact sum (and the exact difference) once.
    expected = np.array([math.fsum(x) for x in zip(t, l, b)])
    got = np.array([math.fsum(x) for x in zip(tn, ln)])
    err = np.abs([math.fsum(x) for x in zip(tn, ln, -t, -l, -b)])
    decoded = np.abs([math.fsum(x) for x in zip(t, l)])
    bound = eps * (1 + 2.0**-20) * (decoded + np.abs(expected)) + 2 * unit * np.abs(ln) + 10 * tiny
  finite = np.isfinite(expected) & np.isfinite(got)
  bad = np.flatnonzero(finite & ~(err <= bound))
  if bad.size:
    i = bad[0]
    raise AssertionError(
        f"{where} element {i}: θ={t[i]!r} lo={l[i]!r} u={np.asarray(update).ravel()[i]!r} "
        f"-> θ'={tn[i]!r} lo'={ln[i]!r}: θ'+lo' = {got[i]!r}, expected {expected[i]!r}, "
        f"error {err[i]:.3e} > bound {bound[i]:.3e} ({bad.size} bad elements)")


def check_emitted_like(emitted, updates) -> None:
  """The emitted updates have the tree and dtypes of the received ones."""
  assert jax.tree.structure(emitted) == jax.tree.structure(updates)
  for e, u in zip(jax.tree.leaves(emitted), jax.tree.leaves(updates)):
    assert jnp.dtype(e.dtype) == jnp.dtype(u.dtype) and e.shape == u.shape


# ---------------------------------------------------------------------------
# Strategies: bit patterns over the whole range, adversarial increments.
# ---------------------------------------------------------------------------


def _ints(n: int, lo: int, hi: int):
  return hnp.arrays(np.int64, n, elements=st.integers(lo, hi))


def _bools(n: int):
  return hnp.arrays(np.bool_, n, elements=st.booleans())


@st.composite
def params_and_lo(draw, fmt: S.Format, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """``(θ, lo)`` with ``|lo| <= ulp(θ)/2`` and ``|θ| < 2**(emax − 2)``.

  ``θ`` is drawn as a bit pattern (uniform, plus zero, the smallest
  subnormals, the smallest normal, 1.0 and the top); ``lo`` is zero, next to
  ``θ``'s last bit, or many binades below it.
  """
  top = ((fmt.emax - 2 + fmt.bias) << fmt.nmant) - 1  # just below 2**(emax - 2)
  one = fmt.one_bits
  marks = [0, 1, 2, 1 << fmt.nmant, one - 1, one, one + 1, top]
  mag = draw(hnp.arrays(np.int64, n, elements=st.one_of(
      st.integers(0, top), st.sampled_from(marks))))
  theta = S.from_bits(fmt, mag, draw(_bools(n)))
  gap = np.where(draw(_bools(n)), 0, draw(_ints(n, 0, 3 * fmt.p)))
  frac = draw(hnp.arrays(np.float64, n, elements=st.floats(0.0, 1.0, exclude_max=True)))
  lo = np.abs(theta.astype(np.float64)) * (1.0 + frac) * np.exp2(-(fmt.p + 1.0 + gap))
  lo = np.where(draw(_bools(n)), -lo, lo)
  lo = np.where(draw(_ints(n, 0, 7)) == 0, 0.0, lo)
  return theta, lo.astype(np.float32).astype(fmt.dtype)


@st.composite
def increments(draw, fmt: S.Format, theta: np.ndarray, lo: np.ndarray) -> np.ndarray:
  """float32 updates for ``(θ, lo)``: zero crossings (``u ≈ −(θ + lo)``, exactly
  or off by ``2**-k``), ``θ`` scaled by ``2**-(3p+10) .. 2**12`` (far below its
  ulp to far above the param), unrelated float32 bit patterns, and zeros;
  ``|u| < 2**(emax − 2)`` so that no sum overflows."""
  n = theta.shape[0]
  x = theta.astype(np.float64) + lo.astype(np.float64)
  kind = draw(_ints(n, 0, 3))
  sign = np.where(draw(_bools(n)), -1.0, 1.0)
  off = np.where(draw(_bools(n)), 0.0, sign * np.exp2(-draw(_ints(n, 0, 30)).astype(np.float64)))
  crossing = -x * (1.0 + off)
  shift = draw(_ints(n, -3 * fmt.p - 10, 12)).astype(np.float64)
  frac = draw(hnp.arrays(np.float64, n, elements=st.floats(0.5, 2.0)))
  scaled = np.where(x == 0, 1.0, x) * frac * np.exp2(shift) * sign
  f32_top = int(np.float32(2.0 ** (fmt.emax - 3)).view(np.uint32))
  free_bits = draw(hnp.arrays(np.int64, n, elements=st.integers(0, f32_top)))
  free = np.where(draw(_bools(n)), -1.0, 1.0) * free_bits.astype(np.uint32).view(np.float32)
  u = np.select([kind == 0, kind == 1, kind == 2], [crossing, scaled, free], 0.0)
  return np.where(np.abs(u) < 2.0 ** (fmt.emax - 2), u, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------
# Property: the invariant on adversarial values, several steps in a row.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", RUN)
@pytest.mark.parametrize("update_dtype", UPDATE_DTYPES)
@pytest.mark.parametrize("fmt_name", FORMATS)
@EXAMPLES
@given(data=st.data())
def test_invariant_on_adversarial_values(fmt_name, update_dtype, mode, data):
  fmt = FORMATS[fmt_name]
  theta, lo = data.draw(params_and_lo(fmt), label="(θ, lo)")
  for step in range(STEPS):
    inc = data.draw(increments(fmt, theta, lo), label=f"increment {step}")
    update = inc.astype(UPDATE_DTYPES[update_dtype])
    theta_new, lo_new, emitted = RUN[mode](jnp.asarray(theta), jnp.asarray(lo), jnp.asarray(update))
    check_emitted_like(emitted, jnp.asarray(update))
    assert theta_new.dtype == lo_new.dtype == jnp.dtype(fmt.dtype)
    check_invariant(theta, lo, update, theta_new, lo_new, fmt_name, f"{mode} step {step}")
    theta, lo = np.asarray(theta_new), np.asarray(lo_new)


# ---------------------------------------------------------------------------
# Named adversarial cases, exact in float64.
# ---------------------------------------------------------------------------

BF = ml_dtypes.bfloat16

CASES = {
    # name: (θ, lo, u, exact θ + lo + u, what θ' + lo' carries): the step
    # carries fl32(fl32(θ + lo) + u), here stored exactly by the MCF. Where
    # that float32 sum is exact, θ' + lo' is the exact sum; two cases are
    # below float32's floor (the update is 2**-30 and 2**-200 of the sum) and
    # lose it, as documented (an MCF keeps ~2**-16 of the param anyway).
    "zero crossing to the low part": (1.0, 2.0**-10, -1.0, 2.0**-10, 2.0**-10),
    "zero crossing to a negative": (3.0, 2.0**-8, -5.0, -2.0 + 2.0**-8, -2.0 + 2.0**-8),
    "update larger than the param": (2.0**-20, 0.0, 3.0, 3.0 + 2.0**-20, 3.0 + 2.0**-20),
    "update 2**-30 of the param (below float32's floor: lost)": (1.0, 0.0, 2.0**-30, 1.0 + 2.0**-30, 1.0),
    "update 2**-20 of the param (far below its ulp, kept)": (1.0, 0.0, 2.0**-20, 1.0 + 2.0**-20, 1.0 + 2.0**-20),
    "update 2**-12 of the param (below half its ulp)": (
        1.0, 2.0**-9, 2.0**-12, 1.0 + 2.0**-9 + 2.0**-12, 1.0 + 2.0**-9 + 2.0**-12),
    "huge values": (2.0**100, 2.0**91, -(2.0**101), -(2.0**100) + 2.0**91, -(2.0**100) + 2.0**91),
    "huge update, tiny param": (2.0**-100, 0.0, 2.0**100, 2.0**100 + 2.0**-100, 2.0**100),
    "tiny, near the smallest normal": (2.0**-120, 0.0, -(2.0**-121), 2.0**-121, 2.0**-121),
    "into the subnormal range": (2.0**-125, 0.0, -(2.0**-125) + 2.0**-127, 2.0**-127, 2.0**-127),
    "negative zero param": (-0.0, 0.0, 2.0**-40, 2.0**-40, 2.0**-40),
}


@pytest.mark.parametrize("mode", RUN)
@pytest.mark.parametrize("update_dtype", UPDATE_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_named_adversarial_cases(case, update_dtype, mode):
  theta, lo, u, exact, carried = CASES[case]
  theta_a = np.array([theta], BF)
  lo_a = np.array([lo], BF)
  u_a = np.array([u]).astype(UPDATE_DTYPES[update_dtype])
  assert f64(theta_a)[0] == theta and f64(lo_a)[0] == lo and f64(u_a)[0] == u  # exact inputs
  assert math.fsum([theta, lo, u]) == exact
  theta_new, lo_new, emitted = RUN[mode](jnp.asarray(theta_a), jnp.asarray(lo_a), jnp.asarray(u_a))
  check_emitted_like(emitted, jnp.asarray(u_a))
  got = f64(theta_new)[0] + f64(lo_new)[0]
  if abs(carried) >= 2.0**-126:
    assert got == carried, f"{case}: θ'={f64(theta_new)[0]!r} lo'={f64(lo_new)[0]!r}"
  else:  # the subnormal result is flushed to zero by XLA on CPU (DAZ/FTZ).
    assert abs(got - carried) <= 2.0**-126
  check_invariant(theta_a, lo_a, u_a, theta_new, lo_new, "bfloat16", case)


def test_update_far_below_ulp_accumulates():
  """2**-12 of a param of 1.0 (a quarter of bf16's half-ulp) applied 256 times:
  plain bf16 keeps 1.0, the MCF lands on 1 + 256·2**-12 = 1.0625 exactly."""
  theta, lo = jnp.ones(4, jnp.bfloat16), jnp.zeros(4, jnp.bfloat16)
  u = jnp.full(4, 2.0**-12, jnp.bfloat16)

  def body(carry, _):
    theta, lo, _ = RUN["jit"](*carry, u)
    return (theta, lo), None

  (theta, lo), _ = jax.lax.scan(body, (theta, lo), None, length=256)
  np.testing.assert_array_equal(f64(theta) + f64(lo), 1.0625)
  np.testing.assert_array_equal(f64(optax.apply_updates(jnp.ones(4, jnp.bfloat16), u)), 1.0)


# ---------------------------------------------------------------------------
# Mixed-dtype trees: float32 leaves pass through, with no state.
# ---------------------------------------------------------------------------


def _f32_values(n: int):
  return hnp.arrays(np.float32, n, elements=st.floats(
      -(2.0**60), 2.0**60, width=32, allow_nan=False, allow_infinity=False))


@pytest.mark.parametrize("mode", RUN)
@EXAMPLES
@given(data=st.data())
def test_mixed_tree(mode, data):
  n = 16
  bf16, f16 = FORMATS["bfloat16"], FORMATS["float16"]
  w, w_lo = data.draw(params_and_lo(bf16, n), label="bf16 param")
  h, h_lo = data.draw(params_and_lo(f16, n), label="f16 param")
  f = data.draw(_f32_values(n), label="f32 param")
  params = {"w": w, "h": h, "f": f, "nested": {"gain": np.ones((), BF), "master": np.zeros(3, np.float32)}}
  params = jax.tree.map(jnp.asarray, params)

  state = _TX.init(params)
  assert state.lo["f"] is None and state.lo["nested"]["master"] is None
  assert state.metrics is None
  for key, p in (("w", params["w"]), ("h", params["h"]), ("gain", params["nested"]["gain"])):
    lo = state.lo["nested"]["gain"] if key == "gain" else state.lo[key]
    assert lo.dtype == p.dtype and lo.shape == p.shape and not np.any(np.asarray(lo, np.float32))
  assert len(jax.tree.leaves(state.lo)) == 3  # no arrays for the float32 leaves

  lo = {"w": w_lo, "h": h_lo, "f": None, "nested": {"gain": np.zeros((), BF), "master": None}}
  lo = jax.tree.map(jnp.asarray, lo)
  updates = {
      "w": data.draw(increments(bf16, w, w_lo), label="u(w)").astype(BF),  # bf16 update
      "h": data.draw(increments(f16, h, h_lo), label="u(h)"),  # f32 update of an f16 param
      "f": data.draw(_f32_values(n), label="u(f)"),
      "nested": {"gain": np.array(2.0**-11, BF), "master": np.array([1e-3, -2.0, 2.0**-30], np.float32)},
  }
  updates = jax.tree.map(jnp.asarray, updates)

  params_new, lo_new, emitted = RUN[mode](params, lo, updates)

  check_emitted_like(emitted, updates)
  reference = optax.apply_updates(params, updates)
  for path in (("f",), ("nested", "master")):
    pick = lambda t: t[path[0]] if len(path) == 1 else t[path[0]][path[1]]
    # fp32 leaves: the update passes through and the param equals optax's, bit for bit.
    np.testing.assert_array_equal(np.asarray(pick(emitted)).view(np.uint32),
                                  np.asarray(pick(updates)).view(np.uint32))
    np.testing.assert_array_equal(np.asarray(pick(params_new)).view(np.uint32),
                                  np.asarray(pick(reference)).view(np.uint32))
    assert pick(lo_new) is None
  check_invariant(params["w"], lo["w"], updates["w"], params_new["w"], lo_new["w"], "bfloat16", "w")
  check_invariant(params["h"], lo["h"], updates["h"], params_new["h"], lo_new["h"], "float16", "h")
  check_invariant(params["nested"]["gain"], lo["nested"]["gain"], updates["nested"]["gain"],
                  params_new["nested"]["gain"], lo_new["nested"]["gain"], "bfloat16", "gain")
  assert f64(params_new["nested"]["gain"]) + f64(lo_new["nested"]["gain"]) == 1.0 + 2.0**-11
