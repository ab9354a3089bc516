"""The step's fast paths compute exactly what the plain operation sequences compute.

``mcf._two_sum`` skips the roundings of Knuth's TwoSum that are the identity,
``mcf._round_bf16_bits`` is ``reduce_precision`` without its NaN select,
``mcf._store`` stores by bit shift (the three used by ``mcf.grow``), and
``transform._saturate`` clips to ±inf instead of selecting. Each is compared
bit for bit (NaN for NaN) with the plain sequence, written out here with
``lax.reduce_precision`` and ``astype``, under ``jit`` (float32 flush-to-zero
included) on landmark values and random bit patterns. The exhaustive versions
(all 2**32 operand pairs) are in ``benchmarks/check_fast_paths.py``.
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from collage_optax import mcf
from collage_optax import transform
from collage_optax.mcf import MCF

LANDMARKS_BF16 = np.array(
    [0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x8080, 0x0081, 0x00FF, 0x0100, 0x0180, 0x3F80, 0xBF80,
     0x3F81, 0x3FFF, 0x4000, 0x7F00, 0x7F7E, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0xFFFF,
     0x3C00, 0x3800, 0x0800, 0x8800], np.uint16)


def _as(bits: np.ndarray, dtype) -> jax.Array:
  return jnp.asarray(np.asarray(bits, np.uint16).view(np.dtype(jnp.dtype(dtype))))


def _wide_of(bits: np.ndarray, dtype) -> jax.Array:
  return _as(bits, dtype).astype(jnp.float32)


def _pairs(dtype, n_random: int, seed: int) -> tuple[jax.Array, jax.Array]:
  """Every landmark pair, then random bit patterns and near-cancelling neighbours."""
  a, b = np.meshgrid(LANDMARKS_BF16, LANDMARKS_BF16)
  rng = np.random.default_rng(seed)
  ra = rng.integers(0, 1 << 16, n_random).astype(np.uint16)
  rb = rng.integers(0, 1 << 16, n_random).astype(np.uint16)
  near = (ra ^ 0x8000) + rng.integers(-3, 4, n_random).astype(np.uint16)  # -a ± a few ulps: cancellation.
  shifted = (ra.astype(np.int32) - (rng.integers(1, 24, n_random) << (10 if dtype == jnp.float16 else 7)))
  shifted = np.where(shifted < 0, ra, shifted).astype(np.uint16)  # a with b about 2**-k·a: every alignment.
  aa = np.concatenate([a.ravel(), ra, ra, ra])
  bb = np.concatenate([b.ravel(), rb, near, shifted])
  return _wide_of(aa, dtype), _wide_of(bb, dtype)


def _bits32(x) -> np.ndarray:
  return np.asarray(x, np.float32).view(np.uint32)


def assert_same(got, want, what: str) -> None:
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype and got.shape == want.shape, what
  width = {2: np.uint16, 4: np.uint32}[got.dtype.itemsize]
  nan = np.isnan(got.astype(np.float32)) & np.isnan(want.astype(np.float32))
  bad = (got.view(width) != want.view(width)) & ~nan
  assert not bad.any(), f"{what}: {bad.sum()} differ, first at {np.argwhere(bad)[:3].ravel()}"


def _rp(dtype):
  info = jnp.finfo(dtype)
  if dtype == jnp.float16:
    return lambda x: mcf.round_to(x, dtype)  # float16 subnormals need round_to's integer path.
  return lambda x: lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _two_sum_every_rounding(a, b, r):
  """Knuth's TwoSum (TAOCP 4.2.2) with every operation rounded: the plain sequence."""
  s = r(a + b)
  bb = r(s - a)
  aa = r(s - bb)
  return s, r(r(a - aa) + r(b - bb))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_two_sum_skips_only_identity_roundings(dtype):
  a, b = _pairs(dtype, 1 << 16, seed=1)
  r = _rp(dtype)
  want = jax.jit(lambda a, b: _two_sum_every_rounding(a, b, r))(a, b)
  for name, rounder in (("round_to", mcf._rounder(dtype)), ("arith", mcf._arith_rounder(dtype))):
    got = jax.jit(lambda a, b, rounder=rounder: mcf._two_sum(a, b, rounder))(a, b)
    assert_same(got[0], want[0], f"{name}: s")
    assert_same(got[1], want[1], f"{name}: e")


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.uint32, 512, elements=st.integers(0, 2**32 - 1)))
def test_round_bf16_bits_is_reduce_precision(bits):
  # Any float32 whose NaNs have a zero low half: what bfloat16 arithmetic yields.
  x = bits.view(np.float32)
  x = np.where(np.isnan(x), (bits & 0xFFFF0000).view(np.float32), x)
  x = jnp.asarray(x)
  assert_same(jax.jit(mcf._round_bf16_bits)(x), jax.jit(_rp(jnp.bfloat16))(x), "_round_bf16_bits")


def test_round_bf16_bits_landmarks():
  x = jnp.asarray(np.array([0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x3F808000, 0x3F818000,
                            0x3F807FFF, 0x00008000, 0x80018000, 0x7FC00000, 0xFFC00000, 0x7FFF0000, 0],
                           np.uint32).view(np.float32))
  assert_same(jax.jit(mcf._round_bf16_bits)(x), jax.jit(_rp(jnp.bfloat16))(x), "landmarks")


def test_store_is_astype_for_arithmetic_results():
  a, b = _pairs(jnp.bfloat16, 1 << 14, seed=2)
  for x in (a + b, a - b, a * b, mcf._round_bf16_bits(a + b), jnp.sqrt(jnp.abs(a)) - b):
    x = jax.jit(mcf._round_bf16_bits)(x)
    assert_same(jax.jit(lambda x: mcf._store(x, jnp.bfloat16))(x), jax.jit(lambda x: x.astype(jnp.bfloat16))(x),
                "_store")


def test_grow_with_wide_nan_update_is_nan():
  b = jnp.asarray(np.array([0x7FFFFFFF, 0xFFFF8000, 0x7F80FFFF], np.uint32).view(np.float32))
  m = MCF(jnp.full(b.shape, 2.0, jnp.bfloat16), jnp.zeros(b.shape, jnp.bfloat16))
  got = jax.jit(mcf.grow)(m, b)
  assert np.isnan(np.asarray(got.hi, np.float32)).all()


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.uint32, 256, elements=st.integers(0, 2**32 - 1)), st.sampled_from([jnp.bfloat16, jnp.float32]))
def test_saturate_is_select_of_clip(bits, dtype):
  x = jnp.asarray(bits.view(np.float32))
  finite = jnp.asarray((bits % 3) > 0)
  big = float(jnp.finfo(dtype).max)
  want = jax.jit(lambda x, f: jnp.where(f, jnp.clip(x, -big, big), x))(x, finite)
  assert_same(jax.jit(lambda x, f: transform._saturate(x, f, big))(x, finite), want, "_saturate")
